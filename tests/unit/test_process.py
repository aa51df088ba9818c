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
from twisted.internet.defer import Deferred, inlineCallbacks
from zope.interface.verify import verifyObject

from gwms.interfaces import IIdentitySwitch
from gwms.plugins.identity import JobIdentity, NoIdentitySwitch
from gwms.startd.process import (
    JobProcess,
    JobResult,
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


@inlineCallbacks
def until(predicate: Callable[[], Any], what: str, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
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
              stdout: str = "job.out", stderr: str = "job.err", sample_interval: float = 1.0) -> JobProcess:
    job = JobProcess(reactor, NoIdentitySwitch(), {}, argv, {"PATH": PATH} if env is None else env, sandbox,
                     stdin, sandbox / stdout, sandbox / stderr, marker=f"test-{uuid.uuid4().hex}",
                     sample_interval=sample_interval)
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
