"""The starter's job processes: real processes, tracked as a tree, accounted, killed, cleaned up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from zope.interface import implementer
from zope.interface.verify import verifyObject

from gwms.interfaces import IIdentitySwitch
from gwms.plugins.identity import JobIdentity, LaunchSpec, NoIdentitySwitch
from gwms.startd.process import (
    JobProcess,
    JobResult,
    Launcher,
    find_processes,
    remove_sandbox,
    sweep_sandboxes,
)
from gwms.testing.polling import wait_until

SLEEP = shutil.which("sleep") or "/bin/sleep"
PATH = os.environ.get("PATH", "/usr/bin:/bin")


def marker_holders(marker: str) -> set[int]:
    """A /proc scan of our own, independent of find_processes."""
    entry = f"GWMS_JOB_MARKER={marker}".encode()
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if entry in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                    found.add(int(name))
            except OSError:
                pass
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def within(d: Deferred, seconds: float = 10.0) -> Deferred:
    """``d``'s result in a new Deferred that fails after ``seconds`` instead of hanging."""
    out: Deferred = Deferred()

    def forward(result: Any) -> Any:
        if not out.called:
            out.callback(result)
        return result

    d.addBoth(forward)
    timer = reactor.callLater(seconds, lambda: out.called or out.errback(
        AssertionError(f"no result after {seconds} s")))
    out.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
    return out


def _or_false(predicate: Callable[[], Any]) -> Any:
    try:
        return predicate()
    except FileNotFoundError:  # the launcher opens the job's files as the job starts, not before
        return False


