"""User priorities: HTCondor's accountant, reduced to what fair share needs.

Every submitter has a *real* priority that follows its resource usage with exponential decay
(HTCondor's formula, see "Priority Calculation" in the HTCondor manual)::

    beta = 0.5 ** (dt / half_life)
    real = beta * real + (1 - beta) * usage        floored at min_priority (0.5)

so a submitter that keeps using N cpus converges to a real priority of N, and one that stops
halves its priority every half-life.  The *effective* priority is real x priority factor (the
factor defaults to 1000, as DEFAULT_PRIO_FACTOR does); lower is better.  The matchmaker gives
each submitter a share of the pool inversely proportional to its effective priority.

The table is persisted as JSON, written atomically (temporary file in the same directory,
fsync, rename, fsync of the directory) so that a crash leaves either the old or the new file,
never a torn one.  Only factors that were set explicitly are stored: a submitter without one
follows the configured default, even if the configuration changes later.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Priorities", "PrioritiesFileError"]

_FORMAT = "gwms-priorities"
_VERSION = 1


class PrioritiesFileError(ValueError):
    """The priorities file exists but cannot be read or is not a priorities file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"priorities file {str(path)!r}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class _Record:
    real: float
    factor: float | None = None  # None: the configured default applies
    accumulated: float = 0.0  # resource-seconds
    last_usage: float | None = None  # when the submitter was last seen using something


def _finite(value: object) -> bool:
    # bool is an int: a JSON true is not a number here.
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def _positive_finite(value: float, what: str) -> float:
    if not _finite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, not {value!r}")
    return float(value)


