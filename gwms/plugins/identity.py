"""Identity-switch plugins: under which UNIX identity a job's processes run.

Only the stock ``none`` plugin lives here for now (the credentials issue adds ``setuid`` and
``glexec``). A switch does not start processes itself: the startd's launcher
(``gwms.startd.launcher``) starts every job under a wrapper that leads the job's session, and
does in the job's process what the switch's ``LaunchSpec`` says (setgroups/setgid/setuid, or a
wrapper command in front of the job's) before it opens the job's files and execs it."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zope.interface import implementer

from gwms.interfaces import IIdentitySwitch


@dataclass(frozen=True)
class JobIdentity:
    """Who a job runs as."""

    uid: int
    gid: int
    user: str
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class LaunchSpec:
    """What the startd's launcher does for one job between fork and exec, as an identity switch
    decides it (``IIdentitySwitch.launch``). In the job's child process, in this order: a new
    process group (the launcher's wrapper is the session leader), ``setgroups(groups)``,
    ``setgid(gid)``, ``setuid(uid)`` (each only if not None: None keeps the launcher's), chdir to
    the sandbox, stdin/stdout/stderr opened there *as the new identity* (outputs with
    O_NOFOLLOW, mode 0600), signals back to their defaults, ``execvpe(argv[0], argv, env)``.

    ``argv`` may put a wrapper of the switch's own in front of the job's command (a gLExec-like
    tool that switches identity itself, with uid/gid left None). The starter adds
    ``GWMS_JOB_MARKER`` to ``env`` whatever the switch returns."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("a job needs a command: argv is empty")


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

    def launch(self, job: Any, argv: list[str], env: Mapping[str, str], sandbox: Path) -> LaunchSpec:
        # Nothing to switch: the launcher runs as the startd's user already.
        return LaunchSpec(argv=tuple(argv), env=dict(env))
