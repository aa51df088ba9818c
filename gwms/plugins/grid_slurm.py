"""The ``slurm`` grid: each glidein is one Slurm batch job, submitted with ``sbatch``, followed
with one ``squeue`` per entry per cycle, removed with ``scancel``.

The plugin keeps a glidein's files under ``<factory work_dir>/slurm/<entry>/``:
``<glidein id>.sh`` (the batch script), ``<glidein id>.credential`` (mode 0600),
``<glidein id>.out``/``.err`` (the job's output). The grid id is Slurm's job id.

Entry keys used: ``contact`` (the partition), ``account``, ``qos``, ``max_walltime``
(seconds; the job's ``--time`` in whole minutes, at least 1), ``python`` (optional: passed to
glidein_startup.sh as ``-python`` on the worker node).

Commands run through a runner, ``run(argv, timeout)`` firing with ``(exit code, stdout,
stderr)``; the default one spawns the process through the reactor. A command that exits
non-zero or times out fails the Deferred with :class:`SlurmCommandError`.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from zope.interface import implementer

from gwms.factory.grid import FINISHED, HELD, QUEUED, RUNNING, GlideinSubmission, GridStatus
from gwms.interfaces import IGridSubmitter

log = Logger()

COMMAND_TIMEOUT = 60.0

# Slurm job states (squeue %T) -> gwms grid states.
STATE_MAP: dict[str, str] = {
    "PENDING": QUEUED,
    "CONFIGURING": QUEUED,
    "REQUEUED": QUEUED,
    "REQUEUE_FED": QUEUED,
    "RESIZING": QUEUED,
    "RUNNING": RUNNING,
    "COMPLETING": RUNNING,
    "STAGE_OUT": RUNNING,
    "SIGNALING": RUNNING,
    "SUSPENDED": HELD,
    "STOPPED": HELD,
    "REQUEUE_HOLD": HELD,
    "SPECIAL_EXIT": HELD,
    "RESV_DEL_HOLD": HELD,
    "COMPLETED": FINISHED,
    "FAILED": FINISHED,
    "TIMEOUT": FINISHED,
    "CANCELLED": FINISHED,
    "NODE_FAIL": FINISHED,
    "PREEMPTED": FINISHED,
    "OUT_OF_MEMORY": FINISHED,
    "BOOT_FAIL": FINISHED,
    "DEADLINE": FINISHED,
    "REVOKED": FINISHED,
}

# A PENDING job with one of these reasons will never start by itself: it is held.
HELD_REASONS = ("JobHeldUser", "JobHeldAdmin", "held")

Runner = Callable[[Sequence[str], float], "defer.Deferred[tuple[int, str, str]]"]


class SlurmCommandError(Exception):
    def __init__(self, argv: Sequence[str], exit_code: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        how = "failed" if exit_code is None else f"exited {exit_code}"
        super().__init__(f"{argv[0]} {how}: {stderr.strip()[:500]}")


def default_runner(reactor: Any) -> Runner:
    """A runner spawning the command through ``reactor`` (no shell), killed after ``timeout``."""

    def run(argv: Sequence[str], timeout: float) -> defer.Deferred[tuple[int, str, str]]:
        try:
            d = getProcessOutputAndValue(argv[0], list(argv[1:]), env=dict(os.environ), reactor=reactor)
        except OSError as e:
            return defer.fail(SlurmCommandError(argv, None, f"did not run: {e}"))
        d.addTimeout(timeout, reactor)

        def done(result: tuple[bytes, bytes, int]) -> tuple[int, str, str]:
            out, err, code = result
            return code, out.decode(errors="replace"), err.decode(errors="replace")

        def failed(f: Any) -> Any:
            if f.check(defer.TimeoutError, defer.CancelledError):
                raise SlurmCommandError(argv, None, f"no answer in {timeout:g}s")
            raise SlurmCommandError(argv, None, f"did not run: {f.getErrorMessage()}")

        return d.addCallbacks(done, failed)

    return run


def _checked(runner: Runner, argv: Sequence[str], timeout: float) -> defer.Deferred[tuple[str, str]]:
    """Run ``argv``; fire with (stdout, stderr), or fail with SlurmCommandError if non-zero."""

    def check(result: tuple[int, str, str]) -> tuple[str, str]:
        code, out, err = result
        if code != 0:
            raise SlurmCommandError(argv, code, err)
        return out, err

    return defer.maybeDeferred(runner, list(argv), timeout).addCallback(check)


def parse_job_id(output: str) -> str | None:
    """The job id from ``sbatch --parsable`` ("12345" or "12345;cluster"), or None."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if len(lines) != 1:
        return None
    job_id = lines[0].split(";", 1)[0].strip()
    return job_id if job_id.isdigit() else None