class Priorities:
    """User priorities from usage with half-life decay, persisted (JSON written atomically:
    temp file + fsync + rename).

    ``path`` None keeps everything in memory (tests, benchmarks).  A missing file is an empty
    table; an unreadable or corrupt one raises :class:`PrioritiesFileError` naming the file,
    so that the daemon decides (refuse to start, or move it aside) rather than silently
    forgetting everybody's usage.
    """

    def __init__(self, path: Path | str | None, half_life: float = 86400.0, default_factor: float = 1000.0,
                 min_priority: float = 0.5) -> None:
        self.path = Path(path) if path is not None else None
        self.half_life = _positive_finite(half_life, "half_life")
        self.default_factor = _positive_finite(default_factor, "default_factor")
        self.min_priority = _positive_finite(min_priority, "min_priority")
        self._records: dict[str, _Record] = {}
        self._last_update: float | None = None
        if self.path is not None:
            self._load(self.path)

    # -- reading ---------------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as e:
            raise PrioritiesFileError(path, f"cannot be read ({e})") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrioritiesFileError(path, f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise PrioritiesFileError(path, f"not a priorities file (no \"format\": \"{_FORMAT}\")")
        if data.get("version") != _VERSION:
            raise PrioritiesFileError(path, f"unsupported version {data.get('version')!r} (expected {_VERSION})")
        last_update = data.get("last_update")
        if last_update is not None and not _finite(last_update):
            raise PrioritiesFileError(path, f"last_update must be a number or null, not {last_update!r}")
        submitters = data.get("submitters")
        if not isinstance(submitters, dict):
            raise PrioritiesFileError(path, "\"submitters\" must be an object")
        records: dict[str, _Record] = {}
        for name, entry in submitters.items():
            records[name] = self._record_from_json(path, name, entry)
        self._records = records
        self._last_update = None if last_update is None else float(last_update)

    def _record_from_json(self, path: Path, name: str, entry: Any) -> _Record:
        def bad(reason: str) -> PrioritiesFileError:
            return PrioritiesFileError(path, f"submitter {name!r}: {reason}")

        if not isinstance(entry, dict):
            raise bad("entry must be an object")
        real = entry.get("RealPriority")
        if not _finite(real) or real < 0:
            raise bad(f"RealPriority must be a finite number >= 0, not {real!r}")
        factor = entry.get("PriorityFactor")
        if factor is not None and (not _finite(factor) or factor <= 0):
            raise bad(f"PriorityFactor must be a finite number > 0 or null, not {factor!r}")
        accumulated = entry.get("AccumulatedUsage", 0.0)
        if not _finite(accumulated) or accumulated < 0:
            raise bad(f"AccumulatedUsage must be a finite number >= 0, not {accumulated!r}")
        last_usage = entry.get("LastUsageTime")
        if last_usage is not None and not _finite(last_usage):
            raise bad(f"LastUsageTime must be a number or null, not {last_usage!r}")
        # A file written with a lower floor is brought up to ours rather than refused.
        return _Record(real=max(float(real), self.min_priority), factor=None if factor is None else float(factor),
                       accumulated=float(accumulated), last_usage=None if last_usage is None else float(last_usage))

    # -- the accountant --------------------------------------------------------------------------

    def update(self, usage: Mapping[str, float], now: float) -> None:
        """Fold in ``usage`` (cpus in use per submitter now) for the time since the last update.

        Every known submitter decays, with usage 0 if it is not in ``usage``.  The first update
        only starts the clock (there is no interval to weigh the usage by yet), as HTCondor's
        accountant does.  A clock that went backwards counts as no time passing.
        """
        if not _finite(now):
            raise ValueError(f"now must be a finite number, not {now!r}")
        for submitter, used in usage.items():
            if not isinstance(submitter, str):
                raise TypeError(f"submitter names must be str, not {type(submitter).__name__}")
            if not _finite(used) or used < 0:
                raise ValueError(f"usage of {submitter!r} must be a finite number >= 0, not {used!r}")
        dt = 0.0 if self._last_update is None else max(0.0, now - self._last_update)
        beta = 0.5 ** (dt / self.half_life)
        for submitter in usage:
            if submitter not in self._records:
                self._records[submitter] = _Record(real=self.min_priority)
        for submitter, record in self._records.items():
            used = float(usage.get(submitter, 0.0))
            record.real = max(beta * record.real + (1.0 - beta) * used, self.min_priority)
            record.accumulated += used * dt
            if used > 0:
                record.last_usage = now
        self._last_update = now if self._last_update is None else max(self._last_update, now)

    @property
    def last_update(self) -> float | None:
        return self._last_update

    def real(self, submitter: str) -> float:
        record = self._records.get(submitter)
        return self.min_priority if record is None else record.real

    def factor(self, submitter: str) -> float:
        record = self._records.get(submitter)
        if record is None or record.factor is None:
            return self.default_factor
        return record.factor

    def effective(self, submitter: str) -> float:
        """Real priority x priority factor: what fair share is computed from (lower is better)."""
        return self.real(submitter) * self.factor(submitter)

    def set_factor(self, submitter: str, factor: float) -> None:
        if not isinstance(submitter, str) or not submitter:
            raise ValueError(f"submitter must be a non-empty str, not {submitter!r}")
        factor = _positive_finite(factor, "priority factor")
        record = self._records.setdefault(submitter, _Record(real=self.min_priority))
        record.factor = factor

    def table(self) -> list[dict[str, object]]:
        """One row per known submitter, best effective priority first (as condor_userprio
        lists them).  AccumulatedUsage is in cpu-seconds."""
        rows: list[dict[str, object]] = []
        for name, record in self._records.items():
            factor = self.default_factor if record.factor is None else record.factor
            rows.append({"Submitter": name, "RealPriority": record.real, "PriorityFactor": factor,
                         "EffectivePriority": record.real * factor, "AccumulatedUsage": record.accumulated,
                         "LastUsageTime": record.last_usage})
        rows.sort(key=lambda row: (row["EffectivePriority"], row["Submitter"]))
        return rows

    # -- writing ---------------------------------------------------------------------------------

    def _to_json(self) -> dict[str, object]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "last_update": self._last_update,
            "submitters": {
                name: {"RealPriority": r.real, "PriorityFactor": r.factor, "AccumulatedUsage": r.accumulated,
                       "LastUsageTime": r.last_usage}
                for name, r in sorted(self._records.items())
            },
        }

    def save(self) -> None:
        """Write the table atomically; nothing to do without a path."""
        if self.path is None:
            return
        data = json.dumps(self._to_json(), indent=1, allow_nan=False).encode("utf-8") + b"\n"
        directory = self.path.parent
        fd, temp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp makes it 0600; priorities are not secret and `gwms userprio`-like tools
            # running as another user may read the file.
            os.chmod(temp_name, 0o644)
            os.replace(temp_name, self.path)
        except BaseException:
            try:
                os.unlink(temp_name)
            except FileNotFoundError:
                pass
            raise
        # The rename is durable only once the directory entry is on disk.
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass  # some file systems refuse fsync on a directory; the data itself is synced
        finally:
            os.close(dir_fd)
