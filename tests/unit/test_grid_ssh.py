"""The ssh grid plugin in memory: no ssh is ever run. The local runner (what would run ``ssh``)
is a fake that records each command line and answers it; the reactor's spawnProcess records
the control master and lets the test end it; the master's control socket is a plain file the
test (or the fake reactor, for a master that connects at once) creates."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from zope.interface.verify import verifyObject

from gwms.config import ConfigError, parse_config
from gwms.factory.grid import FINISHED, QUEUED, RUNNING, GlideinSubmission, GridStatus
from gwms.interfaces import IGridSubmitter
from gwms.plugins import GRID_SUBMITTERS, load_plugin
from gwms.plugins.commands import CommandError, CommandResult
from gwms.plugins.grid_local import WRAPPER
from gwms.plugins.grid_ssh import (
    FORK_REMOVE,
    FORK_START,
    FORK_STATUS,
    MASTER_START_TIMEOUT,
    STAGE_AND_RUN,
    SSHGridSubmitter,
    SSHRemote,
    _control_dir,
    check_ssh_entry,
    parse_fork_status,
)

from test_commands import ProcessReactor, Spawned, command_error, not_fired, outcome
from test_grid_slurm import FAKE_STARTUP, SACCT, SQUEUE, failed, messages, ok, result_of

HOME = "/home/gwms"
POLL = 0.05  # how often ensure_master looks for the control socket


class SSHReactor(ProcessReactor):
    """ProcessReactor whose ssh control masters, when ``connects`` is set, create their control
    socket (here a plain file) as they start, as a master that logs in at once does."""

    def __init__(self, connects: bool = True) -> None:
        super().__init__()
        self.connects = connects

    def spawnProcess(self, processProtocol: Any, executable: str, args: Any = (), *rest: Any, **kw: Any) -> Any:
        process = super().spawnProcess(processProtocol, executable, args, *rest, **kw)
        if self.connects and "-M" in args:
            Path(control_path_of(args)).touch()
        return process

    @property
    def masters(self) -> list[Spawned]:
        return [s for s in self.spawned if "-M" in s.args]


def control_path_of(argv: Any) -> str:
    (path,) = [a.split("=", 1)[1] for a in argv if str(a).startswith("ControlPath=")]
    return path


class FakeSSH:
    """The local runner: records every ssh command line. ``ssh -O check`` is answered from
    ``checks`` (then exit 0), the remote ``pwd`` from ``pwds`` (then the home), and the other
    remote commands from ``answers`` (then exit 0, no output). An answer may be a
    CommandResult, an exception (the command fails with it) or a Deferred (fired by the test)."""

    def __init__(self, *answers: Any) -> None:
        self.calls: list[tuple[list[str], float, bytes | None]] = []
        self.answers = list(answers)
        self.checks: list[Any] = []
        self.pwds: list[Any] = []

    def __call__(self, argv: Any, timeout: float, stdin: bytes | None) -> defer.Deferred[CommandResult]:
        argv = list(argv)
        self.calls.append((argv, timeout, stdin))
        if "-O" in argv:
            answer = self.checks.pop(0) if self.checks else ok()
        elif argv[-1] == "pwd":
            answer = self.pwds.pop(0) if self.pwds else ok(HOME + "\n")
        else:
            answer = self.answers.pop(0) if self.answers else ok()
        if isinstance(answer, defer.Deferred):
            return answer
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    @property
    def checks_run(self) -> list[list[str]]:
        return [argv for argv, _, _ in self.calls if "-O" in argv]

    @property
    def remote(self) -> list[list[str]]:
        """The remote commands (what the remote shell runs, split back into words), pwd included."""
        return [shlex.split(argv[-1]) for argv, _, _ in self.calls if "--" in argv]

    @property
    def commands(self) -> list[tuple[list[str], float, bytes | None]]:
        """The remote commands but pwd, with their timeout and stdin."""
        return [(shlex.split(argv[-1]), timeout, stdin) for argv, timeout, stdin in self.calls
                if "--" in argv and argv[-1] != "pwd"]


@pytest.fixture
def short_dir():
    """A directory with a short path (control sockets must fit in 108 bytes; pytest's tmp_path
    may not)."""
    d = Path(tempfile.mkdtemp(prefix="gs-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def advance_until(reactor: MemoryReactorClock, d: defer.Deferred, limit: float) -> None:
    """Drive the clock by POLL until ``d`` fires or ``limit`` seconds have passed."""
    while not_fired(d) and reactor.seconds() < limit:
        reactor.advance(POLL)


# ------------------------------------------------------------------------------------------
# CONTACT


@pytest.mark.parametrize("contact,destination,port", [
    ("user@host", "user@host", 22),
    ("user@host:2222", "user@host", 2222),
    ("user@[::1]:22", "user@::1", 22),
    ("user@[::1]", "user@::1", 22),
    ("gwms-ssh@127.0.0.1:10022", "gwms-ssh@127.0.0.1", 10022),
    ("a.b_c-d@login-1.example.org", "a.b_c-d@login-1.example.org", 22),
    ("_svc@h:1", "_svc@h", 1),
])
def test_contact_parsing(short_dir, contact, destination, port):
    remote = SSHRemote(None, contact, control_dir=short_dir, runner=FakeSSH())
    assert (remote.contact, remote.destination, remote.port) == (contact, destination, port)


@pytest.mark.parametrize("contact", [
    "host", "@host", "user@", "", "user@host:", "user@host:p", "user@host:123456", "user@host:-1",
    "us er@host", "user@ho st", "user@host :22", " user@host",
    "a;b@h", "u@h$(x)", "u@h;reboot", "u@`x`", "u@h|x", "u@h&", "u'@h", 'u"@h', "u@h\\x",
    "-oProxyCommand=x@h", "-user@host", "u@[h]", "u@h@g", "u@h:22:22",
    "u@h\n", "u@h:22\n", "u@h\nx", "u\n@h", "u@h\r", "u@h\t",
])
def test_contact_refused(short_dir, contact):
    with pytest.raises(ValueError) as e:
        SSHRemote(None, contact, control_dir=short_dir, runner=FakeSSH())
    assert repr(contact) in str(e.value)
    assert "user@host or user@host:port" in str(e.value)


# ------------------------------------------------------------------------------------------
# check_ssh_entry


@pytest.mark.parametrize("entry", [
    {"contact": "u@h", "remote_dir": ".gwms"},
    {"contact": "u@h:2222", "remote_dir": "/scratch/gwms dir", "remote_batch": "fork"},
    {"contact": "u@[::1]", "remote_dir": "a..b/c", "remote_batch": "slurm", "nodes": 2,
     "slurm_options": ["--mem=2G"]},
])
def test_check_ssh_entry_accepts(entry):
    check_ssh_entry("site.toml", "e1", entry)


@pytest.mark.parametrize("entry,message", [
    ({"contact": "u@h", "remote_dir": ".gwms", "remote_batch": "pbs"},
     "remote_batch must be one of fork, slurm, got 'pbs'"),
    ({"contact": "u@h", "remote_dir": ".gwms", "remote_batch": None}, "remote_batch must be one of fork, slurm"),
    ({"contact": "a;b@h", "remote_dir": ".gwms"},
     "contact must be user@host or user@host:port (port 1-65535) for the ssh grid, got 'a;b@h'"),
    ({"contact": "u@h\n", "remote_dir": ".gwms"}, "contact must be user@host or user@host:port"),
    ({"contact": "", "remote_dir": ".gwms"}, "got ''"),
    ({"remote_dir": ".gwms"}, "got None"),
    ({"contact": "u@h", "remote_dir": "../x"}, "remote_dir '../x' is not a usable directory"),
    ({"contact": "u@h", "remote_dir": "/a/../b"}, "remote_dir '/a/../b' is not a usable directory"),
    ({"contact": "u@h", "remote_dir": "a/.."}, "remote_dir 'a/..' is not a usable directory"),
    ({"contact": "u@h", "remote_dir": "a\nb"}, "is not a usable directory"),
    ({"contact": "u@h", "remote_dir": ""}, "remote_dir '' is not a usable directory"),
    ({"contact": "u@h"}, "remote_dir '' is not a usable directory"),
    ({"contact": "u@h", "remote_dir": ".gwms", "remote_batch": "slurm", "nodes": 0}, "nodes must be at least 1"),
    ({"contact": "u@h", "remote_dir": ".gwms", "remote_batch": "slurm", "slurm_options": ["mem=2G"]},
     "'mem=2G' is not an sbatch option"),
])
def test_check_ssh_entry_refuses(entry, message):
    with pytest.raises(ConfigError) as e:
        check_ssh_entry("site.toml", "e1", entry)
    assert str(e.value).startswith("site.toml: [factory.entry.e1] ")
    assert message in str(e.value)


# ------------------------------------------------------------------------------------------
# Command lines


def test_base_argv_with_every_option(short_dir):
    remote = SSHRemote(None, "u@h:2222", Path("/keys/id_ed25519"), Path("/keys/known_hosts"),
                       ["ConnectTimeout=20", "LogLevel=ERROR"], short_dir, FakeSSH())
    assert remote.base_argv() == [
        "ssh", "-p", "2222", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"ControlPath={remote.control_path}", "-o", "ServerAliveInterval=30",
        "-i", "/keys/id_ed25519", "-o", "IdentitiesOnly=yes",
        "-o", "UserKnownHostsFile=/keys/known_hosts",
        "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR"]


def test_base_argv_of_a_bare_contact(short_dir):
    remote = SSHRemote(None, "u@h", control_dir=short_dir, runner=FakeSSH(), ssh="/opt/ssh/bin/ssh")
    assert remote.base_argv() == [
        "/opt/ssh/bin/ssh", "-p", "22", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"ControlPath={remote.control_path}", "-o", "ServerAliveInterval=30"]


def test_the_control_socket_is_private_and_short(short_dir):
    remote = SSHRemote(None, "u@h", control_dir=short_dir / "ssh", runner=FakeSSH())
    path = Path(remote.control_path)
    assert path.parent == short_dir / "ssh"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.name) == 16 and all(c in "0123456789abcdef" for c in path.name)
    # ssh binds "<path>.<16 random characters>" first: it must fit in sun_path (108 bytes).
    assert len(remote.control_path) + 17 < 108


def test_a_control_dir_too_long_for_a_socket_is_replaced_by_one_in_tmp(short_dir, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(short_dir))
    long = short_dir / ("x" * 80)
    d = _control_dir(long)
    assert d.parent == short_dir and d.name.startswith("gwms-ssh-")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert not long.exists()
    remote = SSHRemote(None, "u@h", control_dir=long, runner=FakeSSH())
    assert Path(remote.control_path).parent.parent == short_dir


def test_command_argv(short_dir):
    remote = SSHRemote(None, "u@[::1]:2200", Path("/k"), None, ["ConnectTimeout=5"], short_dir, FakeSSH())
    assert remote.command_argv(["squeue", "--jobs=1,2"]) == [
        *remote.base_argv(), "-o", "ControlMaster=no", "u@::1", "--", "squeue --jobs=1,2"]
    assert "-p" in remote.base_argv() and remote.base_argv()[2] == "2200"


HOSTILE = ["printf", "<%s>\\n", "a b", "it's", '"quoted"', "$(touch pwned)", "`touch pwned`", "$HOME",
           "line1\nline2", "", " ", "*", ";", "&&", "|", "\\", "'", "--", "-rf", "#comment", "~", "\t", "é"]


def test_the_remote_command_survives_any_argument(short_dir):
    remote = SSHRemote(None, "u@h", control_dir=short_dir, runner=FakeSSH())
    argv = remote.command_argv(HOSTILE)
    assert argv[-2] == "--"
    assert shlex.split(argv[-1]) == HOSTILE
    # What the remote shell makes of it (a local sh here: no ssh).
    done = subprocess.run(["sh", "-c", argv[-1]], cwd=short_dir, capture_output=True, text=True, timeout=30,
                          check=True)
    assert done.stdout == "".join(f"<{a}>\n" for a in HOSTILE[2:])
    assert list(short_dir.iterdir()) == []  # nothing was run from the arguments


def test_master_argv_in_a_session_of_its_own(short_dir, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/setsid" if name == "setsid" else None)
    remote = SSHRemote(None, "u@h:2", Path("/k"), control_dir=short_dir, runner=FakeSSH())
    assert remote.master_argv() == ["/usr/bin/setsid", *remote.base_argv(), "-M", "-N", "-o", "ControlPersist=no",
                                    "u@h"]


def test_master_argv_without_setsid(short_dir, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    remote = SSHRemote(None, "u@h", control_dir=short_dir, runner=FakeSSH())
    assert remote.master_argv() == [*remote.base_argv(), "-M", "-N", "-o", "ControlPersist=no", "u@h"]


# ------------------------------------------------------------------------------------------
# The control master


def make_remote(short_dir: Path, connects: bool = True, *answers: Any) -> tuple[SSHRemote, SSHReactor, FakeSSH]:
    reactor = SSHReactor(connects)
    fake = FakeSSH(*answers)
    return SSHRemote(reactor, "u@h", control_dir=short_dir, runner=fake), reactor, fake


def test_ensure_master_spawns_the_master_checks_it_and_reads_the_home(short_dir):
    remote, reactor, fake = make_remote(short_dir)
    assert not remote.master_running()
    assert result_of(remote.ensure_master()) is None
    (master,) = reactor.spawned
    assert master.args == remote.master_argv()
    assert master.executable == master.args[0]
    assert master.child_fds == {0: "w", 1: "r", 2: "r"}
    assert master.env == dict(os.environ) and master.env is not os.environ
    check = [*remote.base_argv(), "-O", "check", "u@h"]
    assert fake.calls == [(check, 10.0, None), (remote.command_argv(["pwd"]), 60.0, None)]
    assert remote.home == HOME
    assert remote.master_running()

    # Running: nothing more is started, checked or asked.
    result_of(remote.ensure_master())
    assert len(reactor.spawned) == 1 and len(fake.calls) == 2


def test_ensure_master_waits_for_the_socket_then_polls_check_until_it_answers(short_dir):
    remote, reactor, fake = make_remote(short_dir, False)
    fake.checks = [failed("Control socket connect: Connection refused", 255), failed("", 255)]
    d = remote.ensure_master()
    assert len(reactor.spawned) == 1
    reactor.advance(1.0)
    reactor.advance(POLL)
    assert not_fired(d) and fake.checks_run == []  # no socket yet: nothing to check

    Path(remote.control_path).touch()  # the master has logged in
    reactor.advance(POLL)
    assert len(fake.checks_run) == 1 and not_fired(d)
    reactor.advance(POLL)
    assert len(fake.checks_run) == 2 and not_fired(d)
    reactor.advance(POLL)
    assert len(fake.checks_run) == 3
    assert outcome(d) is None
    assert remote.home == HOME
    assert reactor.getDelayedCalls() == []


def test_concurrent_callers_share_one_master(short_dir):
    remote, reactor, fake = make_remote(short_dir, False)
    first = remote.ensure_master()
    second = remote.ensure_master()
    third = remote.run(["squeue"])
    assert len(reactor.spawned) == 1
    assert not_fired(first) and not_fired(second) and not_fired(third)

    Path(remote.control_path).touch()
    reactor.advance(POLL)

    assert outcome(first) is None and outcome(second) is None
    assert outcome(third) == CommandResult(0, "", "")
    assert len(reactor.spawned) == 1
    assert len(fake.checks_run) == 1
    assert fake.remote == [["pwd"], ["squeue"]]


def test_a_master_that_ends_early_fails_with_its_stderr(short_dir):
    remote, reactor, fake = make_remote(short_dir, False)
    d = remote.ensure_master()
    (master,) = reactor.spawned
    master.output(2, b"Host key verification failed.\r\n")
    master.end(255)
    reactor.advance(POLL)
    e = command_error(d)
    assert e.argv == remote.master_argv()
    assert "the SSH connection to u@h ended: Host key verification failed." in str(e)
    assert fake.calls == []
    assert remote.home is None and not remote.master_running()
    assert reactor.getDelayedCalls() == []


def test_a_master_not_ready_in_time_is_stopped_and_fails(short_dir):
    remote, reactor, fake = make_remote(short_dir, False)
    d = remote.ensure_master()
    (master,) = reactor.spawned
    master.output(2, b"ssh: connect to host h port 22: Connection timed out\n")
    advance_until(reactor, d, MASTER_START_TIMEOUT - 0.1)
    assert not_fired(d) and master.process.signals == []

    advance_until(reactor, d, MASTER_START_TIMEOUT + 1)

    e = command_error(d)
    assert MASTER_START_TIMEOUT < reactor.seconds() <= MASTER_START_TIMEOUT + 2 * POLL
    assert f"no SSH connection to u@h after {MASTER_START_TIMEOUT:g}s: ssh: connect to host h port 22" in str(e)
    assert master.process.signals == ["TERM"]
    assert fake.calls == []
    assert reactor.getDelayedCalls() == []


def test_a_master_whose_check_never_succeeds_is_stopped_at_the_deadline(short_dir):
    remote, reactor, fake = make_remote(short_dir)
    fake.checks = [failed("Control socket connect: Connection refused", 255)] * 10_000
    d = remote.ensure_master()
    advance_until(reactor, d, MASTER_START_TIMEOUT + 1)
    assert "no SSH connection to u@h after 30s" in str(command_error(d))
    assert reactor.masters[0].process.signals == ["TERM"]
    assert len(fake.checks_run) > 100


def test_after_the_master_dies_the_next_command_starts_a_new_one(short_dir):
    remote, reactor, fake = make_remote(short_dir, False)
    d = remote.ensure_master()
    Path(remote.control_path).touch()
    reactor.advance(POLL)
    result_of(d)
    (first,) = reactor.spawned
    first.end(255)  # the connection dropped; its socket is left behind
    assert not remote.master_running()

    d = remote.run(["squeue"])
    assert len(reactor.spawned) == 2
    assert reactor.spawned[1].args == remote.master_argv()
    # The dead master's socket is gone: the new master is not "checked" through it.
    assert not os.path.exists(remote.control_path)
    assert not_fired(d)
    Path(remote.control_path).touch()
    reactor.advance(POLL)
    assert outcome(d) == CommandResult(0, "", "")
    assert len(fake.checks_run) == 2
    assert fake.remote == [["pwd"], ["squeue"]]  # the home is read once


def test_a_failed_home_lookup_is_tried_again(short_dir):
    remote, reactor, fake = make_remote(short_dir)
    fake.pwds = [failed("pwd: cannot access parent directories", 1)]
    assert "ssh exited 1: pwd: cannot access parent directories" in str(command_error(remote.ensure_master()))
    assert remote.home is None

    result_of(remote.ensure_master())

    assert remote.home == HOME
    assert len(reactor.spawned) == 1  # the master was fine: it is kept
    assert fake.remote == [["pwd"], ["pwd"]]
    assert remote.absolute(".gwms") == f"{HOME}/.gwms"


def test_run_goes_through_the_master_with_the_timeout_and_stdin(short_dir):
    remote, _, fake = make_remote(short_dir, True, CommandResult(3, "out", "err"))
    assert result_of(remote.run(["cat", "a b"], 12.5, b"data")) == CommandResult(3, "out", "err")
    assert fake.calls[-1] == (remote.command_argv(["cat", "a b"]), 12.5, b"data")


def test_exit_255_with_the_master_alive_is_the_commands_own(short_dir):
    remote, _, _ = make_remote(short_dir, True, CommandResult(255, "", "exit 255 from the command"))
    assert result_of(remote.run(["false"])) == CommandResult(255, "", "exit 255 from the command")


def test_exit_255_once_the_master_died_is_a_lost_connection(short_dir):
    pending: defer.Deferred[CommandResult] = defer.Deferred()
    remote, reactor, _ = make_remote(short_dir, True, pending)
    d = remote.run(["squeue"])
    reactor.masters[0].end(255)
    pending.callback(CommandResult(255, "", "Connection to h closed by remote host.\n"))
    e = command_error(d)
    assert e.argv == ["squeue"]
    assert "SSH connection to u@h lost: Connection to h closed by remote host." in str(e)


def test_a_local_runner_failure_passes_through_run(short_dir):
    remote, _, _ = make_remote(short_dir, True, CommandError(["ssh"], None, "no answer in 60s: killed"))
    assert "no answer in 60s" in str(command_error(remote.run(["squeue"])))


@pytest.mark.parametrize("path,absolute", [
    (".gwms", f"{HOME}/.gwms"), (".gwms/", f"{HOME}/.gwms"), ("a/b c", f"{HOME}/a/b c"),
    ("/scratch/gwms", "/scratch/gwms"), ("/scratch/gwms/", "/scratch/gwms"), ("/", "/"),
])
def test_absolute(short_dir, path, absolute):
    remote, _, _ = make_remote(short_dir)
    result_of(remote.ensure_master())
    assert remote.absolute(path) == absolute


# ------------------------------------------------------------------------------------------
# stop


def test_stop_signals_the_master_and_fires_when_it_ends(short_dir):
    remote, reactor, _ = make_remote(short_dir)
    result_of(remote.ensure_master())
    d = remote.stop()
    (master,) = reactor.spawned
    assert master.process.signals == ["TERM"]
    assert not_fired(d)
    master.end(None, 15)
    assert outcome(d) is None
    assert not remote.master_running()


def test_stop_without_a_master_fires_at_once(short_dir):
    remote, reactor, _ = make_remote(short_dir)
    assert outcome(remote.stop()) is None
    assert reactor.spawned == []


def test_stop_after_the_master_died_fires_at_once(short_dir):
    remote, reactor, _ = make_remote(short_dir)
    result_of(remote.ensure_master())
    reactor.masters[0].end(255)
    assert outcome(remote.stop()) is None
    assert reactor.masters[0].process.signals == []


# ------------------------------------------------------------------------------------------
# The submitter


class Setup:
    def __init__(self, tmp_path: Path, control_dir: Path) -> None:
        self.tmp_path = tmp_path
        self.control_dir = control_dir
        self.cred = tmp_path / "pilot.token"
        self.cred.write_bytes(b"secret-token\n")
        self.startup = tmp_path / "glidein_startup.sh"
        self.startup.write_bytes(FAKE_STARTUP)
        self.reactor = SSHReactor()

    def __call__(self, *answers: Any) -> tuple[SSHGridSubmitter, FakeSSH]:
        fake = FakeSSH(*answers)
        return SSHGridSubmitter(self.reactor, self.startup, self.control_dir, fake, timeout=20.0), fake


@pytest.fixture
def setup(tmp_path: Path, short_dir: Path) -> Setup:
    return Setup(tmp_path, short_dir)


FORK = {"name": "e1", "contact": "u@h", "remote_batch": "fork", "remote_dir": ".gwms"}
FORK_AREA = f"{HOME}/.gwms/e1"
SLURM = {"name": "e2", "contact": "u@h:2222", "remote_batch": "slurm", "remote_dir": "/scratch/gwms/",
         "partition": "debug", "max_walltime": 7200}
SLURM_AREA = "/scratch/gwms/e2"


def fork_start(glidein_id: str) -> list[str]:
    d = f"{FORK_AREA}/{glidein_id}"
    return ["sh", "-c", STAGE_AND_RUN, "gwms-stage", d, f"{d}/job.sh", "sh", "-c", FORK_START, "gwms-fork", d, WRAPPER]


def test_interface(setup):
    sub, _ = setup()
    assert sub.name == "ssh"
    verifyObject(IGridSubmitter, sub)


def test_fork_submit_is_one_command_per_glidein_carrying_its_job_script(setup):
    sub, fake = setup(ok("started\n"), ok("started\n"))
    gs = [GlideinSubmission("g1", ("-v", "std", "-name", "a b", "-x", "it's $HOME"), setup.cred),
          GlideinSubmission("g2", (), None)]
    assert result_of(sub.submit(FORK, gs)) == {"g1": "g1", "g2": "g2"}
    assert [(argv, timeout) for argv, timeout, _ in fake.commands] == [(fork_start("g1"), 20.0),
                                                                       (fork_start("g2"), 20.0)]
    remote = sub.remote(FORK)
    assert fake.calls[-2][0] == remote.command_argv(fork_start("g1"))
    script = fake.commands[0][2].decode()
    assert script.startswith("#!/bin/sh\n# gwms glidein g1\n")
    assert "secret-token\n" in script
    assert FAKE_STARTUP.decode() in script
    assert f"parent={FORK_AREA}/g1\n" in script  # the glidein's directory is its own remote one
    assert " -name 'a b' -x 'it'\"'\"'s $HOME' -credential \"$base/credential\"" in script
    assert "secret-token" not in fake.commands[1][2].decode()
    assert len(sub.remotes) == 1 and len(setup.reactor.spawned) == 1


def test_fork_submit_goes_on_after_a_glidein_that_did_not_start(setup):
    sub, fake = setup(ok("started\n"), ok("something else\n"), failed("mkdir: cannot create directory: Permission "
                                                                      "denied\n"),
                      CommandError(["ssh"], None, "no answer in 20s: killed"), ok("  started  \n"))
    gs = [GlideinSubmission(g, (), setup.cred) for g in ("a", "b", "c", "d", "e")]
    with capturedLogs() as events:
        assert result_of(sub.submit(FORK, gs)) == {"a": "a", "e": "e"}
    assert [argv for argv, _, _ in fake.commands] == [fork_start(g) for g in "abcde"]
    logged = messages(events)
    assert any(m.startswith("ssh glidein b to u@h: not submitted: ") and "did not start: 'something else\\n'" in m
               for m in logged)
    assert "ssh glidein c to u@h: not submitted: sh exited 1: mkdir: cannot create directory: Permission denied" \
        in logged
    assert "ssh glidein d to u@h: not submitted: ssh failed: no answer in 20s: killed" in logged


def test_fork_submit_skips_bad_ids_and_unreadable_credentials(setup):
    sub, fake = setup(ok("started\n"))
    setup.tmp_path.joinpath("binary.pem").write_bytes(b"\xff\x00")
    gs = [GlideinSubmission("../x", (), None), GlideinSubmission("", (), None), GlideinSubmission(".h", (), None),
          GlideinSubmission("a/b", (), None), GlideinSubmission("m", (), setup.tmp_path / "missing.pem"),
          GlideinSubmission("bin", (), setup.tmp_path / "binary.pem"), GlideinSubmission("good", (), setup.cred)]
    with capturedLogs() as events:
        assert result_of(sub.submit(FORK, gs)) == {"good": "good"}
    assert [argv for argv, _, _ in fake.commands] == [fork_start("good")]
    logged = messages(events)
    for bad in ("../x", "", ".h", "a/b"):
        assert f"ssh: bad glidein id {bad!r}" in logged
    assert any(m.startswith("ssh glidein m to u@h: not submitted:") and "missing.pem" in m for m in logged)
    assert any(m.startswith("ssh glidein bin to u@h: not submitted:") and "not text" in m for m in logged)


def test_submit_to_an_unreachable_remote_submits_nothing_and_says_why(setup):
    setup.reactor.connects = False
    sub, fake = setup()
    with capturedLogs() as events:
        d = sub.submit(FORK, [GlideinSubmission("g1", (), setup.cred)])
        master = setup.reactor.masters[0]
        master.output(2, b"Permission denied (publickey).\n")
        master.end(255)
        setup.reactor.advance(POLL)
        assert outcome(d) == {}
    assert fake.calls == []
    assert any(m.startswith("ssh entry e1: cannot reach the remote: ") and "Permission denied (publickey)." in m
               for m in messages(events))


@pytest.mark.parametrize("name", ["../e", ".e", "a/b"])
def test_submit_with_a_bad_entry_name_submits_nothing(setup, name):
    sub, fake = setup()
    with capturedLogs() as events:
        assert result_of(sub.submit({**FORK, "name": name}, [GlideinSubmission("g1", (), None)])) == {}
    assert fake.calls == [] and setup.reactor.spawned == []
    assert any(f"bad entry name {name!r}" in m for m in messages(events))


def test_fork_query_is_one_command_for_all(setup):
    sub, fake = setup(ok("g1|finished|0\ng2|finished|3\ng3|lost|\ng4|running|\ng5|queued|\n"))
    answer = result_of(sub.query(FORK, ["g1", "g2", "g3", "g4", "g5", "g6"]))
    assert fake.commands == [(["sh", "-c", FORK_STATUS, "gwms-status", FORK_AREA, "60",
                               "g1", "g2", "g3", "g4", "g5", "g6"], 20.0, None)]
    assert answer == {"g1": GridStatus(FINISHED, 0, "exited"), "g2": GridStatus(FINISHED, 3, "exited"),
                      "g3": GridStatus(FINISHED, None, "the glidein's wrapper ended without an exit code"),
                      "g4": GridStatus(RUNNING), "g5": GridStatus(QUEUED)}


@pytest.mark.parametrize("output,expected", [
    ("g1|finished|0\n", {"g1": GridStatus(FINISHED, 0, "exited")}),
    ("g1|finished|137\n", {"g1": GridStatus(FINISHED, 137, "exited")}),
    ("g1|finished|\n", {"g1": GridStatus(FINISHED, None, "exited")}),
    ("g1|finished|-1\n", {"g1": GridStatus(FINISHED, None, "exited")}),
    ("g1|finished|x\n", {"g1": GridStatus(FINISHED, None, "exited")}),
    ("g1|finished|\u00b2\n", {"g1": GridStatus(FINISHED, None, "exited")}),
    ("g1|finished|\u0661\n", {"g1": GridStatus(FINISHED, None, "exited")}),
    ("g1|lost|\n", {"g1": GridStatus(FINISHED, None, "the glidein's wrapper ended without an exit code")}),
    ("g1|running|\r\n", {"g1": GridStatus(RUNNING)}),
    ("  g1|queued|  \n", {"g1": GridStatus(QUEUED)}),
    ("", {}),
    ("\n\n", {}),
])
def test_parse_fork_status(output, expected):
    assert parse_fork_status(output) == expected


def test_parse_fork_status_logs_and_skips_odd_lines_and_unknown_states():
    out = "g1|running|\ngarbage\ng2|queued\n|running|\ng3|a|b|c\ng4|weird|\ng5|queued|\n" + "z" * 100_000 + "\n"
    with capturedLogs() as events:
        assert parse_fork_status(out) == {"g1": GridStatus(RUNNING), "g5": GridStatus(QUEUED)}
    logged = messages(events)
    assert "ssh fork status: odd line skipped: 'garbage'" in logged
    assert "ssh fork status: odd line skipped: 'g2|queued'" in logged
    assert "ssh fork status: odd line skipped: '|running|'" in logged
    assert "ssh fork status: odd line skipped: 'g3|a|b|c'" in logged
    assert "ssh fork status: unknown state 'weird' for g4" in logged
    assert all(len(m) < 1000 for m in logged)


def test_fork_query_failure_fails(setup):
    sub, _ = setup(failed("sh: 1: cannot open: Permission denied\n", 2))
    assert "sh exited 2: sh: 1: cannot open: Permission denied" in str(command_error(sub.query(FORK, ["g1"])))


def test_query_remove_forget_of_nothing_do_nothing(setup):
    sub, fake = setup()
    assert result_of(sub.query(FORK, [])) == {}
    assert result_of(sub.remove(FORK, [])) is None
    assert result_of(sub.forget(FORK, [])) is None
    assert result_of(sub.query(SLURM, [])) == {}
    assert fake.calls == [] and setup.reactor.spawned == []  # not even a connection


def test_query_of_an_unreachable_remote_fails(setup):
    setup.reactor.connects = False
    sub, _ = setup()
    d = sub.query(FORK, ["g1"])
    setup.reactor.masters[0].end(255)
    setup.reactor.advance(POLL)
    assert "the SSH connection to u@h ended" in str(command_error(d))


def test_fork_remove(setup):
    sub, fake = setup()
    assert result_of(sub.remove(FORK, ["g1", "g2"])) is None
    assert fake.commands == [(["sh", "-c", FORK_REMOVE, "gwms-remove", FORK_AREA, "g1", "g2"], 20.0, None)]


def test_fork_remove_failure_fails(setup):
    sub, _ = setup(failed("oops\n"))
    assert "sh exited 1: oops" in str(command_error(sub.remove(FORK, ["g1"])))


def test_fork_forget_removes_the_glideins_directories_with_safe_ids_only(setup):
    sub, fake = setup()
    result_of(sub.forget(FORK, ["g1", "../etc", ".hidden", "a/b", "", "/", "g2"]))
    assert fake.commands == [(["rm", "-rf", "--", f"{FORK_AREA}/g1", f"{FORK_AREA}/g2"], 20.0, None)]


def test_fork_forget_with_no_safe_id_runs_nothing(setup):
    sub, fake = setup()
    result_of(sub.forget(FORK, ["..", "", ".x"]))
    assert fake.commands == []


def test_forget_failure_is_logged_not_raised(setup):
    sub, _ = setup(failed("rm: cannot remove: Device or resource busy\n"))
    with capturedLogs() as events:
        assert result_of(sub.forget(FORK, ["g1", "g2"])) is None
    assert "ssh: cannot clean up after 2 glideins at u@h: rm exited 1: rm: cannot remove: Device or resource busy" \
        in messages(events)


# ------------------------------------------------------------------------------------------
# Remote Slurm


def slurm_submit_argv(glidein_id: str, *extra: str) -> list[str]:
    a = SLURM_AREA
    return ["sh", "-c", STAGE_AND_RUN, "gwms-stage", a, f"{a}/{glidein_id}.sh",
            "sbatch", "--parsable", f"--job-name=gwms-{glidein_id}", "--time=120",
            f"--output={a}/{glidein_id}.out", f"--error={a}/{glidein_id}.err", *extra, "--partition=debug",
            f"{a}/{glidein_id}.sh"]


def test_slurm_submit_stages_the_script_and_runs_sbatch_in_one_command(setup):
    sub, fake = setup(ok("4242\n"), ok("4243;cluster\n"))
    gs = [GlideinSubmission("g1", ("-name", "a b"), setup.cred), GlideinSubmission("g2", (), None)]
    assert result_of(sub.submit(SLURM, gs)) == {"g1": "4242:g1", "g2": "4243:g2"}
    assert [(argv, timeout) for argv, timeout, _ in fake.commands] == [(slurm_submit_argv("g1"), 20.0),
                                                                       (slurm_submit_argv("g2"), 20.0)]
    remote = sub.remote(SLURM)
    assert remote.port == 2222
    assert fake.calls[-1][0] == remote.command_argv(slurm_submit_argv("g2"))
    script = fake.commands[0][2].decode()
    assert "secret-token\n" in script
    assert FAKE_STARTUP.decode() in script
    assert "-name 'a b' -batch_time_limit 7200 -credential" in script
    assert '"${TMPDIR:-/tmp}"' in script
    assert "secret-token" not in fake.commands[1][2].decode()


def test_slurm_submit_of_a_multi_node_entry(setup):
    sub, fake = setup(ok("7\n"))
    entry = {**SLURM, "nodes": 2, "slurm_options": ["--mem=2G"], "worker_dir": "/local/scratch"}
    assert result_of(sub.submit(entry, [GlideinSubmission("g1", (), None)])) == {"g1": "7:g1"}
    a = SLURM_AREA
    assert fake.commands[0][0] == [
        "sh", "-c", STAGE_AND_RUN, "gwms-stage", a, f"{a}/g1.sh", "sbatch", "--parsable", "--job-name=gwms-g1",
        "--time=120", f"--output={a}/g1.out", f"--error={a}/g1.err", "--nodes=2", "--partition=debug", "--mem=2G",
        f"{a}/g1.sh"]
    script = fake.commands[0][2].decode()
    assert f"--output={a}/g1.node%n.out --error={a}/g1.node%n.err" in script
    assert "parent=/local/scratch\n" in script


def test_slurm_submit_goes_on_after_a_failed_sbatch(setup):
    sub, fake = setup(failed("sbatch: error: invalid partition specified: debug\n"), ok("Submitted batch job 5\n"),
                      ok("99\n"))
    gs = [GlideinSubmission(g, (), None) for g in ("a", "b", "c")]
    with capturedLogs() as events:
        assert result_of(sub.submit(SLURM, gs)) == {"c": "99:c"}
    assert [argv for argv, _, _ in fake.commands] == [slurm_submit_argv(g) for g in "abc"]
    logged = messages(events)
    assert "ssh glidein a to u@h:2222: not submitted: sh exited 1: sbatch: error: invalid partition specified: debug" \
        in logged
    assert any(m.startswith("ssh glidein b to u@h:2222: not submitted: ") and "gave no job id" in m for m in logged)


def test_slurm_query_asks_for_the_job_ids_and_answers_with_the_grid_ids(setup):
    sub, fake = setup(ok("4242|RUNNING|None\n4243|PENDING|Priority\n999|RUNNING|None\n"),
                      ok("4244|COMPLETED|0:0\n4244.batch|COMPLETED|0:0\n"))
    answer = result_of(sub.query(SLURM, ["4242:g1", "4243:g2", "4244:g3", "4245:g4"]))
    assert fake.commands == [([*SQUEUE, "--jobs=4242,4243,4244,4245"], 20.0, None),
                             ([*SACCT, "--jobs=4244,4245"], 20.0, None)]
    assert answer == {"4242:g1": GridStatus(RUNNING), "4243:g2": GridStatus(QUEUED),
                      "4244:g3": GridStatus(FINISHED, 0, "COMPLETED")}


def test_slurm_query_failure_fails(setup):
    sub, _ = setup(failed("slurm_load_jobs error: Unable to contact slurm controller\n"))
    assert "Unable to contact slurm controller" in str(command_error(sub.query(SLURM, ["1:g"])))


def test_one_slurm_batch_per_remote_keeps_what_it_learnt(setup):
    sub, fake = setup(ok(""), failed("sacct: error: Slurm accounting storage is disabled\n"), ok(""),
                      ok(""), ok(""))
    result_of(sub.query(SLURM, ["1:g"]))
    result_of(sub.query({**SLURM, "name": "e3"}, ["2:h"]))
    assert [argv[:2] for argv, _, _ in fake.commands] == [["squeue", "--noheader"], ["sacct", "--noheader"],
                                                          ["sacct", "-c"], ["squeue", "--noheader"], ["sacct", "-c"]]


def test_slurm_remove_cancels_the_jobs(setup):
    sub, fake = setup()
    assert result_of(sub.remove(SLURM, ["4242:g1", "4243:g2"])) is None
    assert fake.commands == [(["scancel", "--batch", "--signal=TERM", "--state=RUNNING", "4242", "4243"], 20.0, None),
                             (["scancel", "--state=PENDING", "4242", "4243"], 20.0, None)]


def test_slurm_forget_removes_the_glideins_files(setup):
    sub, fake = setup()
    result_of(sub.forget(SLURM, ["4242:g1", "4243:../x", "4244:", "4245:.h", "4246:a/b", "4247:g2"]))
    a = SLURM_AREA
    assert fake.commands == [(["rm", "-rf", "--",
                               f"{a}/g1.sh", f"{a}/g1.out", f"{a}/g1.err", f"{a}/g1.node0.out", f"{a}/g1.node0.err",
                               f"{a}/g2.sh", f"{a}/g2.out", f"{a}/g2.err", f"{a}/g2.node0.out", f"{a}/g2.node0.err"],
                              20.0, None)]


def test_slurm_forget_of_a_multi_node_entry_removes_every_nodes_output(setup):
    sub, fake = setup()
    result_of(sub.forget({**SLURM, "nodes": 3}, ["7:g1"]))
    a = SLURM_AREA
    assert fake.commands[0][0] == ["rm", "-rf", "--", f"{a}/g1.sh", f"{a}/g1.out", f"{a}/g1.err",
                                   f"{a}/g1.node0.out", f"{a}/g1.node0.err", f"{a}/g1.node1.out",
                                   f"{a}/g1.node1.err", f"{a}/g1.node2.out", f"{a}/g1.node2.err"]


# ------------------------------------------------------------------------------------------
# Remotes shared between entries; stop


def test_entries_with_the_same_connection_share_one_remote(setup):
    sub, fake = setup(ok("started\n"), ok("5\n"))
    e1 = {**FORK, "contact": "u@h:2222", "ssh_key": Path("/k/id"), "ssh_known_hosts": Path("/k/kh"),
          "ssh_options": ["ConnectTimeout=20"]}
    e2 = {**SLURM, "ssh_key": "/k/id", "ssh_known_hosts": "/k/kh", "ssh_options": ("ConnectTimeout=20",)}
    assert sub.remote(e1) is sub.remote(e2)
    result_of(sub.submit(e1, [GlideinSubmission("g1", (), None)]))
    result_of(sub.submit(e2, [GlideinSubmission("g2", (), None)]))
    assert len(setup.reactor.spawned) == 1 and len(sub.remotes) == 1
    assert len(fake.checks_run) == 1
    assert fake.remote[0] == ["pwd"] and fake.remote.count(["pwd"]) == 1


@pytest.mark.parametrize("change", [{"ssh_key": "/k/other"}, {"ssh_known_hosts": "/k/kh2"},
                                    {"ssh_options": ["ConnectTimeout=5"]}, {"contact": "u@h:22"},
                                    {"contact": "v@h"}])
def test_a_different_connection_is_another_remote_with_its_own_socket(setup, change):
    sub, _ = setup()
    base = {**FORK, "ssh_key": "/k/id", "ssh_known_hosts": "/k/kh"}
    one, two = sub.remote(base), sub.remote({**base, **change})
    assert one is not two
    # Each keeps a master of its own: one starting must not take the other's socket away.
    assert one.control_path != two.control_path
    result_of(one.ensure_master())
    result_of(two.ensure_master())
    assert len(setup.reactor.spawned) == 2
    assert one.master_running() and two.master_running()
    assert os.path.exists(one.control_path) and os.path.exists(two.control_path)


def test_the_submitter_stop_stops_every_master_and_fires_when_they_end(setup):
    sub, _ = setup()
    result_of(sub.remote(FORK).ensure_master())
    result_of(sub.remote(SLURM).ensure_master())
    d = sub.stop()
    masters = setup.reactor.masters
    assert [m.process.signals for m in masters] == [["TERM"], ["TERM"]]
    masters[0].end(None, 15)
    assert not_fired(d)
    masters[1].end(None, 15)
    assert outcome(d) == [None, None]


def test_the_submitter_stop_with_no_master_fires_at_once(setup):
    sub, _ = setup()
    assert outcome(sub.stop()) == []
    sub.remote(FORK)  # known, never connected
    assert outcome(sub.stop()) == [None]
    assert setup.reactor.spawned == []


# ------------------------------------------------------------------------------------------
# Configuration


CONFIG = """
[factory]
work_dir = "{work}"
[factory.entry.remote]
grid = "ssh"
contact = "{contact}"
remote_batch = "slurm"
remote_dir = "{remote_dir}"
partition = "debug"
max_walltime = 7200
ssh_key = "keys/id_ed25519"
ssh_known_hosts = "keys/known_hosts"
ssh_options = ["ConnectTimeout=20"]
[factory.entry.box]
grid = "ssh"
contact = "{contact}"
ssh_key = "keys/id_ed25519"
ssh_known_hosts = "keys/known_hosts"
ssh_options = ["ConnectTimeout=20"]
[factory.entry.other]
grid = "local"
contact = "not checked: not an ssh entry"
"""


def ssh_config(base: Path, contact: str = "gwms@login.example.org:2222", remote_dir: str = "/scratch/gwms"):
    return parse_config(CONFIG.format(work=base / "w", contact=contact, remote_dir=remote_dir), "site.toml",
                        base=base)


def entry_of(config: Any, name: str) -> dict[str, Any]:
    return {**config.section("factory")["entry"][name], "name": name}


def test_from_config(short_dir):
    from gwms.glidein.files import startup_script

    reactor = SSHReactor()
    fake = FakeSSH(ok("31\n"), ok("started\n"))
    config = ssh_config(short_dir)
    sub = SSHGridSubmitter.from_config(config, reactor, fake)
    assert sub.control_dir == short_dir / "w" / "ssh"
    assert sub.startup_script == startup_script()
    remote_entry, box = entry_of(config, "remote"), entry_of(config, "box")
    assert result_of(sub.submit(remote_entry, [GlideinSubmission("g1", (), None)])) == {"g1": "31:g1"}
    assert result_of(sub.submit(box, [GlideinSubmission("g2", (), None)])) == {"g2": "g2"}
    (remote,) = sub.remotes.values()  # the two entries share the connection
    assert Path(remote.control_path).parent == short_dir / "w" / "ssh"
    assert remote.base_argv() == [
        "ssh", "-p", "2222", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"ControlPath={remote.control_path}", "-o", "ServerAliveInterval=30",
        "-i", str(short_dir / "keys" / "id_ed25519"), "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={short_dir / 'keys' / 'known_hosts'}", "-o", "ConnectTimeout=20"]
    a = "/scratch/gwms/remote"
    assert fake.commands[0][0] == [
        "sh", "-c", STAGE_AND_RUN, "gwms-stage", a, f"{a}/g1.sh", "sbatch", "--parsable", "--job-name=gwms-g1",
        "--time=120", f"--output={a}/g1.out", f"--error={a}/g1.err", "--partition=debug", f"{a}/g1.sh"]
    d = f"{HOME}/.gwms/box/g2"  # remote_dir's default, under the remote home
    assert fake.commands[1][0][:6] == ["sh", "-c", STAGE_AND_RUN, "gwms-stage", d, f"{d}/job.sh"]
    assert startup_script().read_text() in fake.commands[0][2].decode()


def test_load_plugin_makes_an_ssh_submitter_that_runs_ssh_through_the_reactor(short_dir, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    reactor = SSHReactor()
    sub = load_plugin("grid submitter", "ssh", GRID_SUBMITTERS, IGridSubmitter, ssh_config(short_dir), reactor)
    assert isinstance(sub, SSHGridSubmitter)
    assert sub.reactor is reactor

    d = sub.query(entry_of(ssh_config(short_dir), "box"), ["g1"])
    (remote,) = sub.remotes.values()
    master, check = reactor.spawned
    assert master.args == remote.master_argv()
    assert check.args == [*remote.base_argv(), "-O", "check", "gwms@login.example.org"]
    check.end(0)
    pwd = reactor.spawned[2]
    assert pwd.args == remote.command_argv(["pwd"])
    pwd.output(1, b"/home/gwms\n")
    pwd.end(0)
    status = reactor.spawned[3]
    assert status.args == remote.command_argv(["sh", "-c", FORK_STATUS, "gwms-status", f"{HOME}/.gwms/box", "60",
                                               "g1"])
    status.output(1, b"g1|running|\n")
    status.end(0)
    assert outcome(d) == {"g1": GridStatus(RUNNING)}


@pytest.mark.parametrize("contact,remote_dir,message", [
    ("gwms@login;reboot", "/scratch", "[factory.entry.remote] contact must be user@host or user@host:port"),
    ("gwms@login;reboot", "/scratch", "for the ssh grid, got 'gwms@login;reboot'"),
    ("gwms@login", "/scratch/../etc", "[factory.entry.remote] remote_dir '/scratch/../etc' is not a usable"),
])
def test_a_bad_ssh_entry_fails_at_start_up(short_dir, contact, remote_dir, message):
    config = ssh_config(short_dir, contact, remote_dir)
    with pytest.raises(ConfigError) as e:
        SSHGridSubmitter.from_config(config, SSHReactor())
    assert str(e.value).startswith("site.toml: ") and message in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_plugin("grid submitter", "ssh", GRID_SUBMITTERS, IGridSubmitter, config, MemoryReactorClock())
    assert message in str(e.value)


def test_an_ssh_entry_with_bad_slurm_keys_fails_at_start_up(short_dir):
    text = CONFIG.format(work=short_dir / "w", contact="u@h", remote_dir="/s").replace(
        'partition = "debug"', 'partition = "debug"\nnodes = 0')
    with pytest.raises(ConfigError, match=r"\[factory.entry.remote\] nodes must be at least 1"):
        load_plugin("grid submitter", "ssh", GRID_SUBMITTERS, IGridSubmitter,
                    parse_config(text, "site.toml", base=short_dir), MemoryReactorClock())



@pytest.mark.parametrize("contact", ["u@h:0", "u@h:65536", "u@h:99999"])
def test_an_ssh_contact_with_a_port_out_of_range_is_refused_at_start_up(contact):
    from gwms.config import ConfigError
    from gwms.plugins.grid_ssh import check_ssh_entry

    with pytest.raises(ConfigError, match=r"port 1-65535"):
        check_ssh_entry("<test>", "e", {"contact": contact, "remote_batch": "fork", "remote_dir": ".gwms"})


def test_a_master_left_by_an_earlier_factory_is_used_not_doubled(short_dir):
    remote, reactor, fake = make_remote(short_dir)
    Path(remote.control_path).touch()  # the socket of a master still running
    assert result_of(remote.ensure_master()) is None
    assert reactor.spawned == []  # no new login
    assert fake.checks_run == [remote.check_argv()]
    assert remote.master_running() and remote.home == HOME
    # Stopping the factory closes it the way ssh closes a master it did not start.
    assert result_of(remote.stop()) is None
    assert fake.calls[-1][0] == [*remote.base_argv(), "-O", "exit", "u@h"]
    assert not remote.master_running()


def test_a_stale_socket_is_replaced_by_a_new_master(short_dir):
    remote, reactor, fake = make_remote(short_dir)
    Path(remote.control_path).touch()
    fake.checks = [failed("Control socket connect: Connection refused")]  # nobody behind it
    assert result_of(remote.ensure_master()) is None
    assert len(reactor.masters) == 1 and remote.master_running()


def test_when_an_adopted_master_goes_the_next_command_starts_a_new_one(short_dir):
    remote, reactor, fake = make_remote(short_dir)
    Path(remote.control_path).touch()
    result_of(remote.ensure_master())
    os.unlink(remote.control_path)  # it exited
    fake.answers = [CommandResult(255, "", "ssh: connect to host h port 22: Connection refused")]
    with pytest.raises(CommandError, match="SSH connection to u@h lost"):
        result_of(remote.run(["true"]))
    assert not remote.master_running()
    d = remote.ensure_master()
    advance_until(reactor, d, 5)
    assert result_of(d) is None and len(reactor.masters) == 1


def test_a_long_control_directory_is_replaced_by_one_named_after_it_under_tmp(tmp_path):
    from gwms.plugins.grid_ssh import _control_dir

    wanted = tmp_path / ("x" * 80) / "ssh"
    first = _control_dir(wanted)
    try:
        assert len(str(first)) <= 64 and first.name.startswith(f"gwms-ssh-{os.getuid()}-")
        assert _control_dir(wanted) == first  # a restarted factory finds its sockets again
        assert _control_dir(tmp_path / ("y" * 80)) != first
        assert (first.stat().st_mode & 0o777) == 0o700
    finally:
        shutil.rmtree(first, ignore_errors=True)


@pytest.mark.parametrize("planted", ["open", "symlink"])
def test_a_control_directory_someone_else_could_use_is_not_taken(tmp_path, planted):
    from gwms.plugins.grid_ssh import _control_dir

    wanted = tmp_path / ("z" * 80)
    expected = _control_dir(wanted)
    shutil.rmtree(expected)
    if planted == "open":
        expected.mkdir(mode=0o777)
        expected.chmod(0o777)
    else:
        expected.symlink_to(tmp_path)
    try:
        got = _control_dir(wanted)
        assert got != expected and (got.stat().st_mode & 0o777) == 0o700
        shutil.rmtree(got)
    finally:
        if expected.is_symlink():
            expected.unlink()
        else:
            shutil.rmtree(expected, ignore_errors=True)
