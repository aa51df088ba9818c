"""gwms.plugins.commands: external commands through the reactor, with a time limit and bounded
output. The process protocol is driven by hand on a MemoryReactorClock; one test runs a real
process on the real reactor."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, task
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from gwms.plugins import commands
from gwms.plugins.commands import (
    KILL_GRACE,
    MAX_OUTPUT,
    CommandError,
    CommandResult,
    checked,
    reactor_runner,
    run_command,
)


class FakeProcess:
    """The process transport a ProcessProtocol sees: records what it is asked to do."""

    def __init__(self) -> None:
        self.pid: int | None = 4242
        self.written: list[bytes] = []
        self.stdin_closed = False
        self.pipes_closed = False
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        assert not self.stdin_closed, "write after closeStdin"
        self.written.append(data)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def loseConnection(self) -> None:
        self.stdin_closed = self.pipes_closed = True

    def signalProcess(self, signal: str) -> None:
        if self.pid is None:  # what Twisted does once the child is reaped
            raise error.ProcessExitedAlready()
        self.signals.append(signal)


@dataclass
class Spawned:
    proto: Any
    executable: str
    args: list[str]
    env: dict[str, str]
    child_fds: dict[int, str]
    process: FakeProcess = field(default_factory=FakeProcess)

    def output(self, fd: int, data: bytes) -> None:
        self.proto.childDataReceived(fd, data)

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        """The child exits (reaped: no more signals), its pipes still open."""
        self.process.pid = None
        reason = error.ProcessDone(0) if code == 0 and signal is None else error.ProcessTerminated(code, signal)
        self.proto.processExited(Failure(reason))
        self._reason = reason

    def end(self, code: int | None = 0, signal: int | None = None) -> None:
        """The child has exited and all its pipes are closed: processEnded."""
        if self.process.pid is not None:
            self.exit(code, signal)
        self.proto.processEnded(Failure(self._reason))


class ProcessReactor(MemoryReactorClock):
    """MemoryReactorClock with a spawnProcess that records the call and, like Twisted's,
    connects the protocol to its (fake) process before returning."""

    def __init__(self, spawn_error: Exception | None = None) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []
        self.spawn_error = spawn_error

    def spawnProcess(self, processProtocol: Any, executable: str, args: Any = (), env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: bool = False,
                     childFDs: Any = None) -> FakeProcess:
        if self.spawn_error is not None:
            raise self.spawn_error
        spawned = Spawned(processProtocol, executable, list(args), env, childFDs)
        self.spawned.append(spawned)
        processProtocol.makeConnection(spawned.process)
        return spawned.process


def outcome(d: defer.Deferred) -> Any:
    """What ``d`` fired with (a Failure if it failed); fails the test if it has not fired."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def not_fired(d: defer.Deferred) -> bool:
    out: list[Any] = []
    d.addBoth(lambda r: out.append(r) or r)
    return not out


def command_error(d: defer.Deferred) -> CommandError:
    result = outcome(d)
    assert isinstance(result, Failure), result
    assert result.check(CommandError), result
    return result.value


# ------------------------------------------------------------------------------------------
# run_command


def test_argv_env_and_pipes_are_handed_to_spawn_process():
    reactor = ProcessReactor()
    run_command(reactor, ["sbatch", "--parsable", 42, Path("/tmp/job.sh")], timeout=5, env={"PATH": "/opt/slurm"})
    (spawned,) = reactor.spawned
    assert spawned.executable == "sbatch"
    assert spawned.args == ["sbatch", "--parsable", "42", "/tmp/job.sh"]  # every word a str
    assert spawned.env == {"PATH": "/opt/slurm"}
    assert spawned.child_fds == {0: "w", 1: "r", 2: "r"}


def test_without_env_the_child_gets_the_factorys_environment(monkeypatch):
    monkeypatch.setenv("GWMS_TEST_MARK", "here")
    reactor = ProcessReactor()
    run_command(reactor, ["squeue"])
    (spawned,) = reactor.spawned
    assert spawned.env["GWMS_TEST_MARK"] == "here"
    assert spawned.env is not os.environ  # a copy: the child cannot change the factory's


def test_stdin_is_written_then_closed():
    reactor = ProcessReactor()
    run_command(reactor, ["ssh", "host", "cat > job.sh"], stdin=b"#!/bin/sh\necho hi\n")
    (spawned,) = reactor.spawned
    assert spawned.process.written == [b"#!/bin/sh\necho hi\n"]
    assert spawned.process.stdin_closed


def test_without_stdin_it_is_closed_at_once():
    reactor = ProcessReactor()
    run_command(reactor, ["squeue"])
    (spawned,) = reactor.spawned
    assert spawned.process.written == []
    assert spawned.process.stdin_closed  # a command that reads stdin sees EOF, never hangs


