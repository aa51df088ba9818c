"""One job as real OS processes: spawn, track the whole process tree, account, kill, clean up.

How a job runs::

    startd (subreaper) --spawn via IIdentitySwitch--> wrapper (session leader, subreaper)
                                                          `--fork/exec--> job (own process group)
                                                                            `--> ... descendants

The *wrapper* is a few lines of Python of our own (``_WRAPPER``) that the identity switch starts
in place of the job. It forks and execs the job, waits for it with ``wait4`` and writes what it
saw as JSON lines into a FIFO whose read end the starter holds:

- ``start``: the job's pid, or why exec failed;
- ``exit``: the job's wait status and rusage when the main process ends;
- ``done``: ``RUSAGE_CHILDREN`` once the wrapper has no children left.

Why a wrapper: Twisted reaps the processes it spawns and gives no rusage, and
``getrusage(RUSAGE_CHILDREN)`` in the startd mixes every job it ever ran. The wrapper is a child
subreaper, so a job's daemonized descendants (double fork, setsid) are reparented to *it*, stay
visible as its descendants, and their CPU time joins its ``RUSAGE_CHILDREN`` when they are killed
and reaped. The wrapper stays alive after the job's main process exits until the starter has
killed every leftover. So CPU times are exact for everything that was reaped by the wrapper,
and ``peak_rss_kb`` is at least the largest single process's high-water mark.

What is sampled: every ``sample_interval`` the starter walks /proc for the job's processes
(descendants of the wrapper, members of its session, holders of ``GWMS_JOB_MARKER=<marker>``)
and records each one's CPU time and the RSS summed over the tree. That gives ``usage()`` while
the job runs, the peak RSS of the whole tree (sampled: a short spike between samples is missed),
and a lower bound for processes the wrapper cannot reap (a marker holder that is no descendant,
or everything if the wrapper was killed). The final figures take, field by field, the larger of
the exact report and the samples: a job that forges its report cannot come out below what was
seen.

The job's environment gets ``GWMS_JOB_MARKER=<marker>``; a process that scrubs its environment
and escapes the tree (only possible if the wrapper dies) is out of reach, as it is for HTCondor
without cgroups.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "MARKER_VARIABLE",
    "JobProcess",
    "JobResult",
    "Usage",
    "become_subreaper",
    "find_processes",
    "remove_sandbox",
    "sweep_sandboxes",
]

MARKER_VARIABLE = "GWMS_JOB_MARKER"
PR_SET_CHILD_SUBREAPER = 36

_log = Logger()
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_KB = (os.sysconf("SC_PAGE_SIZE") // 1024) if hasattr(os, "sysconf") else 4


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
    the command could not be started at all (exit_code is then 127 or 126, as in a shell)."""

    exit_code: int | None
    exit_signal: int | None
    usage: Usage
    leftover_processes_killed: int
    exec_error: str | None = None


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
# The wrapper (runs as the job's identity, in the sandbox, with the job's stdio and environment)