def map_state(state: str, reason: str) -> GridStatus | None:
    """A squeue (state, reason) as a GridStatus, or None for an unknown state."""
    state = state.strip().upper()
    reason = reason.strip()
    if reason in ("None", "(null)"):
        reason = ""
    grid_state = STATE_MAP.get(state)
    if grid_state is None:
        return None
    if grid_state == QUEUED and any(r.lower() in reason.lower() for r in HELD_REASONS):
        return GridStatus(HELD, None, f"{state}: {reason}")
    if grid_state == HELD:
        return GridStatus(HELD, None, f"{state}: {reason}" if reason else state)
    if grid_state == FINISHED:
        return GridStatus(FINISHED, None, state)
    return GridStatus(grid_state)


def parse_squeue(output: str) -> dict[str, GridStatus]:
    """Parse ``squeue --noheader --format=%i|%T|%r`` output; odd lines are logged and skipped."""
    out: dict[str, GridStatus] = {}
    for line in output.splitlines():
        if not line.strip():
            continue
        fields = line.strip().split("|")
        if len(fields) != 3 or not fields[0].strip():
            log.warn("squeue: odd line skipped: {line!r}", line=line)
            continue
        job_id, state, reason = fields
        status = map_state(state, reason)
        if status is None:
            log.warn("squeue: unknown state {state!r} for job {job}, skipped", state=state, job=job_id)
            continue
        out[job_id.strip()] = status
    return out


BATCH_SCRIPT = """#!/bin/sh
# gwms glidein {glidein_id}
workdir="${{TMPDIR:-${{SLURM_SUBMIT_DIR:-$PWD}}}}"
exec sh {startup} {args} -workdir "$workdir"
"""


