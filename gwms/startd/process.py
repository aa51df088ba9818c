"""One job as real OS processes: spawn, track the whole process tree, account, kill, clean up.

How a job runs::

    startd (subreaper) ==pipes== launcher (child subreaper, one per startd: gwms.startd.launcher)
                                    `--fork--> wrapper (session leader, child subreaper; one job
                                                  |     at a time, reused)
                                                  `--posix_spawn (or fork, identity switch,
                                                     exec)--> job (own process group) --> ...

The startd never forks for a job. ``Launcher`` (below) keeps one small launcher process per
startd, started the first time a job starts and again whenever it has died; JobProcess sends it
one request per job (argv, environment, sandbox, standard files, and what the identity-switch
plugin's ``launch`` said: uid, gid, groups) and gets back, as JSON lines:

- ``start``: the wrapper's pid (the job's session id) and the job's pid, or why exec failed;
- ``exit``: the job's wait status and exact rusage when its main process ends, and whether any
  process of the job is left (``done``: none is; ``leftovers``: some are);
- ``done`` (after ``leftovers``): the rusage of everything reaped, once nothing is left;
- ``lost``: the wrapper ended without reporting (it was killed).

When the job has finished, JobProcess *releases* it: only then may its wrapper serve another
job, so a wrapper's session holds one job's processes at a time.

Why a wrapper, forked by the launcher (and reused) rather than a new interpreter per job: it is
a child subreaper, so a job's daemonized descendants (double fork, setsid, scrubbed environment)
are reparented to *it*, and "nothing of the job is left" is "the wrapper has no children",
known without looking at /proc. Its ``wait4`` gives exact CPU times for everything it reaped
and the largest single process's peak RSS. See ``gwms.startd.launcher`` for the details.

So a job that leaves nothing behind costs the startd a request, two short records and a
release: no fork, no /proc scan. Only when the wrapper reports leftovers, when ``kill`` is
called, or when the wrapper or the launcher is lost, does the starter walk /proc for the job's
processes (descendants of the wrapper, members of its session, holders of
``GWMS_JOB_MARKER=<marker>``, processes seen before) and SIGKILL them, with pidfds and
start-time checks so that a reused pid is never hit; the wrapper reaps them and then reports
``done``.

What is sampled: every ``sample_interval`` (the first time one interval after the start, so a
short job is never sampled) the starter reads the job's processes below the wrapper through
``/proc/<pid>/task/<tid>/children`` (no full /proc walk), recording each one's CPU time and the
RSS summed over the tree. That gives ``usage()`` while the job runs and the peak RSS of the
whole tree (sampled: a short spike between samples is missed). The final figures take, field
by field, the larger of the exact report and the samples: a job that forges its report cannot
come out below what was seen.

Limits: a process that escapes the wrapper's tree (only possible if the wrapper dies) is found
by its marker, and only when something is being killed; one that also scrubs its environment is
out of reach, as it is for HTCondor without cgroups. If the launcher dies, every job it had is
killed and reported with ``JobResult.failure`` set; the next job starts a new launcher.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "MARKER_VARIABLE",
    "JobProcess",
    "JobResult",
    "Launcher",
    "Usage",
    "become_subreaper",
    "find_processes",
    "remove_sandbox",
    "sweep_sandboxes",
]

MARKER_VARIABLE = "GWMS_JOB_MARKER"
PR_SET_CHILD_SUBREAPER = 36
LAUNCHER_SCRIPT = Path(__file__).with_name("launcher.py")

_log = Logger()
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_KB = (os.sysconf("SC_PAGE_SIZE") // 1024) if hasattr(os, "sysconf") else 4
# /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN; without it, sampling walks /proc.
_HAVE_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux >= 3.4): orphans among its descendants are
    reparented to it instead of to init, so a job's daemonized processes can still be found
    (and must be reaped: JobProcess does that for its own). Returns False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        # prctl is variadic and the kernel reads unsigned longs: pass them as such.
        return libc.prctl(ctypes.c_int(PR_SET_CHILD_SUBREAPER), ctypes.c_ulong(1), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Usage:
    """Resources a job used: CPU seconds, wall seconds of its main process, peak RSS in KiB."""

    user_cpu: float
    sys_cpu: float
    wall: float
    peak_rss_kb: int


@dataclass(frozen=True)
class JobResult:
    """How a job ended. Exactly one of exit_code / exit_signal is set. ``exec_error`` says why
    the command could not be started at all (exit_code is then 127 or 126, as in a shell).
    ``failure`` is set when the starter lost track of the job (its wrapper or the launcher was
    killed before reporting the exit): the job was then killed, and exit_code / exit_signal
    are the wrapper's own status, or SIGKILL if even that is unknown."""

    exit_code: int | None
    exit_signal: int | None
    usage: Usage
    leftover_processes_killed: int
    exec_error: str | None = None
    failure: str | None = None