@inlineCallbacks
def until(predicate: Callable[[], Any], what: str, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not (value := _or_false(predicate)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)
    return value


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    path = tmp_path / "sandbox"
    path.mkdir()
    return path


def start_job(sandbox: Path, argv: list[str], env: dict[str, str] | None = None, stdin: Path | None = None,
              stdout: str = "job.out", stderr: str = "job.err", sample_interval: float = 1.0,
              launcher: Launcher | None = None, switch: Any = None) -> JobProcess:
    job = JobProcess(reactor, switch or NoIdentitySwitch(), {}, argv, {"PATH": PATH} if env is None else env,
                     sandbox, stdin, sandbox / stdout, sandbox / stderr, marker=f"test-{uuid.uuid4().hex}",
                     sample_interval=sample_interval, launcher=launcher)
    job.start()
    return job


@inlineCallbacks
def run_job(sandbox: Path, argv: list[str], **kwargs: Any):
    job = start_job(sandbox, argv, **kwargs)
    result = yield within(job.finished)
    assert isinstance(result, JobResult)
    # Whatever the job was, nothing of it is left.
    assert find_processes(job.marker, [job.pid]) == set()
    assert marker_holders(job.marker) == set()
    return job, result


@pytest_twisted.inlineCallbacks
def test_exit_code_is_recorded(sandbox):
    _, result = yield run_job(sandbox, ["sh", "-c", "exit 3"])
    assert (result.exit_code, result.exit_signal) == (3, None)
    assert result.leftover_processes_killed == 0


@pytest_twisted.inlineCallbacks
def test_death_by_signal_is_recorded_as_exit_signal(sandbox):
    _, result = yield run_job(sandbox, ["sh", "-c", "kill -KILL $$"])
    assert (result.exit_code, result.exit_signal) == (None, signal.SIGKILL)
    assert (sandbox / "job.err").read_text() == ""  # the wrapper mirrored it quietly


@pytest_twisted.inlineCallbacks
def test_stdout_and_stderr_go_to_their_files_and_stdin_is_read_from_a_file(sandbox):
    (sandbox / "in.txt").write_text("hello world\n")
    _, result = yield run_job(sandbox, ["sh", "-c", 'read line; echo "got $line"; echo oops >&2'],
                              stdin=sandbox / "in.txt")
    assert result.exit_code == 0
    assert (sandbox / "job.out").read_text() == "got hello world\n"
    assert (sandbox / "job.err").read_text() == "oops\n"
    assert stat.S_IMODE((sandbox / "job.out").stat().st_mode) == 0o600
    assert stat.S_IMODE((sandbox / "job.err").stat().st_mode) == 0o600


@pytest_twisted.inlineCallbacks
def test_stdout_and_stderr_to_one_file_share_it_without_overwriting(sandbox):
    _, result = yield run_job(sandbox, ["sh", "-c", "echo one; echo two >&2; echo three"],
                              stdout="both.txt", stderr="both.txt")
    assert result.exit_code == 0
    assert (sandbox / "both.txt").read_text() == "one\ntwo\nthree\n"


@pytest_twisted.inlineCallbacks
def test_argv_with_spaces_and_quotes_is_passed_intact(sandbox):
    args = ["two words", 'double "quoted"', "it's", "", "$HOME", "*", "back\\slash", "tab\there"]
    _, result = yield run_job(sandbox, [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *args])
    assert result.exit_code == 0
    assert json.loads((sandbox / "job.out").read_text()) == args


@pytest_twisted.inlineCallbacks
def test_environment_is_passed_with_the_job_marker_and_nothing_else(sandbox, monkeypatch):
    monkeypatch.setenv("GWMS_TEST_STARTD_ONLY", "1")
    job, result = yield run_job(sandbox, [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
                                env={"PATH": PATH, "FOO": "bar baz", "EMPTY": ""})
    assert result.exit_code == 0
    seen = json.loads((sandbox / "job.out").read_text())
    assert seen["FOO"] == "bar baz" and seen["EMPTY"] == ""
    assert seen["GWMS_JOB_MARKER"] == job.marker
    assert "GWMS_TEST_STARTD_ONLY" not in seen


@pytest_twisted.inlineCallbacks
def test_a_command_that_cannot_be_executed_exits_127_with_the_reason(sandbox):
    _, result = yield run_job(sandbox, ["gwms-no-such-command"])
    assert result.exit_code == 127
    assert "gwms-no-such-command" in result.exec_error and "No such file" in result.exec_error
    assert "cannot execute" in (sandbox / "job.err").read_text()


@pytest_twisted.inlineCallbacks
def test_a_setsid_daemon_left_behind_by_a_shell_job_is_killed(sandbox):
    _, result = yield run_job(sandbox, ["sh", "-c", f'(setsid sh -c "{SLEEP} 300" &) ; exit 0'])
    assert result.exit_code == 0
    assert result.leftover_processes_killed >= 1


@pytest_twisted.inlineCallbacks
def test_a_python_double_fork_daemon_without_the_marker_is_killed(sandbox):
    # The grandchild sheds the marker with its environment: only the process tree (the
    # wrapper is a subreaper, so the orphan is reparented to it) keeps it in view.
    script = f"""
import os
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid:
        os.write(w, str(pid).encode())
        os._exit(0)
    os.execve({SLEEP!r}, ["sleep", "300"], {{}})
os.close(w)
grandchild = int(os.read(r, 64))
os.wait()
print(grandchild, flush=True)
"""
    _, result = yield run_job(sandbox, [sys.executable, "-c", script])
    assert result.exit_code == 0
    assert result.leftover_processes_killed >= 1
    grandchild = int((sandbox / "job.out").read_text())
    assert not is_running(grandchild)


@pytest_twisted.inlineCallbacks
def test_kill_sends_sigkill_after_grace_to_a_job_that_ignores_sigterm(sandbox):
    job = start_job(sandbox, ["sh", "-c", f"trap '' TERM; echo ready; {SLEEP} 300; echo survived"])
    yield until(lambda: (sandbox / "job.out").read_text() == "ready\n", "the job to ignore SIGTERM")
    started = time.monotonic()
    result = yield within(job.kill(grace=0.5))
    elapsed = time.monotonic() - started
    assert (result.exit_code, result.exit_signal) == (None, signal.SIGKILL)
    assert 0.45 <= elapsed < 5
    assert (yield job.finished) is result
    assert find_processes(job.marker, [job.pid]) == set() and marker_holders(job.marker) == set()
    assert "survived" not in (sandbox / "job.out").read_text()


@pytest_twisted.inlineCallbacks
def test_kill_ends_a_job_that_obeys_sigterm_without_waiting_for_grace(sandbox):
    job = start_job(sandbox, ["sh", "-c", f"echo ready; exec {SLEEP} 300"])
    yield until(lambda: (sandbox / "job.out").read_text() == "ready\n", "the job to start")
    started = time.monotonic()
    result = yield within(job.kill(grace=30))
    assert (result.exit_code, result.exit_signal) == (None, signal.SIGTERM)
    assert time.monotonic() - started < 5
    assert result.leftover_processes_killed == 0


@pytest_twisted.inlineCallbacks
def test_cpu_time_of_a_busy_job_is_accounted(sandbox):
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5:\n    sum(range(20000))\n"
    _, result = yield run_job(sandbox, [sys.executable, "-c", burn])
    assert result.exit_code == 0
    assert result.usage.user_cpu >= 0.3
    assert result.usage.wall >= result.usage.user_cpu * 0.5


@pytest_twisted.inlineCallbacks
def test_peak_memory_of_a_job_is_accounted(sandbox):
    _, result = yield run_job(sandbox, [sys.executable, "-c", "b = b'x' * (60 << 20)"])
    assert result.exit_code == 0
    assert result.usage.peak_rss_kb >= 40000


@pytest_twisted.inlineCallbacks
def test_usage_so_far_is_sampled_while_the_job_runs(sandbox):
    hold = "import time\nb = b'x' * (60 << 20)\nprint('ready', flush=True)\ntime.sleep(300)\n"
    job = start_job(sandbox, [sys.executable, "-c", hold], sample_interval=0.05)
    yield until(lambda: job.usage().peak_rss_kb >= 40000, "a sample to see the job's memory")
    assert job.usage().wall > 0
    result = yield within(job.kill(grace=0))
    assert result.exit_signal in (signal.SIGTERM, signal.SIGKILL)  # whichever came first
    assert result.usage.peak_rss_kb >= 40000


# ---------------------------------------------------------------------------------------------
# The launcher: one process per startd that starts every job


@pytest.fixture
def launcher():
    """A launcher of the test's own, so that killing it cannot disturb any other test."""
    own = Launcher(reactor)
    yield own
    own.stop()


def sandboxes(base: Path, n: int) -> list[Path]:
    paths = [base / f"job{i}" for i in range(n)]
    for path in paths:
        path.mkdir()
    return paths


@pytest_twisted.inlineCallbacks
def test_one_launcher_runs_many_jobs_and_reuses_its_wrappers(tmp_path, launcher):
    # Every fourth job leaves a daemon behind: its wrapper must come back to serve others only
    # once that is gone, and the next job must not be hit by the killing.
    wrappers = set()
    for i, box in enumerate(sandboxes(tmp_path, 60)):
        script = f'({SLEEP} 300 &) ; exit {i % 5}' if i % 4 == 0 else f"echo {i}; exit {i % 5}"
        job, result = yield run_job(box, ["sh", "-c", script], launcher=launcher)
        assert (result.exit_code, result.exit_signal, result.failure) == (i % 5, None, None)
        assert result.leftover_processes_killed == (1 if i % 4 == 0 else 0)
        if i % 4:
            assert (box / "job.out").read_text() == f"{i}\n"
        wrappers.add(job.wrapper_pid)
    assert launcher.starts == 1 and launcher.pid is not None
    assert len(wrappers) == 1  # one job at a time: the same wrapper every time


@pytest_twisted.inlineCallbacks
def test_jobs_that_cannot_start_leave_the_launcher_serving(tmp_path, launcher):
    missing, not_executable, symlinked, fine = sandboxes(tmp_path, 4)
    (not_executable / "script").write_text("#!/bin/sh\nexit 0\n")
    (not_executable / "script").chmod(0o644)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (symlinked / "job.out").symlink_to(precious)

    _, result = yield run_job(missing, ["gwms-no-such-command"], launcher=launcher)
    assert (result.exit_code, result.exit_signal) == (127, None) and "No such file" in result.exec_error
    _, result = yield run_job(not_executable, [str(not_executable / "script")], launcher=launcher)
    assert result.exit_code == 126 and "Permission denied" in result.exec_error
    assert "cannot execute" in (not_executable / "job.err").read_text()
    # Output files are opened without following symlinks: the job does not run, the target is
    # untouched.
    _, result = yield run_job(symlinked, ["sh", "-c", "echo overwritten"], launcher=launcher)
    assert result.exit_code == 126 and "open stdout" in result.exec_error
    assert precious.read_text() == "keep me"

    pid = launcher.pid
    _, result = yield run_job(fine, ["sh", "-c", "echo fine"], launcher=launcher)
    assert result.exit_code == 0 and (fine / "job.out").read_text() == "fine\n"
    assert launcher.pid == pid and launcher.starts == 1


@pytest_twisted.inlineCallbacks
def test_a_launcher_killed_from_outside_is_restarted_and_its_jobs_are_reported_failed(tmp_path, launcher):
    boxes = sandboxes(tmp_path, 4)
    jobs = [start_job(box, ["sh", "-c", f"echo ready; exec {SLEEP} 300"], launcher=launcher) for box in boxes[:3]]
    yield until(lambda: all((box / "job.out").read_text() == "ready\n" for box in boxes[:3]), "the jobs to run")
    old = launcher.pid
    os.kill(old, signal.SIGKILL)
    results = yield within(gatherResults([job.finished for job in jobs]))
    for job, result in zip(jobs, results, strict=True):
        assert result.failure is not None and f"launcher (pid {old})" in result.failure
        assert (result.exit_code, result.exit_signal) == (None, signal.SIGKILL)
        assert not is_running(job.pid) and not is_running(job.wrapper_pid)
        assert find_processes(job.marker, [job.pid]) == set() and marker_holders(job.marker) == set()
    # The next job starts a new launcher.
    _, result = yield run_job(boxes[3], ["sh", "-c", "exit 7"], launcher=launcher)
    assert (result.exit_code, result.failure) == (7, None)
    assert launcher.starts == 2 and launcher.pid not in (None, old)


@pytest_twisted.inlineCallbacks
def test_a_wrapper_that_stops_reporting_is_killed_and_its_job_reported_failed(tmp_path, launcher):
    stuck, fine = sandboxes(tmp_path, 2)
    job = start_job(stuck, ["sh", "-c", f"echo ready; exec {SLEEP} 300"], launcher=launcher)
    job.wrapper_patience = 0.2
    yield until(lambda: (stuck / "job.out").read_text() == "ready\n", "the job to run")
    os.kill(job.wrapper_pid, signal.SIGSTOP)  # it can neither reap nor report any more
    result = yield within(job.kill(grace=0))
    assert result.failure is not None and "wrapper" in result.failure
    assert result.exit_signal == signal.SIGKILL  # the wrapper's own end: the launcher killed it
    assert not is_running(job.pid) and not is_running(job.wrapper_pid)
    _, result = yield run_job(fine, ["true"], launcher=launcher)
    assert result.exit_code == 0 and launcher.starts == 1


@pytest_twisted.inlineCallbacks
def test_ten_jobs_at_once_each_get_their_own_wrapper_and_result(tmp_path, launcher):
    # Each job waits for a file that appears only once all ten run: they really overlap.
    go = tmp_path / "go"
    script = f'echo "$1"; while [ ! -e {go} ]; do {SLEEP} 0.01; done; exit "$1"'
    seen_wrappers: list[set[int]] = []
    for round_ in range(2):
        (tmp_path / f"round{round_}").mkdir()
        boxes = sandboxes(tmp_path / f"round{round_}", 10)
        jobs = [start_job(box, ["sh", "-c", script, "sh", str(i)], launcher=launcher) for i, box in enumerate(boxes)]
        yield until(lambda jobs=jobs: all(job.pid is not None for job in jobs), "ten jobs to start")
        go.touch()
        results = yield within(gatherResults([job.finished for job in jobs]))
        go.unlink()
        assert [r.exit_code for r in results] == list(range(10))
        assert [(box / "job.out").read_text() for box in boxes] == [f"{i}\n" for i in range(10)]
        assert len({job.pid for job in jobs}) == 10
        seen_wrappers.append({job.wrapper_pid for job in jobs})
        assert len(seen_wrappers[-1]) == 10
        for job in jobs:
            assert find_processes(job.marker, [job.pid]) == set()
    assert seen_wrappers[1] == seen_wrappers[0]  # the second round reused the first one's wrappers
    assert launcher.starts == 1


@implementer(IIdentitySwitch)
class NobodySwitch:
    """A test identity switch: runs jobs as nobody, through the launcher's fork path."""

    name = "nobody"

    def prepare_sandbox(self, job: Any, sandbox: Path) -> JobIdentity:
        os.chown(sandbox, NOBODY, NOBODY)
        return JobIdentity(uid=NOBODY, gid=NOBODY, user="nobody")

    def launch(self, job: Any, argv: list[str], env: dict[str, str], sandbox: Path) -> LaunchSpec:
        return LaunchSpec(argv=tuple(argv), env=env, uid=NOBODY, gid=NOBODY, groups=())


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="as root, to switch to an unprivileged user")
@pytest_twisted.inlineCallbacks
def test_an_identity_switch_has_the_launcher_run_the_job_as_its_user(launcher):
    switch = NobodySwitch()
    assert verifyObject(IIdentitySwitch, switch)
    base = Path(tempfile.mkdtemp(prefix="gwms-test-", dir="/tmp"))  # pytest's tmp_path is root's only
    try:
        os.chmod(base, 0o755)
        good, missing, root_only = sandboxes(base, 3)
        for box in (good, missing):
            switch.prepare_sandbox({}, box)
        os.chmod(root_only, 0o700)
        env = {"PATH": "/usr/bin:/bin"}  # not the test's: it may name directories only root can search
        _, result = yield run_job(good, ["sh", "-c", "id -u; id -g; id -G"], env=env, launcher=launcher,
                                  switch=switch)
        assert result.exit_code == 0
        assert (good / "job.out").read_text() == f"{NOBODY}\n{NOBODY}\n{NOBODY}\n"
        assert (good / "job.out").stat().st_uid == NOBODY  # created as the job's user
        _, result = yield run_job(missing, ["gwms-no-such-command"], env=env, launcher=launcher, switch=switch)
        assert result.exit_code == 127 and "No such file" in result.exec_error
        # The sandbox is entered as the job's user, who may not enter this one.
        _, result = yield run_job(root_only, ["true"], env=env, launcher=launcher, switch=switch)
        assert result.exit_code == 126 and "enter the sandbox" in result.exec_error
    finally:
        shutil.rmtree(base)


def test_find_processes_by_marker_and_by_ancestry():
    marker = f"test-{uuid.uuid4().hex}"
    holder = subprocess.Popen([SLEEP, "300"], env={"GWMS_JOB_MARKER": marker}, start_new_session=True)
    parent = subprocess.Popen(["sh", "-c", f"{SLEEP} 300 & wait"], env={"PATH": PATH}, start_new_session=True)
    try:
        assert find_processes(marker) == {holder.pid}
        assert find_processes(marker[:-1]) == set()  # a prefix is not the marker
        tree = wait_until(lambda: (found := find_processes("", [parent.pid])) and len(found) == 2 and found,
                          5, "the shell's child")
        assert parent.pid in tree
        assert find_processes("", sessions=[parent.pid]) == tree
    finally:
        for proc in (holder, parent):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_become_subreaper_takes_effect():
    code = ("import ctypes; from gwms.startd.process import become_subreaper; ok = become_subreaper(); "
            "flag = ctypes.c_int(); ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0); print(ok, flag.value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split() == ["True", "1"]


def test_the_none_identity_switch_is_a_plugin_and_keeps_the_startd_identity(sandbox):
    switch = NoIdentitySwitch.from_config(None)
    assert verifyObject(IIdentitySwitch, switch) and switch.name == "none"
    os.chmod(sandbox, 0o755)
    identity = switch.prepare_sandbox({}, sandbox)
    assert isinstance(identity, JobIdentity)
    assert (identity.uid, identity.gid) == (os.geteuid(), os.getegid())
    assert stat.S_IMODE(sandbox.stat().st_mode) == 0o700


def build_hostile_tree(base: Path) -> tuple[Path, Path, Path]:
    """A sandbox as a job may leave it: unreadable directories, links out, a FIFO, deep nesting."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    sandbox = base / "sandbox"
    (sandbox / "a" / "b" / "c").mkdir(parents=True)
    (sandbox / "a" / "b" / "c" / "file").write_text("x")
    (sandbox / "a" / "file").write_text("x")
    os.mkfifo(sandbox / "a" / "fifo")
    (sandbox / "link-to-file").symlink_to(outside / "precious.txt")
    (sandbox / "link-to-dir").symlink_to(outside)
    (sandbox / "a" / "b" / "c" / "up").symlink_to(outside)
    deep = os.open(sandbox, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(150):  # removal climbs back through ".." level by level: check it comes back up
        os.mkdir("d", dir_fd=deep)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=deep)
        os.close(deep)
        deep = inner
    os.close(deep)
    os.chmod(sandbox / "a" / "b" / "c", 0)
    os.chmod(sandbox / "a" / "b", 0)
    os.chmod(sandbox / "a", 0o500)
    return sandbox, outside, outside / "precious.txt"


def test_remove_sandbox_opens_up_chmod_000_dirs_and_never_follows_symlinks_out(tmp_path):
    sandbox, outside, precious = build_hostile_tree(tmp_path)
    remove_sandbox(sandbox)
    assert not os.path.lexists(sandbox)
    assert precious.read_text() == "keep me" and sorted(os.listdir(outside)) == ["precious.txt"]
    remove_sandbox(sandbox)  # gone already: fine
    (tmp_path / "link").symlink_to(outside)
    remove_sandbox(tmp_path / "link")  # a symlink as the sandbox itself: only the link goes
    assert not os.path.lexists(tmp_path / "link") and precious.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="as root, to drop to an unprivileged user")
def test_remove_sandbox_as_an_unprivileged_owner_of_chmod_000_dirs():
    # Root ignores modes: the unprivileged path (O_PATH, chmod, reopen) runs only as a user.
    nobody = 65534
    base = Path(tempfile.mkdtemp(prefix="gwms-test-", dir="/tmp"))
    try:
        os.chown(base, nobody, nobody)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setgid(nobody)
                os.setuid(nobody)
                sandbox, _, precious = build_hostile_tree(base)
                remove_sandbox(sandbox)
                code = 0 if not os.path.lexists(sandbox) and precious.read_text() == "keep me" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(base)


def test_sweep_sandboxes_removes_all_but_what_it_is_told_to_keep(tmp_path):
    execute = tmp_path / "execute"
    execute.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    for name in ("dir_1", "dir_2", "dir_3"):
        (execute / name / "sub").mkdir(parents=True)
        (execute / name / "sub" / "f").write_text(name)
    os.chmod(execute / "dir_3" / "sub", 0)
    (execute / "stray-file").write_text("x")
    (execute / "dir_link").symlink_to(outside)
    removed = sweep_sandboxes(execute, keep=["dir_2"])
    assert removed == sorted(execute / n for n in ("dir_1", "dir_3", "dir_link", "stray-file"))
    assert os.listdir(execute) == ["dir_2"] and (execute / "dir_2" / "sub" / "f").read_text() == "dir_2"
    assert (outside / "precious.txt").read_text() == "keep me"
    assert sweep_sandboxes(execute, keep=[execute / "dir_2"]) == []
