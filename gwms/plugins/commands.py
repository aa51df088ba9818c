"""External commands for the grid plugins (sbatch, squeue, scancel, ssh, ...), run through the
reactor so that a slow batch system never blocks the factory.

A command gets a time limit: past it, the child is sent SIGTERM and, if it lingers, SIGKILL, and
the Deferred fails with :class:`CommandError` saying so. Its output is bounded (a command that
floods stdout is killed rather than filling the factory's memory). A plugin takes a
:data:`Runner` so that its tests can check the exact command lines without running them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

log = Logger()

DEFAULT_TIMEOUT = 60.0
# Seconds between the SIGTERM of a command past its time and its SIGKILL.
KILL_GRACE = 5.0
# Most bytes kept of a command's stdout (and, separately, stderr).
MAX_OUTPUT = 16 * 1024 * 1024


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class CommandError(Exception):
    """A command that could not run, ran past its time, or exited non-zero."""

    def __init__(self, argv: Sequence[str], exit_code: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        how = "failed" if exit_code is None else f"exited {exit_code}"
        detail = stderr.strip()[:500] or "(no error output)"
        super().__init__(f"{self.argv[0] if self.argv else '?'} {how}: {detail}")


# run(argv, timeout, stdin) -> Deferred[CommandResult]; stdin is bytes written to the child.
Runner = Callable[..., "defer.Deferred[CommandResult]"]


class _Collect(protocol.ProcessProtocol):
    def __init__(self, argv: Sequence[str], stdin: bytes | None, done: defer.Deferred[CommandResult]) -> None:
        self.argv = argv
        self.stdin = stdin
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.sizes = {1: 0, 2: 0}
        self.failure: str | None = None  # why we killed it, if we did

    def connectionMade(self) -> None:
        if self.stdin:
            self.transport.write(self.stdin)  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self.sizes:
            return
        self.sizes[fd] += len(data)
        if self.sizes[fd] > MAX_OUTPUT:
            if self.failure is None:
                self.failure = f"more than {MAX_OUTPUT} bytes of output: killed"
                self.kill("KILL")
            return
        (self.out if fd == 1 else self.err).append(data)

    def kill(self, signal: str) -> None:
        try:
            self.transport.signalProcess(signal)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            # It is gone, but what it left behind (sh -c 'sleep 30' leaves the sleep) holds
            # its output open: processEnded would wait for that. Stop reading.
            self.transport.loseConnection()  # type: ignore[union-attr]

    def processExited(self, reason: Any) -> None:
        if self.failure is not None:  # we killed it: do not wait for its leftovers' output either
            self.transport.loseConnection()  # type: ignore[union-attr]

    def processEnded(self, reason: Any) -> None:
        stdout = b"".join(self.out).decode(errors="replace")
        stderr = b"".join(self.err).decode(errors="replace")
        if self.done.called:
            return
        if self.failure is not None:
            self.done.errback(CommandError(self.argv, None, f"{self.failure}; {stderr}".rstrip("; ")))
            return
        code = reason.value.exitCode
        if code is None:  # killed by a signal
            self.done.errback(CommandError(self.argv, None, f"killed by signal {reason.value.signal}: {stderr}"))
            return
        self.done.callback(CommandResult(code, stdout, stderr))


def run_command(reactor: Any, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT, stdin: bytes | None = None,
                env: Mapping[str, str] | None = None) -> defer.Deferred[CommandResult]:
    """Run ``argv`` (no shell) through ``reactor``; fire with its CommandResult whatever its exit
    code, or fail with CommandError if it cannot start or is still running after ``timeout``
    seconds (it is then killed: SIGTERM, then SIGKILL after KILL_GRACE)."""
    argv = [str(a) for a in argv]
    done: defer.Deferred[CommandResult] = defer.Deferred()
    proto = _Collect(argv, stdin, done)
    try:
        reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ if env is None else env),
                             childFDs={0: "w", 1: "r", 2: "r"})
    except OSError as e:
        return defer.fail(CommandError(argv, None, f"did not run: {e}"))

    def too_slow() -> None:
        if proto.failure is None:
            proto.failure = f"no answer in {timeout:g}s: killed"
        proto.kill("TERM")
        timers.append(reactor.callLater(KILL_GRACE, proto.kill, "KILL"))

    timers = [reactor.callLater(timeout, too_slow)]

    def stop_timer(result: Any) -> Any:
        for timer in timers:
            if timer.active():
                timer.cancel()
        return result

    return done.addBoth(stop_timer)


def reactor_runner(reactor: Any) -> Runner:
    """The runner a plugin uses outside tests: :func:`run_command` on ``reactor``."""

    def run(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT, stdin: bytes | None = None
            ) -> defer.Deferred[CommandResult]:
        return run_command(reactor, argv, timeout, stdin)

    return run


def checked(runner: Runner, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT,
            stdin: bytes | None = None) -> defer.Deferred[CommandResult]:
    """Run ``argv``; fire with its result if it exits 0, else fail with CommandError (with its
    stderr)."""

    def check(result: CommandResult) -> CommandResult:
        if result.exit_code != 0:
            raise CommandError(argv, result.exit_code, result.stderr or result.stdout)
        return result

    return defer.maybeDeferred(runner, list(argv), timeout, stdin).addCallback(check)