_WRAPPER = r"""
import ctypes, json, os, resource, signal, sys

report_path, argv = sys.argv[1], sys.argv[2:]
# The starter already holds the read end, so this neither blocks nor fails; unlinking at once
# keeps the channel out of the job's sandbox.
out = os.open(report_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
try:
    os.unlink(report_path)
except OSError:
    pass


def send(**record):
    try:
        os.write(out, (json.dumps(record) + "\n").encode())
    except OSError:
        pass  # the starter is gone: nobody left to tell


def ru(r):
    return [r.ru_utime, r.ru_stime, r.ru_maxrss]


if os.getsid(0) != os.getpid():  # the identity switch should have done it
    try:
        os.setsid()
    except OSError:
        pass
try:
    libc = ctypes.CDLL(None, use_errno=True)
    subreaper = libc.prctl(ctypes.c_int(36), ctypes.c_ulong(1), ctypes.c_ulong(0),
                           ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
except Exception:
    subreaper = False

SYNC = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGCONT, signal.SIGSEGV, signal.SIGBUS,
        signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGSYS, signal.SIGTRAP}
# The job may signal its session or us; the wrapper must live to report.
for s in range(1, signal.NSIG):
    if s not in SYNC:
        try:
            signal.signal(s, signal.SIG_IGN)
        except (OSError, ValueError):
            pass

r, w = os.pipe2(os.O_CLOEXEC)  # closed by a successful exec: EOF means the job is running
pid = os.fork()
if pid == 0:
    try:
        os.close(r)
        os.setpgid(0, 0)  # its own group: `kill 0` in a job script must not hit the wrapper
        for s in range(1, signal.NSIG):
            if s not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(s, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.execvpe(argv[0], argv, os.environ)
    except BaseException as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        message = "cannot execute %r: %s" % (argv[0] if argv else "", reason)
        try:
            os.write(w, message.encode())
            os.write(2, ("gwms: " + message + "\n").encode())
        finally:
            os._exit(127 if isinstance(e, FileNotFoundError) else 126)
os.close(w)
try:
    os.setpgid(pid, pid)  # also here, so that it holds before the starter can signal the group
except OSError:
    pass
error = b""
while True:
    chunk = os.read(r, 4096)
    if not chunk:
        break
    error += chunk
os.close(r)
send(event="start", pid=pid, subreaper=subreaper, exec_error=error.decode("utf-8", "replace") or None)

main = None
while True:
    try:
        done, status, usage = os.wait4(-1, 0)
    except ChildProcessError:
        break
    if done == pid:
        main = status
        send(event="exit", status=status, main=ru(usage),
             children=ru(resource.getrusage(resource.RUSAGE_CHILDREN)))
send(event="done", children=ru(resource.getrusage(resource.RUSAGE_CHILDREN)))
os.close(out)
if main is not None and os.WIFSIGNALED(main):
    sig = os.WTERMSIG(main)
    # Die the same death (the starter reads the report; this is for anyone else watching),
    # without dumping a core of the wrapper.
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    except (OSError, ValueError):
        pass
    os._exit(128 + sig)
os._exit(os.waitstatus_to_exitcode(main) if main is not None else 255)
"""


@implementer(IReadDescriptor)
class _ReportReader:
    """Reads the wrapper's JSON lines from the FIFO on the reactor."""

    max_buffer = 1 << 20  # a line longer than this is not one of ours

    def __init__(self, reactor: Any, fd: int, on_record: Callable[[dict], None]) -> None:
        self._reactor = reactor
        self._fd = fd
        self._on_record = on_record
        self._buffer = b""

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "JobReport"

    def doRead(self) -> None:
        while self._fd >= 0:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:
                _log.warn("job report channel failed: {error}", error=e)
                self.close()
                return
            if not chunk:
                self.close()  # the wrapper (the only writer) has exited
                return
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            if len(self._buffer) > self.max_buffer:
                self._buffer = b""
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    _log.warn("ignoring a malformed job report line")
                    continue
                if isinstance(record, dict):
                    self._on_record(record)
        return

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            self._reactor.removeReader(self)
            os.close(self._fd)
            self._fd = -1


class _WrapperProtocol(ProcessProtocol):
    def __init__(self, owner: JobProcess) -> None:
        self._owner = owner

    def connectionMade(self) -> None:
        self._owner._spawned(self.transport.pid)

    def processEnded(self, reason: Failure) -> None:
        self._owner._wrapper_ended(reason)


def _ru(value: Any) -> tuple[float, float, int] | None:
    try:
        user, system, maxrss = value
        return float(user), float(system), int(maxrss)
    except (TypeError, ValueError):
        return None


