"""Identity-switch plugins: under which UNIX identity a job's processes run.

Only the stock ``none`` plugin lives here for now (the credentials issue adds ``setuid`` and
``glexec``). Whatever the identity, the job must start as the leader of a new session, so that
the starter can tell the job's processes from its own and signal their process groups."""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zope.interface import implementer

from gwms.interfaces import IIdentitySwitch

# Run by the spawned process in place of the job: start a new session, undo the signal
# dispositions a Python interpreter sets up for itself (it ignores SIGPIPE and SIGXFSZ, and an
# ignored signal stays ignored across exec: a job would then see EPIPE instead of dying in
# `producer | head`), then become the job. Exit codes follow the shells: 127 not found, 126
# not executable. `-I -S` keeps the job's PYTHON* variables and site-packages from changing
# how this one-liner runs.
_SETSID_EXEC = """\
import os, signal, sys
os.setsid()
for s in range(1, signal.NSIG):
    if s not in (signal.SIGKILL, signal.SIGSTOP):
        try:
            signal.signal(s, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
signal.pthread_sigmask(signal.SIG_SETMASK, ())
try:
    os.execvpe(sys.argv[1], sys.argv[1:], os.environ)
except OSError as e:
    os.write(2, ("gwms: cannot execute %r: %s\\n" % (sys.argv[1], e.strerror or e)).encode())
    os._exit(127 if isinstance(e, FileNotFoundError) else 126)
"""


def setsid_argv(argv: list[str]) -> list[str]:
    """``argv`` run as the leader of a new session (for identity switches that exec the job
    directly).

    Why Python and not util-linux ``setsid``: the interpreter running the startd is there on
    every worker node a glidein lands on, ``setsid(1)`` may not be (minimal containers,
    non-Linux-distribution images), and ``setsid(1)`` *forks* when its caller already leads a
    process group, so the pid the starter holds would exit at once and the job would run on
    unwatched. This one-liner never forks: the spawned pid is the job's session id."""
    if not argv:
        raise ValueError("a job needs a command: argv is empty")
    return [sys.executable, "-I", "-S", "-c", _SETSID_EXEC, *argv]


@dataclass(frozen=True)
class JobIdentity:
    """Who a job runs as."""

    uid: int
    gid: int
    user: str
    groups: tuple[int, ...] = ()


def open_job_stdio(stdin: Path | None, stdout: Path, stderr: Path) -> tuple[int, int, int]:
    """Open the job's standard files: stdin (or /dev/null) for reading, stdout and stderr
    created/truncated with mode 0600. The caller owns (and must close) the descriptors.

    stdout and stderr naming the same file share one descriptor: two separate opens would each
    have their own offset and the two streams would overwrite each other. Output files are
    opened with O_NOFOLLOW so that a symlink planted in the sandbox (by an input transfer)
    cannot make the startd truncate a file elsewhere."""
    opened: list[int] = []
    try:
        fd_in = os.open(stdin if stdin is not None else os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        opened.append(fd_in)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd_out = os.open(stdout, flags, 0o600)
        opened.append(fd_out)
        if os.path.abspath(stderr) == os.path.abspath(stdout):
            fd_err = fd_out
        else:
            fd_err = os.open(stderr, flags, 0o600)
            opened.append(fd_err)
        return fd_in, fd_out, fd_err
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise


@implementer(IIdentitySwitch)
class NoIdentitySwitch:
    """'none': the job runs as the startd's own user (seed Fig. 2.4c). Safe only for a
    single-user pool: the job can do whatever the startd can."""

    name = "none"

    @classmethod
    def from_config(cls, config: Any) -> NoIdentitySwitch:
        return cls()

    def prepare_sandbox(self, job: Any, sandbox: Path) -> JobIdentity:
        # The job is the startd's user: the sandbox only has to be closed to everyone else.
        os.chmod(sandbox, 0o700)
        uid, gid = os.geteuid(), os.getegid()
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:  # containers often run with a uid that has no passwd entry
            user = str(uid)
        return JobIdentity(uid=uid, gid=gid, user=user, groups=tuple(sorted(set(os.getgroups()))))

    def spawn(self, reactor: Any, protocol: Any, job: Any, argv: list[str], env: Mapping[str, str],
              sandbox: Path, stdin: Path | None, stdout: Path, stderr: Path) -> Any:
        wrapped = setsid_argv(list(argv))
        fd_in, fd_out, fd_err = open_job_stdio(stdin, stdout, stderr)
        try:
            return reactor.spawnProcess(protocol, wrapped[0], wrapped, env=dict(env), path=str(sandbox),
                                        childFDs={0: fd_in, 1: fd_out, 2: fd_err}, usePTY=False)
        finally:
            # The child has its own copies now (or there is no child): ours would only keep the
            # files open for as long as the startd lives.
            for fd in {fd_in, fd_out, fd_err}:
                os.close(fd)
