"""A job process that runs nothing: ``FakeJobProcess`` has the API of ``gwms.startd.process.JobProcess``
and "runs" on the reactor's clock, so that a whole pool runs jobs in memory in no real time.

What the fake job does is read from its job ad, so one submit file can drive both a real pool
(a script) and a memory pool (these attributes)::

    +FakeRunTime = 30                  seconds on the clock before it exits (default 1)
    +FakeExitCode = $(Process) % 3     its exit code (default 0)
    +FakeOutputs = "a.txt,b.txt"       files it creates in the sandbox at exit (fake_output_content)
    +FakeStderr = "warning\\n"          what it writes to stderr (default nothing)
    +FakeIgnoreSigterm = true          kill(grace) then takes the whole grace and ends with SIGKILL
    +FakeReportProxy = true            at start and at exit it adds a line to stdout describing the
                                       proxy file X509_USER_PROXY names (report_proxy)

Its stdout is its arguments joined by spaces and a newline, what ``echo "$@"`` prints.

A value of the wrong type is treated like a command that cannot be executed: the job ends at
once with exit code 126 and ``exec_error`` says which attribute was wrong.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed

from gwms import classads
from gwms.startd.process import JobResult, Usage, check_job_arguments

__all__ = ["FAKE_PEAK_RSS_KB", "FakeJobProcess", "fake_output_content", "report_proxy"]

# Above Linux's largest pid_max (2**22): a fake pid can never name a real process, so nothing
# that gets hold of one can signal somebody else's process by mistake.
_PIDS = itertools.count(2**22 + 1)
FAKE_PEAK_RSS_KB = 10240
# The share of wall time a fake job spends on the CPU (user, system): "busy, a little I/O".
_USER_SHARE, _SYS_SHARE = 0.9, 0.05


def fake_output_content(job: Any, name: str) -> bytes:
    """What a fake job writes into each of its ``+FakeOutputs`` files."""
    return f"output {name} of job {job.get('ClusterId')}.{job.get('ProcId')}\n".encode()


def report_proxy(env: Mapping[str, str], when: str) -> str:
    """The line a ``+FakeReportProxy`` job writes: ``proxy at <when>: path=... mode=600
    uid=... gid=... subject=<leaf DN> identity=<end-entity DN> limited=<bool> notAfter=<epoch>``
    (``proxy at <when>: none`` without X509_USER_PROXY, ``... error=...`` if it cannot read it)."""
    from gwms.credentials import x509

    path = env.get("X509_USER_PROXY")
    if not path:
        return f"proxy at {when}: none\n"
    try:
        st = os.stat(path)
        cred = x509.load_credential(path)
        info = x509.inspect_chain([cred.cert, *cred.chain])
    except (OSError, x509.CredentialError) as e:
        return f"proxy at {when}: path={path} error={e}\n"
    return (f"proxy at {when}: path={path} mode={st.st_mode & 0o777:o} uid={st.st_uid} gid={st.st_gid} "
            f"key={cred.key is not None} subject={info.subject} identity={info.identity} "
            f"limited={info.limited} notAfter={int(info.not_after.timestamp())}\n")


class _BadFakeAttribute(ValueError):
    pass


def _number(job: Any, attribute: str, default: float) -> float:
    if attribute not in job:
        return default
    value = classads.evaluate(job, attribute)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _BadFakeAttribute(f"{attribute} must be a non-negative number, not {value!r}")
    return value


def _text(job: Any, attribute: str) -> str:
    if attribute not in job:
        return ""
    value = classads.evaluate(job, attribute)
    if not isinstance(value, str):
        raise _BadFakeAttribute(f"{attribute} must be a string, not {value!r}")
    return value


class FakeJobProcess:
    """One job that only pretends to run; same constructor, attributes and methods as JobProcess.

    ``finished`` fires with a JobResult (never errbacks), as do the Deferreds ``kill`` returns.
    ``pid`` and ``job_pid`` are fake numbers that no real process can have."""

    def __init__(self, reactor: Any, switch: Any, job: Any, argv: list[str], env: Mapping[str, str],
                 sandbox: Path, stdin: Path | None, stdout: Path, stderr: Path, marker: str,
                 sample_interval: float = 1.0) -> None:
        # The same argument checks as the real one: code that passes the fake must pass it too.
        check_job_arguments(argv, marker, sample_interval)
        self._reactor = reactor
        self._switch = switch
        self._job = job
        self._argv = list(argv)
        self._env = dict(env)
        self._sandbox = Path(sandbox)
        self._stdin = stdin
        self._stdout = Path(stdout)
        self._stderr = Path(stderr)
        self.marker = marker
        self.finished: Deferred[JobResult] = Deferred()
        self.pid: int | None = None
        self.job_pid: int | None = None
        self._result: JobResult | None = None
        self._waiters: list[Deferred[JobResult]] = []
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._exit: Any = None        # the DelayedCall of the natural exit
        self._hard_kill: Any = None   # the DelayedCall of SIGKILL after the grace

    # -- public --------------------------------------------------------------------------------

    def start(self) -> None:
        """Write stdout and stderr as a started job would, and schedule its exit on the clock."""
        if self._started_at is not None:
            raise RuntimeError("this job has been started already")
        self._started_at = self._reactor.seconds()
        self.pid = next(_PIDS)
        self.job_pid = self.pid
        try:
            run_time = _number(self._job, "FakeRunTime", 1.0)
            exit_code = int(_number(self._job, "FakeExitCode", 0)) % 256
            stderr = _text(self._job, "FakeStderr")
            _text(self._job, "FakeOutputs")  # checked now, used at exit
        except _BadFakeAttribute as e:
            # As a real job whose command cannot be executed: it starts, and ends at once.
            self._write(self._stdout, b"")
            self._write(self._stderr, f"gwms: cannot execute fake job: {e}\n".encode())
            self._exit = self._reactor.callLater(0, self._end, 126, None, str(e))
            return
        stdout = " ".join(self._argv[1:]) + "\n"
        if self._reports_proxy():
            stdout += report_proxy(self._env, "start")
        self._write(self._stdout, stdout.encode())
        self._write(self._stderr, stderr.encode())
        self._exit = self._reactor.callLater(run_time, self._exit_normally, exit_code)

    def _reports_proxy(self) -> bool:
        return "FakeReportProxy" in self._job and classads.evaluate(self._job, "FakeReportProxy") is True

    def kill(self, grace: float = 10.0) -> Deferred[JobResult]:
        """SIGTERM now; a job with ``+FakeIgnoreSigterm`` lives on until SIGKILL after ``grace``.
        Fires with the JobResult. Calling it again can only shorten the grace."""
        if self._started_at is None:
            raise RuntimeError("kill() before start()")
        if self._result is not None:
            return succeed(self._result)
        grace = max(0.0, grace)
        if "FakeIgnoreSigterm" in self._job and classads.evaluate(self._job, "FakeIgnoreSigterm") is True:
            if self._hard_kill is None:
                self._hard_kill = self._reactor.callLater(grace, self._end, None, signal.SIGKILL)
            elif self._hard_kill.active() and self._reactor.seconds() + grace < self._hard_kill.getTime():
                self._hard_kill.reset(grace)
        elif self._hard_kill is None:
            # Like the real one, the result comes on a later turn of the reactor, not inside kill().
            self._hard_kill = self._reactor.callLater(0, self._end, None, signal.SIGTERM)
        waiter: Deferred[JobResult] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def usage(self) -> Usage:
        """Plausible figures: most of the wall time on the CPU, a constant resident set."""
        if self._started_at is None:
            return Usage(user_cpu=0.0, sys_cpu=0.0, wall=0.0, peak_rss_kb=0)
        end = self._ended_at if self._ended_at is not None else self._reactor.seconds()
        wall = max(0.0, end - self._started_at)
        return Usage(user_cpu=round(wall * _USER_SHARE, 3), sys_cpu=round(wall * _SYS_SHARE, 3), wall=wall,
                     peak_rss_kb=FAKE_PEAK_RSS_KB)

    # -- the end -------------------------------------------------------------------------------

    def _exit_normally(self, exit_code: int) -> None:
        for name in (n.strip() for n in _text(self._job, "FakeOutputs").split(",")):
            if name:
                self._write(self._sandbox / os.path.basename(name), fake_output_content(self._job, name))
        if self._reports_proxy() and self._stdout != Path(os.devnull):
            try:
                with open(self._stdout, "ab") as f:
                    f.write(report_proxy(self._env, "exit").encode())
            except FileNotFoundError:  # the sandbox is gone already
                pass
        self._end(exit_code, None)

    def _end(self, exit_code: int | None, exit_signal: int | None, exec_error: str | None = None) -> None:
        if self._result is not None:
            return
        for call in (self._exit, self._hard_kill):
            if call is not None and call.active():
                call.cancel()
        self._ended_at = self._reactor.seconds()
        self._result = JobResult(exit_code=exit_code, exit_signal=exit_signal, usage=self.usage(),
                                 leftover_processes_killed=0, exec_error=exec_error)
        self.finished.callback(self._result)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._result)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        # The starter may already have removed the sandbox (a job killed as its claim ended):
        # a real process would have nothing left to write into either.
        # O_NOFOLLOW and mode 0600 as the real job's stdio: a symlink in the sandbox is not followed.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "wb") as f:
            f.write(data)