class JobProcess:
    """One job's processes, from spawn to the last descendant.

    ``pid`` is the process the identity switch spawned (the wrapper: session leader, the root
    of the tree, available right after ``start``); ``job_pid`` is the job's own main process,
    known shortly after. ``finished`` fires with a JobResult once the main process has exited
    AND every tracked descendant is gone (killed); it never errbacks."""

    cleanup_poll = 0.01           # first re-check after killing leftovers; doubles up to the max
    cleanup_poll_max = 0.2
    wrapper_patience = 10.0       # s the wrapper gets to report after cleanup starts; then SIGKILL
    give_up_after = 120.0         # s of cleanup after which unkillable processes are logged, not awaited

    def __init__(self, reactor: Any, switch: Any, job: Any, argv: list[str], env: Mapping[str, str],
                 sandbox: Path, stdin: Path | None, stdout: Path, stderr: Path, marker: str,
                 sample_interval: float = 1.0) -> None:
        if not argv:
            raise ValueError("a job needs a command: argv is empty")
        if not marker or "\0" in marker or "\n" in marker:
            raise ValueError(f"bad job marker {marker!r}: it must be non-empty, without NUL or newline")
        if sample_interval <= 0:
            raise ValueError(f"sample_interval must be positive, not {sample_interval!r}")
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

        self.finished: Deferred[JobResult] = Deferred()
        self.pid: int | None = None
        self.job_pid: int | None = None
        self._result: JobResult | None = None
        self._waiters: list[Deferred[JobResult]] = []
        self._transport: Any = None
        self._fifo: Path | None = None
        self._reader: _ReportReader | None = None
        self._sampler: LoopingCall | None = None
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._wrapper_done = False
        self._draining = False
        self._wrapper_reason: Failure | None = None
        self._exit_status: int | None = None
        self._exec_error: str | None = None
        self._reports: list[tuple[float, float, int]] = []
        self._cpu: dict[tuple[int, int], tuple[float, float]] = {}
        self._known: set[tuple[int, int]] = set()
        self._job_key: tuple[int, int] | None = None
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
        """Spawn the job through the identity switch and start watching it."""
        if self._started_at is not None:
            raise RuntimeError("this job has been started already")
        fifo = self._sandbox / f".gwms-report-{secrets.token_hex(8)}"
        os.mkfifo(fifo, 0o600)
        fd = -1
        try:
            # The wrapper runs as the job's identity: the channel must be that user's (the
            # sandbox's owner) to open, and nobody else's.
            owner = os.stat(self._sandbox).st_uid
            if owner != os.geteuid():
                os.chown(fifo, owner, -1)
            # Non-blocking: a FIFO open for reading would otherwise wait for a writer.
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._reader = _ReportReader(self._reactor, fd, self._on_record)
            self._reactor.addReader(self._reader)
            env = {**self._env, MARKER_VARIABLE: self.marker}
            argv = [sys.executable, "-I", "-S", "-c", _WRAPPER, str(fifo), *self._argv]
            self._fifo = fifo
            self._started_at = self._reactor.seconds()
            self._transport = self._switch.spawn(self._reactor, _WrapperProtocol(self), self._job, argv, env,
                                                 self._sandbox, self._stdin, self._stdout, self._stderr)
        except BaseException:
            self._started_at = None
            self._fifo = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            elif fd >= 0:
                os.close(fd)
            _unlink(fifo)
            raise
        if self.pid is None and getattr(self._transport, "pid", None) is not None:
            self.pid = self._transport.pid
        _log.info("job {marker} started: wrapper pid {pid}", marker=self.marker, pid=self.pid)
        if self._wrapper_done:
            self._begin_cleanup()  # it ended inside spawn()
        else:
            self._sampler = LoopingCall(self._sample)
            self._sampler.clock = self._reactor
            self._sampler.start(self._interval, now=True)

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
            self._scan()
        except Exception:  # noqa: BLE001
            # A broken sample must not stop the sampling (a LoopingCall stops on an error).
            _log.failure("job {marker}: sampling /proc failed", marker=self.marker)

    def _scan(self) -> dict[int, _Proc]:
        """One /proc walk: the job's live processes (without the wrapper), recorded for
        accounting and remembered by (pid, start) so they stay tracked if reparented."""
        table = _proc_table()
        roots: list[int] = []
        sessions: list[int] = []
        if self.pid is not None and not self._wrapper_done:
            # Only while Twisted has not reaped the wrapper: until then its pid (and so its
            # session id) cannot belong to anybody else.
            roots.append(self.pid)
            sessions.append(self.pid)
        procs = _job_tree(table, self.marker, roots, sessions, self._known)
        if self.pid is not None:
            procs.pop(self.pid, None)  # the wrapper is ours, not the job's
        rss = 0
        for proc in procs.values():
            self._known.add(proc.key)
            self._cpu[proc.key] = (proc.user_cpu, proc.sys_cpu)
            rss += proc.rss_kb
            if proc.pid == self.job_pid and self._job_key is None:
                self._job_key = proc.key
        self._peak_rss_kb = max(self._peak_rss_kb, rss)
        self._reap_orphans(table)
        return procs

    def _reap_orphans(self, table: Mapping[int, _Proc]) -> None:
        # With the startd a subreaper, the job's orphans come to us if the wrapper died: reap
        # the zombies that are ours to reap, and nobody else's (Twisted's own, or a
        # subprocess'es, would lose their exit status).
        me = os.getpid()
        twisted_pids: set[int] | None = None
        for proc in table.values():
            if proc.state == "Z" and proc.ppid == me and proc.pid != self.pid and (
                    proc.key in self._known or (self.pid is not None and proc.session == self.pid)):
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
            if _signal(proc, sig) and sig == signal.SIGKILL and proc.key != self._job_key:
                self._killed.add(proc.key)

    def _kill_hard(self) -> None:
        self._hard_kill = None
        if self._result is None:
            _log.info("job {marker}: grace over, SIGKILL", marker=self.marker)
            self._begin_cleanup()

    # -- events from the wrapper ---------------------------------------------------------------

    def _spawned(self, pid: int | None) -> None:
        self.pid = pid

    def _on_record(self, record: dict) -> None:
        event = record.get("event")
        if event == "start":
            pid = record.get("pid")
            if isinstance(pid, int) and pid > 1:
                self.job_pid = pid
                proc = _read_stat(pid)
                if proc is not None and proc.ppid == self.pid:
                    self._job_key = proc.key
                    self._known.add(proc.key)
            error = record.get("exec_error")
            self._exec_error = error if isinstance(error, str) else None
            if self._fifo is not None:
                _unlink(self._fifo)  # the wrapper did; this covers a wrapper that could not
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
            if not self._draining:
                self._begin_cleanup()
        elif event == "done" and (values := _ru(record.get("children"))) is not None:
            self._reports.append(values)

    def _wrapper_ended(self, reason: Failure) -> None:
        # First: Twisted has reaped it, so its pid may be reused from now on.
        self._wrapper_done = True
        self._wrapper_reason = reason
        if self._reader is not None:
            # What it wrote before exiting is in the FIFO, possibly not yet seen by the reactor:
            # read all of it (the final "done" included) before deciding anything.
            self._draining = True
            try:
                self._reader.doRead()
            finally:
                self._draining = False
        if self._ended_at is None:
            self._ended_at = self._reactor.seconds()
        if self._transport is None:
            return  # ended inside spawn(): start() cleans up once it has the transport
        if self._cleanup_started is None:
            self._begin_cleanup()
        else:
            self._cleanup_round()

    # -- the end -------------------------------------------------------------------------------

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
        # Kill what is left (not the wrapper: it must live to reap them and report).
        self._signal_job(signal.SIGKILL)
        left = self._scan()
        if not left and self._wrapper_done:
            self._finish()
            return
        elapsed = self._reactor.seconds() - (self._cleanup_started or 0.0)
        if not self._wrapper_done and elapsed >= self.wrapper_patience and not self._wrapper_killed:
            _log.warn("job {marker}: wrapper {pid} did not report in {s} s, killing it",
                      marker=self.marker, pid=self.pid, s=self.wrapper_patience)
            self._wrapper_killed = True
            try:
                self._transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass  # it ended meanwhile: processEnded is on its way
        if elapsed >= self.give_up_after:
            _log.error("job {marker}: processes {pids} would not die in {s} s; giving up on them",
                       marker=self.marker, pids=sorted(left), s=self.give_up_after)
            self._finish()
            return
        self._cleanup_call = self._reactor.callLater(self._cleanup_delay, self._cleanup_round)
        self._cleanup_delay = min(self._cleanup_delay * 2, self.cleanup_poll_max)

    def _finish(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._fifo is not None:
            _unlink(self._fifo)
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        exit_code: int | None = None
        exit_signal: int | None = None
        if self._exit_status is not None:
            if os.WIFSIGNALED(self._exit_status):
                exit_signal = os.WTERMSIG(self._exit_status)
            else:
                exit_code = os.waitstatus_to_exitcode(self._exit_status)
        else:
            # No report: the wrapper died (or never ran); its own status is all there is.
            value = getattr(self._wrapper_reason, "value", None)
            exit_signal = getattr(value, "signal", None)
            if exit_signal is None:
                exit_code = getattr(value, "exitCode", None)
        self._result = JobResult(exit_code=exit_code, exit_signal=exit_signal, usage=self.usage(),
                                 leftover_processes_killed=len(self._killed), exec_error=self._exec_error)
        _log.info("job {marker} finished: {result}", marker=self.marker, result=self._result)
        self.finished.callback(self._result)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._result)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