def test_exit_code_and_outputs_are_collected_and_the_timer_is_cancelled():
    reactor = ProcessReactor()
    d = run_command(reactor, ["sbatch"], timeout=30)
    (spawned,) = reactor.spawned
    assert [call.getTime() for call in reactor.getDelayedCalls()] == [30]
    spawned.output(1, b"123")
    spawned.output(2, b"sbatch: warning: ")
    spawned.output(1, b"45\n")
    spawned.output(2, b"odd \xff byte\n")
    spawned.output(3, b"not a pipe we asked for\n")
    assert not_fired(d)

    spawned.end(3)

    assert outcome(d) == CommandResult(3, "12345\n", "sbatch: warning: odd \ufffd byte\n")
    assert reactor.getDelayedCalls() == []
    assert spawned.process.signals == []


def test_exit_code_zero():
    reactor = ProcessReactor()
    d = run_command(reactor, ["true"])
    reactor.spawned[0].end(0)
    assert outcome(d) == CommandResult(0, "", "")
    assert reactor.getDelayedCalls() == []


def test_past_its_time_the_command_gets_term_then_kill_and_fails():
    reactor = ProcessReactor()
    d = run_command(reactor, ["squeue", "--noheader"], timeout=2)
    (spawned,) = reactor.spawned
    spawned.output(2, b"slurm_load_jobs: retrying\n")

    reactor.advance(1.9)
    assert spawned.process.signals == []
    reactor.advance(0.1)
    assert spawned.process.signals == ["TERM"]
    assert not_fired(d)  # it may still be stopping
    reactor.advance(KILL_GRACE - 0.1)
    assert spawned.process.signals == ["TERM"]
    reactor.advance(0.1)
    assert spawned.process.signals == ["TERM", "KILL"]
    assert not_fired(d)

    spawned.end(None, 9)

    e = command_error(d)
    assert e.exit_code is None
    assert e.argv == ["squeue", "--noheader"]
    assert "no answer in 2s: killed" in str(e)
    assert str(e).startswith("squeue failed: ")
    assert "slurm_load_jobs: retrying" in str(e)  # what it said before it went quiet
    assert reactor.getDelayedCalls() == []


def test_a_command_that_stops_on_term_is_not_killed_and_nothing_stays_scheduled():
    reactor = ProcessReactor()
    d = run_command(reactor, ["sacct"], timeout=1.5)
    (spawned,) = reactor.spawned
    reactor.advance(1.5)
    assert spawned.process.signals == ["TERM"]

    spawned.end(None, 15)

    assert "no answer in 1.5s: killed" in str(command_error(d))
    assert reactor.getDelayedCalls() == []  # the KILL is cancelled
    reactor.advance(KILL_GRACE)
    assert spawned.process.signals == ["TERM"]


def test_a_killed_command_whose_leftovers_hold_its_output_open_is_not_waited_for():
    # sh -c 'sleep 30': TERM ends sh, but the sleep it started still holds stdout and stderr.
    reactor = ProcessReactor()
    d = run_command(reactor, ["sh", "-c", "sleep 30"], timeout=1)
    (spawned,) = reactor.spawned
    reactor.advance(1)
    assert spawned.process.signals == ["TERM"]

    spawned.exit(None, 15)

    assert spawned.process.pipes_closed
    spawned.end(None, 15)  # what closing the pipes leads to
    assert "no answer in 1s" in str(command_error(d))


def test_a_command_that_exited_but_left_something_holding_its_output_fails_at_its_time():
    reactor = ProcessReactor()
    d = run_command(reactor, ["sh", "-c", "sleep 300 & echo started"], timeout=10)
    (spawned,) = reactor.spawned
    spawned.output(1, b"started\n")
    spawned.exit(0)
    assert not spawned.process.pipes_closed  # it exited by itself: its output may still come
    assert not_fired(d)

    reactor.advance(10)

    assert spawned.process.signals == []  # nothing left to signal
    assert spawned.process.pipes_closed
    spawned.end(0)
    assert "no answer in 10s" in str(command_error(d))


def test_output_beyond_the_limit_kills_the_command(monkeypatch):
    monkeypatch.setattr(commands, "MAX_OUTPUT", 100)
    reactor = ProcessReactor()
    d = run_command(reactor, ["squeue"], timeout=60)
    (spawned,) = reactor.spawned
    spawned.output(1, b"x" * 100)
    spawned.output(2, b"e" * 100)  # stdout and stderr are counted apart
    assert spawned.process.signals == []

    spawned.output(1, b"y")
    assert spawned.process.signals == ["KILL"]
    spawned.output(1, b"z" * 1000)  # what was already in the pipe
    assert spawned.process.signals == ["KILL"]  # killed once

    spawned.end(None, 9)

    e = command_error(d)
    assert "more than 100 bytes of output: killed" in str(e)
    assert reactor.getDelayedCalls() == []


def test_the_real_output_limit_is_sixteen_megabytes():
    assert MAX_OUTPUT == 16 * 1024 * 1024
    reactor = ProcessReactor()
    d = run_command(reactor, ["squeue"])
    (spawned,) = reactor.spawned
    spawned.output(1, b"x" * MAX_OUTPUT)
    assert spawned.process.signals == []
    spawned.output(1, b"x")
    assert spawned.process.signals == ["KILL"]
    spawned.end(None, 9)
    assert f"more than {MAX_OUTPUT} bytes of output" in str(command_error(d))