@implementer(IGridSubmitter)
class SlurmGridSubmitter:
    name = "slurm"

    def __init__(self, reactor: Any, work_dir: Path, startup_script: Path,
                 runner: Runner | None = None, timeout: float = COMMAND_TIMEOUT) -> None:
        self.reactor = reactor
        self.work_dir = Path(work_dir)
        self.startup_script = Path(startup_script)
        self.runner: Runner = runner if runner is not None else default_runner(reactor)
        self.timeout = timeout
        self._glidein_of: dict[str, str] = {}  # grid id -> glidein id (this process's submissions)

    @classmethod
    def from_config(cls, config: Any, reactor: Any, runner: Runner | None = None) -> "SlurmGridSubmitter":
        from gwms.glidein.files import startup_script

        return cls(reactor, config.section("factory")["work_dir"] / "slurm", startup_script(), runner)

    def _dir(self, entry: Mapping[str, Any]) -> Path:
        name = str(entry["name"])
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad entry name {name!r}")
        return self.work_dir / name

    @staticmethod
    def _check_id(glidein_id: str) -> None:
        if "/" in glidein_id or glidein_id.startswith(".") or not glidein_id:
            raise ValueError(f"bad glidein id {glidein_id!r}")

    def sbatch_argv(self, entry: Mapping[str, Any], glidein_id: str, script: Path) -> list[str]:
        d = self._dir(entry)
        minutes = max(1, int(float(entry.get("max_walltime", 86400.0)) // 60))
        argv = ["sbatch", "--parsable", f"--job-name=gwms-{glidein_id}", f"--time={minutes}",
                f"--output={d / (glidein_id + '.out')}", f"--error={d / (glidein_id + '.err')}"]
        for key, option in (("contact", "--partition"), ("account", "--account"), ("qos", "--qos")):
            value = entry.get(key)
            if value:
                argv.append(f"{option}={value}")
        argv.append(str(script))
        return argv

    def _prepare(self, entry: Mapping[str, Any], g: GlideinSubmission) -> Path:
        """Stage the credential and write the batch script; returns the script's path."""
        self._check_id(g.glidein_id)
        d = self._dir(entry)
        d.mkdir(parents=True, exist_ok=True)
        args = list(g.arguments)
        if g.credential is not None:
            staged = d / f"{g.glidein_id}.credential"
            try:
                staged.unlink()
            except FileNotFoundError:
                pass
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(Path(g.credential).read_bytes())
            args += ["-credential", str(staged)]
        if "-python" not in args and entry.get("python"):
            args += ["-python", str(entry["python"])]
        script = d / f"{g.glidein_id}.sh"
        script.write_text(BATCH_SCRIPT.format(glidein_id=g.glidein_id,
                                              startup=shlex.quote(str(self.startup_script)),
                                              args=" ".join(shlex.quote(a) for a in args)))
        os.chmod(script, 0o700)
        return script

    @defer.inlineCallbacks
    def submit(self, entry: Mapping[str, Any], glideins: Sequence[GlideinSubmission]) -> Any:
        submitted: dict[str, str] = {}
        for g in glideins:
            try:
                script = self._prepare(entry, g)
            except (OSError, ValueError) as e:
                log.warn("slurm glidein {id}: cannot prepare: {error}", id=g.glidein_id, error=str(e))
                continue
            argv = self.sbatch_argv(entry, g.glidein_id, script)
            try:
                out, err = yield _checked(self.runner, argv, self.timeout)
            except SlurmCommandError as e:
                log.warn("slurm glidein {id}: sbatch failed: {error}", id=g.glidein_id, error=str(e))
                self._cleanup(entry, g.glidein_id)
                continue
            job_id = parse_job_id(out)
            if job_id is None:
                log.warn("slurm glidein {id}: sbatch gave no job id: stdout {out!r}, stderr {err!r}",
                         id=g.glidein_id, out=out[:500], err=err[:500])
                self._cleanup(entry, g.glidein_id)
                continue
            self._glidein_of[job_id] = g.glidein_id
            try:
                (self._dir(entry) / f"{g.glidein_id}.jobid").write_text(job_id + "\n")
            except OSError as e:
                log.warn("slurm glidein {id}: cannot record job id: {error}", id=g.glidein_id, error=str(e))
            submitted[g.glidein_id] = job_id
        return submitted

    def query(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[dict[str, GridStatus]]:
        ids = [str(i) for i in grid_ids]
        if not ids:
            return defer.succeed({})
        argv = ["squeue", "--noheader", "--format=%i|%T|%r", f"--jobs={','.join(ids)}"]

        def parsed(result: tuple[str, str]) -> dict[str, GridStatus]:
            statuses = parse_squeue(result[0])
            wanted = set(ids)
            return {k: v for k, v in statuses.items() if k in wanted}

        return _checked(self.runner, argv, self.timeout).addCallback(parsed)

    def remove(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[None]:
        ids = [str(i) for i in grid_ids]
        if not ids:
            return defer.succeed(None)
        return _checked(self.runner, ["scancel", *ids], self.timeout).addCallback(lambda _: None)

    def forget(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[None]:
        d = self._dir(entry)
        for grid_id in grid_ids:
            glidein_id = self._glidein_of.pop(str(grid_id), None)
            if glidein_id is None:
                glidein_id = self._find_glidein(d, str(grid_id))
            if glidein_id is not None:
                self._cleanup(entry, glidein_id)
        return defer.succeed(None)

    @staticmethod
    def _find_glidein(d: Path, grid_id: str) -> str | None:
        """After a restart: the glidein whose job id file names ``grid_id``."""
        try:
            for p in d.glob("*.jobid"):
                if p.read_text().strip() == grid_id:
                    return p.name[: -len(".jobid")]
        except OSError:
            pass
        return None

    def _cleanup(self, entry: Mapping[str, Any], glidein_id: str) -> None:
        d = self._dir(entry)
        for suffix in (".sh", ".credential", ".out", ".err", ".jobid"):
            try:
                (d / (glidein_id + suffix)).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn("slurm glidein {id}: cannot remove {suffix}: {error}", id=glidein_id,
                         suffix=suffix, error=str(e))
