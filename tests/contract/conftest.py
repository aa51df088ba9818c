"""Two pools behind one small driver protocol, so that the same contract tests hold the memory
pool (``gwms.testing.pool.MemoryPool``) to what the real one does: real ``twistd`` daemons on
127.0.0.1 (``tests/integration/pool.py``) driven through the ``gwms`` command line.

The real pool's fixtures (``creds``, ``start_daemon``, ``gwms_cli``) are the integration ones,
re-exported from ``tests/integration/conftest.py`` rather than copied."""

from __future__ import annotations

import getpass
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import pytest
from twisted.internet.testing import MemoryReactorClock

from gwms import classads
from gwms.testing.polling import wait_until
from gwms.testing.pool import MemoryPool

T = TypeVar("T")
INTEGRATION = Path(__file__).resolve().parents[1] / "integration"


def _integration_conftest() -> Any:
    # pytest imports every conftest as "conftest", so a plain import could get another one:
    # load the integration conftest under a name of its own.
    spec = importlib.util.spec_from_file_location("gwms_integration_conftest", INTEGRATION / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_integration = _integration_conftest()
creds = _integration.creds
start_daemon = _integration.start_daemon
gwms_cli = _integration.gwms_cli
if str(INTEGRATION) not in sys.path:
    sys.path.insert(0, str(INTEGRATION))
from pool import start_pool  # tests/integration/pool.py, through the sys.path entry above

# Where the memory pools' clocks start: any plausible date, so that event logs and QDate look real.
EPOCH = 1_700_000_000


@dataclass
class ActResult:
    done: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


class PoolDriver(Protocol):
    """What a contract test does with a pool. Jobs are plain dicts (``classads.to_python``);
    times are in the pool's own seconds (the clock's in memory, real ones for real daemons)."""

    users: Sequence[str]  # who may submit; the first one is the default user

    def submit(self, user: str, text: str, files: Mapping[str, str] = {}) -> int:
        """Queue a submit description (``files`` go into its directory first); the cluster id."""

    def iwd(self, cluster: int) -> Path:
        """The directory a cluster was submitted from (its event log and output files)."""

    def queue(self, cluster: int) -> list[dict[str, Any]]:
        """The cluster's jobs still in the queue."""

    def history(self, cluster: int) -> list[dict[str, Any]]:
        """The cluster's jobs that left the queue (completed or removed)."""

    def act(self, user: str, action: str, job_ids: Sequence[str], reason: str | None = None) -> ActResult:
        """remove, hold or release jobs as ``user``."""

    def wait_until(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """Let the pool run until ``predicate()`` is true; fail after ``timeout`` seconds."""

    def matches(self) -> int:
        """How many matches the negotiator has made so far."""

    def sandboxes(self) -> list[str]:
        """What is in the startd's execute directory: one sandbox per job it holds."""


class MemoryDriver:
    def __init__(self, pool: MemoryPool) -> None:
        self.pool = pool
        self.users = pool.users

    def submit(self, user: str, text: str, files: Mapping[str, str] = {}) -> int:
        return self.pool.submit(user, text, dict(files))

    def iwd(self, cluster: int) -> Path:
        return self.pool.iwds[cluster]

    def queue(self, cluster: int) -> list[dict[str, Any]]:
        return [classads.to_python(j) for j in self.pool.query(f"ClusterId == {cluster}")]

    def history(self, cluster: int) -> list[dict[str, Any]]:
        return [classads.to_python(j) for j in self.pool.history(f"ClusterId == {cluster}")]

    def act(self, user: str, action: str, job_ids: Sequence[str], reason: str | None = None) -> ActResult:
        reply = self.pool.act(user, action, job_ids, reason=reason)
        return ActResult(list(reply.get("Done", [])), list(reply.get("Refused", [])),
                         list(reply.get("NotFound", [])))

    def wait_until(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        return self.pool.run_until(predicate, timeout, what)

    def matches(self) -> int:
        return self.pool.matches

    def sandboxes(self) -> list[str]:
        return sorted(p.name for p in (self.pool.workdir / "execute").iterdir())


class RealDriver:
    """Real daemons, and the ``gwms`` command line as their one user (fs authentication over
    the schedd's UNIX socket: every job belongs to the UNIX user running the tests)."""

    VERBS: ClassVar[dict[str, tuple[str, str]]] = {"remove": ("rm", "marked for removal"), "hold": ("hold", "held"), "release": ("release", "released")}

    def __init__(self, pool: Any, workdir: Path, cli: Callable[..., Any]) -> None:
        self.pool = pool
        self.workdir = workdir
        self.cli = cli
        self.users = (getpass.getuser(),)
        self._iwds: dict[int, Path] = {}

    def _run(self, *args: str) -> Any:
        result = self.cli(*args, env=self.pool.env, timeout=60)
        return result

    def _check_user(self, user: str) -> None:
        if user not in self.users:
            raise ValueError(f"the real pool has one user, {self.users[0]}, not {user!r}")

    def submit(self, user: str, text: str, files: Mapping[str, str] = {}) -> int:
        self._check_user(user)
        jobdir = self.workdir / f"jobs-{len(self._iwds) + 1}"
        jobdir.mkdir()
        for name, content in files.items():
            (jobdir / name).write_text(content)
            if content.startswith("#!"):
                (jobdir / name).chmod(0o755)
        (jobdir / "job.sub").write_text(text)
        result = self._run("submit", str(jobdir / "job.sub"))
        found = re.search(r"submitted to cluster (\d+)\.", result.stdout)
        assert result.returncode == 0 and found, (result.stdout, result.stderr)
        cluster = int(found.group(1))
        self._iwds[cluster] = jobdir
        return cluster

    def iwd(self, cluster: int) -> Path:
        return self._iwds[cluster]

    def _json(self, *args: str) -> list[dict[str, Any]]:
        result = self._run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def queue(self, cluster: int) -> list[dict[str, Any]]:
        return self._json("q", str(cluster))

    def history(self, cluster: int) -> list[dict[str, Any]]:
        return self._json("history", str(cluster))

    def act(self, user: str, action: str, job_ids: Sequence[str], reason: str | None = None) -> ActResult:
        self._check_user(user)
        command, verb = self.VERBS[action]
        result = self._run(command, *job_ids, *(["--reason", reason] if reason else []))
        done = re.findall(rf"^Job (\S+) {verb}$", result.stdout, re.MULTILINE)
        refused = re.findall(r"^Job (\S+): permission denied", result.stderr, re.MULTILINE)
        missing = re.findall(r"^Job (\S+): not found", result.stderr, re.MULTILINE)
        return ActResult(done, refused, missing)

    def wait_until(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        return wait_until(predicate, timeout, what, interval=0.1)

    def matches(self) -> int:
        # The negotiator logs one line per cycle: "cycle: ... N matches in ... s".
        log = self.pool.daemons["negotiator"].log_text()
        return sum(int(n) for n in re.findall(r"cycle: .*?, (\d+) matches in", log))

    def sandboxes(self) -> list[str]:
        return sorted(p.name for p in (self.workdir / "execute-wn1").iterdir())


class PoolMaker:
    """Makes a pool of one kind; ``users`` are known before any pool is started, so a contract
    that needs two users can skip without starting anything."""

    def __init__(self, kind: str, users: Sequence[str], make: Callable[[int], PoolDriver]) -> None:
        self.kind = kind
        self.users = tuple(users)
        self._make = make

    def __call__(self, slots: int = 4) -> PoolDriver:
        return self._make(slots)


@pytest.fixture(params=["memory", pytest.param("real", marks=pytest.mark.integration)])
def make_pool(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        pools: list[MemoryPool] = []

        def memory(slots: int) -> PoolDriver:
            clock = MemoryReactorClock()
            clock.advance(EPOCH)
            pool = MemoryPool(clock, tmp_path / f"pool-{len(pools) + 1}", slots=slots)
            pools.append(pool)
            return MemoryDriver(pool)

        yield PoolMaker("memory", ("alice", "bob"), memory)
        for pool in pools:
            pool.stop()
    else:
        def real(slots: int) -> PoolDriver:
            # Asked for only now: a test that skips before making a pool makes no CA either.
            pool = start_pool(request.getfixturevalue("creds"), tmp_path, request.getfixturevalue("start_daemon"),
                              slots=slots, cpus=slots)
            return RealDriver(pool, tmp_path, request.getfixturevalue("gwms_cli"))

        yield PoolMaker("real", (getpass.getuser(),), real)