def test_a_command_killed_by_a_signal_fails():
    reactor = ProcessReactor()
    d = run_command(reactor, ["sbatch"])
    (spawned,) = reactor.spawned
    spawned.output(2, b"Segmentation fault\n")
    spawned.end(None, 11)
    e = command_error(d)
    assert e.exit_code is None
    assert str(e) == "sbatch failed: killed by signal 11: Segmentation fault"
    assert reactor.getDelayedCalls() == []


def test_a_command_that_cannot_start_fails_with_did_not_run():
    reactor = ProcessReactor(spawn_error=FileNotFoundError(2, "No such file or directory"))
    d = run_command(reactor, ["sbatch", "job.sh"])
    e = command_error(d)
    assert e.argv == ["sbatch", "job.sh"]
    assert e.exit_code is None
    assert str(e).startswith("sbatch failed: did not run: ")
    assert "No such file or directory" in str(e)
    assert reactor.getDelayedCalls() == []


def test_command_error_message():
    assert str(CommandError(["scancel", "1"], 1, "")) == "scancel exited 1: (no error output)"
    assert str(CommandError([], None, " boom \n")) == "? failed: boom"
    long = CommandError(["squeue"], 2, "x" * 2000)
    assert str(long) == "squeue exited 2: " + "x" * 500
    assert long.stderr == "x" * 2000  # the whole of it is kept


# ------------------------------------------------------------------------------------------
# checked and reactor_runner


class Runner:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, argv: Any, timeout: float, stdin: bytes | None) -> Any:
        self.calls.append((argv, timeout, stdin))
        if isinstance(self.answer, Exception):
            raise self.answer
        return defer.succeed(self.answer)


def test_checked_passes_a_zero_exit_through():
    runner = Runner(CommandResult(0, "42\n", "a warning"))
    assert outcome(checked(runner, ("sbatch", "x.sh"), 7, b"in")) == CommandResult(0, "42\n", "a warning")
    assert runner.calls == [(["sbatch", "x.sh"], 7, b"in")]


def test_checked_fails_on_non_zero_with_stderr():
    runner = Runner(CommandResult(1, "", "sbatch: error: invalid partition specified: nope\n"))
    e = command_error(checked(runner, ["sbatch", "x.sh"]))
    assert (e.argv, e.exit_code) == (["sbatch", "x.sh"], 1)
    assert str(e) == "sbatch exited 1: sbatch: error: invalid partition specified: nope"
    assert runner.calls == [(["sbatch", "x.sh"], commands.DEFAULT_TIMEOUT, None)]


def test_checked_takes_stdout_when_stderr_is_empty():
    e = command_error(checked(Runner(CommandResult(2, "usage: squeue ...\n", "")), ["squeue"]))
    assert str(e) == "squeue exited 2: usage: squeue ..."


def test_checked_turns_a_runner_that_raises_into_a_failure():
    e = command_error(checked(Runner(CommandError(["ssh"], None, "did not run: no ssh")), ["ssh"]))
    assert "no ssh" in str(e)


def test_reactor_runner_runs_through_the_reactor():
    reactor = ProcessReactor()
    run = reactor_runner(reactor)
    d = run(["scancel", "7"], 3, b"data")
    (spawned,) = reactor.spawned
    assert spawned.args == ["scancel", "7"]
    assert spawned.process.written == [b"data"]
    assert [call.getTime() for call in reactor.getDelayedCalls()] == [3]
    spawned.end(0)
    assert outcome(d) == CommandResult(0, "", "")


# ------------------------------------------------------------------------------------------
# One real process on the real reactor


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest_twisted.inlineCallbacks
def test_a_real_command_past_its_time_is_killed_and_not_waited_for():
    from twisted.internet import reactor

    class Watching:
        """The real reactor, keeping the process transports it makes (their pids)."""

        def __init__(self) -> None:
            self.processes: list[Any] = []

        def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
            process = reactor.spawnProcess(*args, **kwargs)
            self.processes.append((process, process.pid))
            return process

        def callLater(self, *args: Any, **kwargs: Any) -> Any:
            return reactor.callLater(*args, **kwargs)

    watching = Watching()
    started = time.monotonic()
    d = run_command(watching, ["sh", "-c", "sleep 30"], timeout=0.3)
    ((_, pid),) = watching.processes
    leftovers: list[int] = []
    # dash does not exec the last command of -c: sh waits for a sleep of its own, which
    # outlives sh and holds its output pipes.
    while not leftovers and time.monotonic() - started < 0.25:
        leftovers = _children(pid)
        yield task.deferLater(reactor, 0.01, lambda: None)
    try:
        with pytest.raises(CommandError, match=r"no answer in 0\.3s: killed"):
            yield d
        assert time.monotonic() - started < 5
        assert not Path(f"/proc/{pid}").exists()
    finally:
        for leftover in leftovers:
            try:
                os.kill(leftover, 9)
            except ProcessLookupError:
                pass