# ---------------------------------------------------------------------------------------------
# /proc


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgrp: int
    session: int
    state: str
    user_cpu: float
    sys_cpu: float
    start: int          # clock ticks after boot: with pid, identifies a process across pid reuse
    rss_kb: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X", "x")


def _read_stat(pid: int) -> _Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    _, _, rest = data.rpartition(b")")
    fields = rest.split()
    try:
        return _Proc(pid=pid, ppid=int(fields[1]), pgrp=int(fields[2]), session=int(fields[3]),
                     state=fields[0].decode("ascii", "replace"), user_cpu=int(fields[11]) / _CLK_TCK,
                     sys_cpu=int(fields[12]) / _CLK_TCK, start=int(fields[19]), rss_kb=int(fields[21]) * _PAGE_KB)
    except (IndexError, ValueError):
        return None


def _proc_table() -> dict[int, _Proc]:
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            proc = _read_stat(int(name))
            if proc is not None:
                table[proc.pid] = proc
    return table


def _has_marker(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:  # gone, or another user's process and we are not root
        return False
    # The quick substring test first; then the exact entry, so that marker "a" is not "ab".
    return entry in data and entry in data.split(b"\0")


def _job_tree(table: Mapping[int, _Proc], marker: str, root_pids: Iterable[int] = (),
              sessions: Iterable[int] = (), known: Iterable[tuple[int, int]] = ()) -> dict[int, _Proc]:
    """The live processes of one job in ``table``: the roots and their descendants, members of
    ``sessions``, processes whose (pid, start) is in ``known``, and marker holders, with the
    descendants of all of them. Never this process or init."""
    me = os.getpid()
    sessions = set(sessions)
    known = set(known)
    entry = f"{MARKER_VARIABLE}={marker}".encode() if marker else None
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    seeds = {pid for pid in root_pids if pid in table}
    for proc in table.values():
        if proc.session in sessions or proc.key in known:
            seeds.add(proc.pid)
    found: set[int] = set()

    def walk(start: Iterable[int]) -> None:
        stack = list(start)
        while stack:
            pid = stack.pop()
            if pid in found:
                continue
            found.add(pid)
            stack.extend(children.get(pid, ()))

    walk(seeds)
    if entry is not None:
        # Kernel threads (children of kthreadd, pid 2) have no environment worth reading.
        walk(pid for pid, proc in table.items()
             if pid not in found and proc.alive and pid not in (1, 2, me) and proc.ppid != 2
             and _has_marker(pid, entry))
    return {pid: table[pid] for pid in found if table[pid].alive and pid not in (1, me)}


def find_processes(marker: str, root_pids: Iterable[int] = (), *, sessions: Iterable[int] = ()) -> set[int]:
    """Live (non-zombie) pids of a job, from one /proc scan: ``root_pids`` and their
    descendants (ppid walk), members of ``sessions``, and processes whose environment holds
    ``GWMS_JOB_MARKER=<marker>`` together with their descendants. An empty marker matches
    nothing. Environments of other users' processes are readable only by root."""
    return set(_job_tree(_proc_table(), marker, root_pids, sessions))


def _tree_below(root: int) -> dict[int, _Proc]:
    """The live descendants of ``root`` (not ``root`` itself), found through the kernel's
    per-thread children lists: a few small reads for one job instead of a walk over every
    process on the machine. A snapshot, as any /proc view: a process forked meanwhile may be
    missed until the next look."""
    found: dict[int, _Proc] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    children = f.read().split()
            except OSError:
                continue
            for child in children:
                child_pid = int(child)
                if child_pid in found:
                    continue
                proc = _read_stat(child_pid)
                if proc is not None and proc.ppid == pid:
                    stack.append(child_pid)
                    if proc.alive:
                        found[child_pid] = proc
    return found


def _signal(proc: _Proc, sig: int) -> bool:
    """Send ``sig`` to ``proc`` only if that pid is still the process we saw: pid numbers are
    reused, and a pidfd pins the process so the check and the kill cannot race."""
    fd = None
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfd (old kernel, seccomp): check-then-kill instead
        fd = None
    try:
        now = _read_stat(proc.pid)
        if now is None or now.start != proc.start or not now.alive:
            return False
        if fd is None:
            os.kill(proc.pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        _log.warn("cannot signal process {pid}: permission denied", pid=proc.pid)
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _twisted_owned_pids() -> set[int]:
    try:
        from twisted.internet.process import reapProcessHandlers
    except ImportError:
        return set()
    return set(reapProcessHandlers)


# ---------------------------------------------------------------------------------------------
# The launcher, seen from the startd


class _LauncherProtocol(ProcessProtocol):
    """One launcher process: requests to its stdin, records from its stdout, its stderr to
    the log."""

    max_line = 1 << 20  # a record longer than this is not one of ours

    def __init__(self, owner: Launcher) -> None:
        self.owner = owner
        self.pid: int | None = None  # kept: the transport forgets it once the process has ended
        self.jobs: dict[int, JobProcess] = {}
        self.wrappers: set[int] = set()  # pids of its wrappers, from the jobs' start records
        self.exited = False
        self._buffer = b""
        self._errors = b""

    def send(self, request: dict) -> None:
        self.transport.write(json.dumps(request, separators=(",", ":")).encode() + b"\n")

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > self.max_line:
            _log.warn("launcher {pid}: dropping an overlong record", pid=self.pid)
            self._buffer = b""
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                _log.warn("launcher {pid}: ignoring a malformed record", pid=self.pid)
                continue
            job = self.jobs.get(record.get("id")) if isinstance(record, dict) else None
            if job is None:
                continue  # a job that has finished (or was never ours)
            if record.get("event") == "start" and isinstance(record.get("pid"), int):
                self.wrappers.add(record["pid"])
            try:
                job._on_record(record)
            except Exception:  # noqa: BLE001 - one job's bug must not stop the others' reports
                _log.failure("job {marker}: handling {event!r} from the launcher failed",
                             marker=job.marker, event=record.get("event"))

    def errReceived(self, data: bytes) -> None:
        # The launcher's own complaints (and a traceback if it crashes): to the startd's log.
        self._errors += data
        *lines, self._errors = self._errors.split(b"\n")
        if len(self._errors) > self.max_line:
            lines.append(self._errors)
            self._errors = b""
        for line in lines:
            _log.warn("launcher: {line}", line=line.decode("utf-8", "replace"))

    def processExited(self, reason: Failure) -> None:
        self.exited = True  # no new job goes to it; its last records may still be in the pipe

    def processEnded(self, reason: Failure) -> None:
        # Every pipe is closed and every record read: what its jobs did not hear now, they never will.
        self.exited = True
        if self._errors:
            _log.warn("launcher: {line}", line=self._errors.decode("utf-8", "replace"))
            self._errors = b""
        self.owner._ended(self, reason)


class Launcher:
    """The startd's handle on its launcher process (``gwms.startd.launcher``): started the first
    time a job is spawned, started again for the next job whenever it has died. A launcher's
    death loses its running jobs: each is told (``_launcher_lost``), kills what is left of
    itself and finishes with ``JobResult.failure`` set.

    One per reactor is shared by default (``Launcher.shared``): the startd needs no more, and
    each costs an interpreter."""

    _shared: dict[int, tuple[Any, Launcher]] = {}

    def __init__(self, reactor: Any, argv: list[str] | None = None) -> None:
        self._reactor = reactor
        self._argv = list(argv) if argv else [sys.executable, "-I", "-S", str(LAUNCHER_SCRIPT)]
        self._protocol: _LauncherProtocol | None = None
        self._alive: set[_LauncherProtocol] = set()  # started and not yet ended
        self._next_id = 0
        self.starts = 0  # how many launcher processes were started: 1 unless one died
        self._orphans: set[int] = set()  # wrappers of a dead launcher, possibly our children now
        self._orphan_reaper: LoopingCall | None = None

    @classmethod
    def shared(cls, reactor: Any) -> Launcher:
        entry = cls._shared.get(id(reactor))
        if entry is None or entry[0] is not reactor:
            entry = (reactor, cls(reactor))
            cls._shared[id(reactor)] = entry
        return entry[1]

    @property
    def pid(self) -> int | None:
        """The current launcher process, if one is running."""
        protocol = self._protocol
        if protocol is None or protocol.exited:
            return None
        return protocol.pid

    def spawn(self, job: JobProcess, request: Mapping[str, Any]) -> int:
        """Ask the launcher to start ``job`` (``request``: argv, env, cwd, stdin, stdout, stderr,
        uid, gid, groups); its records go to ``job._on_record``. Returns the job's id."""
        protocol = self._running()
        self._next_id += 1
        job_id = self._next_id
        protocol.jobs[job_id] = job
        protocol.send({"op": "spawn", "id": job_id, **request})
        return job_id

    def kill_wrapper(self, job_id: int) -> None:
        """SIGKILL the job's wrapper (the launcher does it: it alone knows whether that pid is
        still the wrapper). Its end then comes as a ``lost`` record."""
        for protocol in self._alive:
            if job_id in protocol.jobs and not protocol.exited:
                protocol.send({"op": "kill_wrapper", "id": job_id})

    def release(self, job_id: int) -> None:
        """The job has finished: no more records for it, and its wrapper may serve another job
        (once nothing of this one is left)."""
        for protocol in self._alive:
            if protocol.jobs.pop(job_id, None) is not None and not protocol.exited:
                protocol.send({"op": "release", "id": job_id})

    def stop(self) -> None:
        """Close the launcher's input: it SIGKILLs what still runs and exits. The next spawn
        starts a new one."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and not protocol.exited:
            protocol.transport.closeStdin()

    def _running(self) -> _LauncherProtocol:
        protocol = self._protocol
        if protocol is not None and not protocol.exited:
            return protocol
        protocol = _LauncherProtocol(self)
        # Only the locale: it decides how the launcher encodes paths, which must be as here. The
        # jobs get their environment in each request; PYTHON* would be ignored anyway (-I).
        env = {k: v for k, v in os.environ.items() if k in ("LANG", "LANGUAGE") or k.startswith("LC_")}
        self._reactor.spawnProcess(protocol, self._argv[0], self._argv, env=env,
                                   childFDs={0: "w", 1: "r", 2: "r"})
        protocol.pid = protocol.transport.pid
        self._protocol = protocol
        self._alive.add(protocol)
        self.starts += 1
        _log.info("started job launcher {pid}", pid=protocol.pid)
        return protocol

    def _ended(self, protocol: _LauncherProtocol, reason: Failure) -> None:
        self._alive.discard(protocol)
        if self._protocol is protocol:
            self._protocol = None
        jobs, protocol.jobs = protocol.jobs, {}
        pid = protocol.pid
        value = getattr(reason, "value", None)
        how = (f"killed by signal {value.signal}" if getattr(value, "signal", None) is not None
               else f"exit code {getattr(value, 'exitCode', None)}")
        if jobs:
            _log.error("job launcher {pid} ended ({how}) with {n} job(s) running: they are lost",
                       pid=pid, how=how, n=len(jobs))
        else:
            _log.info("job launcher {pid} ended ({how})", pid=pid, how=how)
        for job in jobs.values():
            try:
                job._launcher_lost(f"the job launcher (pid {pid}) ended: {how}")
            except Exception:  # noqa: BLE001
                _log.failure("job {marker}: handling the launcher's end failed", marker=job.marker)
        # Its wrappers are orphans now: reparented to us if the startd is a subreaper (as it is
        # in service), and then ours to reap when they end (an idle one ends at once: its
        # request pipe has closed), or they would stay zombies for the startd's lifetime.
        self._orphans |= protocol.wrappers
        if self._orphans and self._orphan_reaper is None:
            self._orphan_reaper = LoopingCall(self._reap_orphans)
            self._orphan_reaper.clock = self._reactor
            self._orphan_reaper.start(1.0, now=False)

    def _reap_orphans(self) -> None:
        twisted_pids = _twisted_owned_pids()
        for pid in list(self._orphans):
            if pid in twisted_pids:  # reaped by init long ago, the number now Twisted's child's
                self._orphans.discard(pid)
                continue
            try:
                # Safe with a bare pid: a child of ours cannot be reused until we reap it, and
                # waitpid() on anybody else's fails.
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # not (or no longer) our child: init's to reap
            if done:
                self._orphans.discard(pid)
        if not self._orphans and self._orphan_reaper is not None:
            self._orphan_reaper.stop()
            self._orphan_reaper = None


def _ru(value: Any) -> tuple[float, float, int] | None:
    try:
        user, system, maxrss = value
        return float(user), float(system), int(maxrss)
    except (TypeError, ValueError):
        return None


def _optional_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"the identity switch gave a bad {what}: {value!r}")
    return value


def _launch_request(spec: Any, marker: str, sandbox: Path, stdin: Path | None, stdout: Path,
                    stderr: Path) -> dict[str, Any]:
    """What the launcher gets for one job, from the identity switch's LaunchSpec."""
    argv = [os.fspath(a) for a in spec.argv]
    if not argv:
        raise ValueError("the identity switch gave an empty argv")
    # The marker goes in last: whatever the switch did with the environment, the job keeps it.
    env = {str(k): str(v) for k, v in spec.env.items()}
    env[MARKER_VARIABLE] = marker
    groups = getattr(spec, "groups", None)
    return {
        "argv": argv,
        "env": env,
        # Absolute: relative paths mean what they mean here, not in the launcher's directory.
        "cwd": os.path.abspath(sandbox),
        "stdin": os.path.abspath(stdin) if stdin is not None else None,
        "stdout": os.path.abspath(stdout),
        "stderr": os.path.abspath(stderr),
        "uid": _optional_int(getattr(spec, "uid", None), "uid"),
        "gid": _optional_int(getattr(spec, "gid", None), "gid"),
        "groups": None if groups is None else [_optional_int(g, "group") for g in groups],
    }


def check_job_arguments(argv: list[str], marker: str, sample_interval: float) -> None:
    """What every JobProcess (and gwms.testing's fake) refuses to start with."""
    if not argv:
        raise ValueError("a job needs a command: argv is empty")
    if not marker or "\0" in marker or "\n" in marker:
        raise ValueError(f"bad job marker {marker!r}: it must be non-empty, without NUL or newline")
    if sample_interval <= 0:
        raise ValueError(f"sample_interval must be positive, not {sample_interval!r}")


class JobProcess:
    """One job's processes, from spawn to the last descendant.

    ``pid`` (also ``job_pid``) is the job's main process and ``wrapper_pid`` its wrapper (the
    leader of the job's session, a process of the launcher's that serves one job at a time);
    both are known once the launcher has reported the start, shortly after ``start`` (None
    until then, and ``pid`` stays None if the command could not be executed). ``finished``
    fires with a JobResult once the main process has exited AND every process of the job is
    gone (killed); it never errbacks. ``launcher`` defaults to the one shared by every job on
    the reactor."""

    cleanup_poll = 0.01           # first re-check after killing leftovers; doubles up to the max
    cleanup_poll_max = 0.2
    wrapper_patience = 10.0       # s the wrapper gets to report after cleanup starts; then SIGKILL
    give_up_after = 120.0         # s of cleanup after which unkillable processes are logged, not awaited

    def __init__(self, reactor: Any, switch: Any, job: Any, argv: list[str], env: Mapping[str, str],
                 sandbox: Path, stdin: Path | None, stdout: Path, stderr: Path, marker: str,
                 sample_interval: float = 1.0, launcher: Launcher | None = None) -> None:
        check_job_arguments(argv, marker, sample_interval)
        self._reactor = reactor
        self._switch = switch
        self._job = job
        self._argv = list(argv)
        self._env = dict(env)
        self._sandbox = Path(sandbox)
        self._stdin = stdin
        self._stdout = stdout
        self._stderr = stderr
        self.marker = marker
        self._interval = sample_interval
        self._launcher = launcher
        self._job_id: int | None = None

        self.finished: Deferred[JobResult] = Deferred()
        self.pid: int | None = None
        self.job_pid: int | None = None
        self.wrapper_pid: int | None = None
        self._result: JobResult | None = None
        self._waiters: list[Deferred[JobResult]] = []
        self._sampler: LoopingCall | None = None
        self._started_at: float | None = None
        self._ended_at: float | None = None
        # True once the wrapper said "done" or was lost: from then on its pid and session id
        # are no longer a way to find the job (the wrapper may serve another job once released,
        # or have been reaped and its pid reused).
        self._wrapper_done = False
        self._lost = False
        self._lost_status: int | None = None
        self._failure: str | None = None
        self._exit_status: int | None = None
        self._exec_error: str | None = None
        self._reports: list[tuple[float, float, int]] = []
        self._cpu: dict[tuple[int, int], tuple[float, float]] = {}
        self._known: set[tuple[int, int]] = set()
        self._job_key: tuple[int, int] | None = None
        self._wrapper_key: tuple[int, int] | None = None
        self._peak_rss_kb = 0
        self._killing = False
        self._hard_kill: Any = None
        self._cleanup_started: float | None = None
        self._cleanup_call: Any = None
        self._cleanup_delay = self.cleanup_poll
        self._wrapper_killed = False
        self._killed: set[tuple[int, int]] = set()

    # -- public --------------------------------------------------------------------------------

    def start(self) -> None:
        """Hand the job to the launcher (starting that if needed) and start watching it."""
        if self._started_at is not None:
            raise RuntimeError("this job has been started already")
        env = {**self._env, MARKER_VARIABLE: self.marker}
        spec = self._switch.launch(self._job, list(self._argv), env, self._sandbox)
        request = _launch_request(spec, self.marker, self._sandbox, self._stdin, self._stdout, self._stderr)
        launcher = self._launcher if self._launcher is not None else Launcher.shared(self._reactor)
        self._launcher = launcher
        self._started_at = self._reactor.seconds()
        try:
            self._job_id = launcher.spawn(self, request)
        except BaseException:
            self._started_at = None
            raise
        # The first sample one interval from now: a job shorter than that is never sampled
        # (its exact report is all there is to know), which keeps short jobs cheap.
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = self._reactor
        self._sampler.start(self._interval, now=False)

    def kill(self, grace: float = 10.0) -> Deferred[JobResult]:
        """SIGTERM to every process of the job, SIGKILL to whatever is left after ``grace``
        seconds. Fires with the JobResult (as ``finished`` does). Calling it again can only
        shorten the grace."""
        if self._started_at is None:
            raise RuntimeError("kill() before start()")
        if self._result is not None:
            return succeed(self._result)
        deadline = self._reactor.seconds() + max(0.0, grace)
        if self._cleanup_started is not None:
            pass  # the main process is gone and the rest is being SIGKILLed already
        elif not self._killing:
            self._killing = True
            _log.info("killing job {marker} (grace {grace} s)", marker=self.marker, grace=grace)
            self._signal_job(signal.SIGTERM)
            self._hard_kill = self._reactor.callLater(max(0.0, grace), self._kill_hard)
        elif self._hard_kill is not None and self._hard_kill.active() and deadline < self._hard_kill.getTime():
            self._hard_kill.reset(max(0.0, grace))
        waiter: Deferred[JobResult] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def usage(self) -> Usage:
        """Resources used so far: sampled while the job runs, exact (plus samples) at the end."""
        user = sum(c[0] for c in self._cpu.values())
        system = sum(c[1] for c in self._cpu.values())
        peak = self._peak_rss_kb
        for r_user, r_sys, r_rss in self._reports:
            user, system, peak = max(user, r_user), max(system, r_sys), max(peak, r_rss)
        if self._started_at is None:
            wall = 0.0
        else:
            end = self._ended_at if self._ended_at is not None else self._reactor.seconds()
            wall = max(0.0, end - self._started_at)
        return Usage(user_cpu=user, sys_cpu=system, wall=wall, peak_rss_kb=peak)

    # -- tracking ------------------------------------------------------------------------------

    def _sample(self) -> None:
        try:
            if self.wrapper_pid is None or self._wrapper_done or self._cleanup_started is not None:
                return  # not started yet, or ending: the reports and the cleanup scans take over
            if not _HAVE_CHILDREN:
                self._scan()
                return
            wrapper = _read_stat(self.wrapper_pid)
            # Still our wrapper (a session leader whose parent is the launcher)? It may have
            # ended a moment ago, with its last report still on its way.
            if wrapper is None or wrapper.session != self.wrapper_pid or wrapper.ppid != self._launcher.pid:
                return
            self._record(_tree_below(self.wrapper_pid))
        except Exception:  # noqa: BLE001
            # A broken sample must not stop the sampling (a LoopingCall stops on an error).
            _log.failure("job {marker}: sampling /proc failed", marker=self.marker)

    def _record(self, procs: Mapping[int, _Proc]) -> None:
        """Account for the job's live processes (the wrapper excluded) and remember them by
        (pid, start), so that they stay tracked if they are reparented."""
        rss = 0
        for proc in procs.values():
            self._known.add(proc.key)
            self._cpu[proc.key] = (proc.user_cpu, proc.sys_cpu)
            rss += proc.rss_kb
            if proc.pid == self.job_pid and self._job_key is None and self._exit_status is None:
                self._job_key = proc.key
        self._peak_rss_kb = max(self._peak_rss_kb, rss)

    def _scan(self) -> dict[int, _Proc]:
        """One /proc walk: the job's live processes (the wrapper only if it was lost: then it
        is to be killed too), recorded as by ``_record``."""
        table = _proc_table()
        roots: list[int] = []
        sessions: list[int] = []
        if self.wrapper_pid is not None and not self._wrapper_done:
            # Only until the wrapper is done or lost: until then its pid (and so its session id)
            # cannot belong to anybody else.
            roots.append(self.wrapper_pid)
            sessions.append(self.wrapper_pid)
        procs = _job_tree(table, self.marker, roots, sessions, self._known)
        wrapper = procs.get(self.wrapper_pid) if self.wrapper_pid is not None else None
        if wrapper is not None:
            if self._wrapper_key is None and not self._wrapper_done:
                self._wrapper_key = wrapper.key
            if wrapper.key == self._wrapper_key:
                if self._lost:
                    self._known.add(wrapper.key)  # keep it in view: it goes with the job now
                else:
                    del procs[wrapper.pid]  # ours, not the job's: it must live to reap and report
        self._record({pid: proc for pid, proc in procs.items() if proc.key != self._wrapper_key})
        self._reap_orphans(table)
        return procs

    def _reap_orphans(self, table: Mapping[int, _Proc]) -> None:
        # With the startd a subreaper, the job's orphans (the wrapper included) come to us if
        # the launcher died: reap the zombies that are ours to reap, and nobody else's
        # (Twisted's own, or a subprocess'es, would lose their exit status).
        me = os.getpid()
        twisted_pids: set[int] | None = None
        for proc in table.values():
            if proc.state == "Z" and proc.ppid == me and (
                    proc.key in self._known or proc.key == self._wrapper_key
                    or (self.wrapper_pid is not None and proc.session == self.wrapper_pid)):
                if twisted_pids is None:
                    twisted_pids = _twisted_owned_pids()
                if proc.pid in twisted_pids:
                    continue
                try:
                    os.waitpid(proc.pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def _signal_job(self, sig: int) -> None:
        # The job's process group in one go (it cannot miss a process forked a moment ago),
        # then every tracked process one by one (those that left the group). The group id is
        # the main process's pid: only used while that process is alive, so it is still ours.
        if self.job_pid is not None and self._exit_status is None and not self._wrapper_done:
            try:
                os.killpg(self.job_pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self._scan().values():
            if (_signal(proc, sig) and sig == signal.SIGKILL
                    and proc.key not in (self._job_key, self._wrapper_key)):
                self._killed.add(proc.key)

    def _kill_hard(self) -> None:
        self._hard_kill = None
        if self._result is None:
            _log.info("job {marker}: grace over, SIGKILL", marker=self.marker)
            self._begin_cleanup()

    # -- events from the launcher --------------------------------------------------------------

    def _on_record(self, record: dict) -> None:
        if self._result is not None:
            return
        event = record.get("event")
        if event == "start":
            pid, job_pid = record.get("pid"), record.get("job_pid")
            if isinstance(pid, int) and pid > 1:
                self.wrapper_pid = pid
            if isinstance(job_pid, int) and job_pid > 1:
                self.pid = self.job_pid = job_pid
            error = record.get("exec_error")
            self._exec_error = error if isinstance(error, str) else None
            if self._killing and self._hard_kill is not None:
                self._signal_job(signal.SIGTERM)  # kill() came before the job existed
        elif event == "exit":
            status = record.get("status")
            if isinstance(status, int) and self._exit_status is None:
                self._exit_status = status
                self._ended_at = self._reactor.seconds()
            for key in ("main", "children"):
                if (values := _ru(record.get(key))) is not None:
                    self._reports.append(values)
            if record.get("done"):
                self._wrapper_done = True
                if not self._killing and self._cleanup_started is None:
                    self._finish()  # the usual end: nothing left, nothing to look for
                    return
            self._continue_cleanup()
        elif event == "done":
            if (values := _ru(record.get("children"))) is not None:
                self._reports.append(values)
            self._wrapper_done = True
            self._continue_cleanup()
        elif event == "lost":
            status = record.get("status")
            self._wrapper_lost(status if isinstance(status, int) else None,
                               f"its wrapper (pid {self.wrapper_pid}) ended without reporting", pinned=False)
        elif event == "error":
            # Not even forked (the launcher could not): as good as an exec failure.
            self._exec_error = str(record.get("error") or "cannot start the job")
            self._exit_status = 126 << 8
            self._wrapper_done = True
            self._ended_at = self._reactor.seconds()
            self._continue_cleanup()

    def _launcher_lost(self, why: str) -> None:
        if self._result is None:
            # The wrapper was the launcher's child until now, so its pid still names it: one
            # last look through it, to know the job's processes by (pid, start) from now on.
            self._wrapper_lost(None, why, pinned=True)

    def _wrapper_lost(self, status: int | None, why: str, pinned: bool) -> None:
        self._lost = True
        if pinned and self.wrapper_pid is not None and not self._wrapper_done:
            self._scan()
        self._wrapper_done = True
        if self._exit_status is None:
            self._lost_status = status
            self._failure = why
            _log.error("job {marker}: {why}; killing what is left of it", marker=self.marker, why=why)
        if self._ended_at is None:
            self._ended_at = self._reactor.seconds()
        self._continue_cleanup()

    # -- the end -------------------------------------------------------------------------------

    def _continue_cleanup(self) -> None:
        if self._cleanup_started is None:
            self._begin_cleanup()
        else:
            self._cleanup_round()

    def _begin_cleanup(self) -> None:
        if self._cleanup_started is not None:
            return
        self._cleanup_started = self._reactor.seconds()
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        if self._hard_kill is not None and self._hard_kill.active():
            self._hard_kill.cancel()
        self._hard_kill = None
        self._cleanup_round()

    def _cleanup_round(self) -> None:
        if self._result is not None:
            return
        if self._cleanup_call is not None and self._cleanup_call.active():
            self._cleanup_call.cancel()
        self._cleanup_call = None
        # Kill what is left (not the wrapper, unless lost: it must live to reap them and report).
        self._signal_job(signal.SIGKILL)
        left = self._scan()
        if not left and self._wrapper_done:
            self._finish()
            return
        elapsed = self._reactor.seconds() - (self._cleanup_started or 0.0)
        if not self._wrapper_done and elapsed >= self.wrapper_patience and not self._wrapper_killed:
            _log.warn("job {marker}: wrapper {pid} did not report in {s} s, killing it",
                      marker=self.marker, pid=self.wrapper_pid, s=self.wrapper_patience)
            self._wrapper_killed = True
            if self._launcher is not None and self._job_id is not None:
                self._launcher.kill_wrapper(self._job_id)  # its end comes back as "lost"
        if elapsed >= self.give_up_after:
            _log.error("job {marker}: processes {pids} would not die in {s} s; giving up on them",
                       marker=self.marker, pids=sorted(left), s=self.give_up_after)
            self._finish()
            return
        self._cleanup_call = self._reactor.callLater(self._cleanup_delay, self._cleanup_round)
        self._cleanup_delay = min(self._cleanup_delay * 2, self.cleanup_poll_max)

    def _finish(self) -> None:
        if self._launcher is not None and self._job_id is not None:
            self._launcher.release(self._job_id)
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        if self._hard_kill is not None and self._hard_kill.active():
            self._hard_kill.cancel()
        if self._cleanup_call is not None and self._cleanup_call.active():
            self._cleanup_call.cancel()
        exit_code: int | None = None
        exit_signal: int | None = None
        status = self._exit_status if self._exit_status is not None else self._lost_status
        if status is None:
            exit_signal = signal.SIGKILL  # lost with the launcher: it was killed, by us at the latest
        elif os.WIFSIGNALED(status):
            exit_signal = os.WTERMSIG(status)
        else:
            exit_code = os.waitstatus_to_exitcode(status)
        self._result = JobResult(exit_code=exit_code, exit_signal=exit_signal, usage=self.usage(),
                                 leftover_processes_killed=len(self._killed), exec_error=self._exec_error,
                                 failure=self._failure if self._exit_status is None else None)
        _log.info("job {marker} finished: {result}", marker=self.marker, result=self._result)
        self.finished.callback(self._result)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._result)


# ---------------------------------------------------------------------------------------------
# Sandboxes


def _open_dir(dir_fd: int, name: str) -> int:
    """Open ``name`` (a directory, never a symlink) under ``dir_fd`` for listing and make it
    ours to empty. A job may have chmod'ed it 000: then reach it with O_PATH (needs nothing of
    the directory itself) and chmod through /proc/self/fd, still without following links."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        path_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
        finally:
            os.close(path_fd)
        fd = os.open(name, flags, dir_fd=dir_fd)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o700 != 0o700:
        os.fchmod(fd, mode | 0o700)  # write and search: needed to remove its entries
    return fd


def _remove_tree(top_parent: int, top_name: str) -> None:
    # Iterative, one directory descriptor open at a time, climbing back up through ".." and
    # checking it is the directory we came from: a job can nest directories deeper than any
    # recursion or descriptor limit, and nothing here may be redirected out of the tree.
    fd = _open_dir(top_parent, top_name)
    device = os.fstat(fd).st_dev
    stack: list[tuple[str, int, int]] = []  # (name in parent, parent's st_dev, parent's st_ino)
    try:
        while True:
            subdir = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdir = entry.name
                        else:
                            os.unlink(entry.name, dir_fd=fd)  # files, symlinks (never followed), FIFOs...
                    except FileNotFoundError:
                        pass
            if subdir is not None:
                child = _open_dir(fd, subdir)
                st = os.fstat(child)
                if st.st_dev != device:
                    os.close(child)
                    raise OSError(errno.EXDEV, "refusing to remove across a mount point", subdir)
                here = os.fstat(fd)
                stack.append((subdir, here.st_dev, here.st_ino))
                os.close(fd)
                fd = child
                continue
            if not stack:
                break
            name, dev, ino = stack.pop()
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            st = os.fstat(parent)
            os.close(fd)
            fd = parent
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise OSError(errno.ESTALE, "directory moved while it was being removed", name)
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(top_name, dir_fd=top_parent)


def remove_sandbox(path: Path) -> None:
    """``rm -rf path``, robustly: directories a job made unreadable (chmod 000) are opened up
    first, symlinks are removed and never followed (their targets survive), and removal never
    crosses into another file system. A missing path is fine; a symlink at ``path`` itself is
    removed, not its target."""
    path = Path(path)
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            st = os.lstat(path.name, dir_fd=parent)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            _remove_tree(parent, path.name)
        else:
            os.unlink(path.name, dir_fd=parent)
    finally:
        os.close(parent)


def sweep_sandboxes(execute_dir: Path, keep: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Remove every entry of ``execute_dir`` whose name is not in ``keep`` (names, or paths of
    which the last component counts): the startd's cleanup after starters that failed to. One
    that cannot be removed is logged and skipped. Returns what was removed, sorted."""
    execute_dir = Path(execute_dir)
    keep_names = {os.path.basename(os.fspath(k).rstrip("/")) for k in keep}
    removed: list[Path] = []
    for entry in sorted(os.listdir(execute_dir)):
        if entry in keep_names:
            continue
        path = execute_dir / entry
        try:
            remove_sandbox(path)
        except OSError as e:
            _log.error("cannot remove leftover sandbox {path}: {error}", path=str(path), error=e)
            continue
        removed.append(path)
    return removed
