"""Identity-switch plugins: under which UNIX identity a job's processes run.

- ``none``: the job runs as the startd's own user (seed Fig. 2.4c). Safe for one user only: the
  startd refuses a second Owner unless ``[startd] allow_shared_identity`` (gwms.startd.accounts).
- ``setuid``: a root startd runs each job as a local account, mapped from the job's proxy DN
  (``x509UserProxySubject``) or its Owner through ``[startd] grid_mapfile``, or the Owner itself
  if it is a local account. Root, uid 0, gid 0, unknown accounts and system accounts (uid below
  ``MIN_JOB_UID``) are refused.
- ``glexec``: the same mapping, but the switch itself is left to an external helper in the
  gLExec role (seed Fig. 2.4b) put in front of the job's command: by default gwms's own
  (``gwms.plugins.glexec_helper``), which authenticates the user's proxy, maps it with the same
  grid-mapfile and switches with setpriv (or runuser).

A switch does not start processes itself: the startd's launcher (``gwms.startd.launcher``)
starts every job under a wrapper that leads the job's session, and does in the job's process
what the switch's ``LaunchSpec`` says (setgroups/setgid/setuid, or a wrapper command in front of
the job's) before it opens the job's files and execs it.

How a sandbox is handed over (setuid, glexec): the starter creates it root-owned, 0700, and
writes the input files into it as root; only when the job starts (``launch``) are the files the
startd wrote (regular, not links, one link only) and then the directory itself given to the job's
account, so that no process of that account can plant anything in it while the startd still
writes there.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zope.interface import implementer

from gwms.interfaces import IIdentitySwitch

# Accounts below this uid are system accounts (login.defs' UID_MIN): jobs never run as them.
MIN_JOB_UID = 1000
# The kernel's overflow uid ("nobody"): shared by every unmapped thing, never a job's account.
OVERFLOW_UIDS = frozenset({65534, 4294967294})


class IdentityError(Exception):
    """The job may not run under any identity this switch allows; the message says why."""


@dataclass(frozen=True)
class JobIdentity:
    """Who a job runs as (and, for accounting, the DN it was mapped from, if it has one)."""

    uid: int
    gid: int
    user: str
    groups: tuple[int, ...] = ()
    dn: str | None = None


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
        return JobIdentity(uid=uid, gid=gid, user=user, groups=tuple(sorted(set(os.getgroups()))),
                           dn=_job_dn(job))

    def launch(self, job: Any, argv: list[str], env: Mapping[str, str], sandbox: Path) -> LaunchSpec:
        # Nothing to switch: the launcher runs as the startd's user already.
        return LaunchSpec(argv=tuple(argv), env=dict(env))


# ---------------------------------------------------------------------------------------------
# Mapping a job to a local account


def _job_dn(job: Any) -> str | None:
    try:
        dn = job.get("x509UserProxySubject")
    except AttributeError:
        return None
    return dn if isinstance(dn, str) and dn.startswith("/") else None


def check_account(account: pwd.struct_passwd, min_uid: int = MIN_JOB_UID, how: str = "") -> None:
    """Refuse, with IdentityError, an account no job may run as: root, uid 0, primary group 0,
    the overflow uid (nobody), system accounts below ``min_uid``."""
    why = f" ({how})" if how else ""
    if account.pw_name == "root" or account.pw_uid == 0:
        raise IdentityError(f"refusing to run a job as root (account {account.pw_name!r}, uid "
                            f"{account.pw_uid}){why}")
    if account.pw_gid == 0:
        raise IdentityError(f"refusing to run a job as {account.pw_name!r}: its primary group is 0 (root){why}")
    if account.pw_uid in OVERFLOW_UIDS:
        raise IdentityError(f"refusing to run a job as {account.pw_name!r} (uid {account.pw_uid}, the "
                            f"overflow uid 'nobody' that many services share){why}")
    if account.pw_uid < min_uid:
        raise IdentityError(f"refusing to run a job as the system account {account.pw_name!r} (uid "
                            f"{account.pw_uid} is below {min_uid}){why}")


def map_account(owner: str, dn: str | None, mapping: Mapping[str, str],
                min_uid: int = MIN_JOB_UID) -> pwd.struct_passwd:
    """The local account a job runs as: its proxy DN's through the grid-mapfile ``mapping``
    (``"DN" account`` lines); else its Owner's ('owner account' lines); else the Owner itself
    if it is a local account. Refuses (IdentityError) unmapped identities, unknown accounts and
    what ``check_account`` refuses."""
    name: str | None = None
    how = ""
    if dn:
        name = mapping.get(dn)
        how = f"the grid-mapfile maps {dn} to it"
    if name is None and owner:
        if owner in mapping:
            name, how = mapping[owner], f"the grid-mapfile maps Owner {owner!r} to it"
        else:
            name, how = owner, "the job's Owner"
    if not name:
        raise IdentityError("the job has neither an Owner nor a mapped proxy DN: no local account to run it as")
    if name.startswith("-") or "\0" in name or "/" in name or ":" in name:
        raise IdentityError(f"{name[:80]!r} is not a local account name ({how})")
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        unmapped = f"the job's DN {dn} is not in the grid-mapfile and " if dn and name == owner else ""
        raise IdentityError(f"{unmapped}there is no local account {name!r} on this machine ({how})") from None
    check_account(account, min_uid, how)
    return account


class GridMap:
    """A worker's grid-mapfile ('"DN" account' and 'owner account' lines, parsed by
    gwms.schedd.mapping), read again whenever it changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._stamp: tuple[int, int, int] | None = None
        self._mapping: dict[str, str] = {}

    def get(self) -> dict[str, str]:
        from gwms.schedd.mapping import MappingError, parse_grid_mapfile

        if self.path is None:
            return {}
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._mapping = parse_grid_mapfile(self.path.read_text(), str(self.path), owners=True)
                self._stamp = stamp
        except OSError as e:
            raise IdentityError(f"cannot read the grid-mapfile {self.path}: {e.strerror or e}") from None
        except MappingError as e:
            raise IdentityError(f"bad grid-mapfile: {e}") from None
        return self._mapping


def hand_over(sandbox: Path, uid: int, gid: int) -> None:
    """Give the sandbox to the job's account: first what the startd wrote into it (regular files
    it owns with one link: never a link, nor anything somebody else made), then the directory
    itself, mode 0700. Without following links anywhere."""
    me = os.geteuid()
    dfd = os.open(sandbox, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in os.listdir(dfd):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                continue  # a symlink (ELOOP) or gone: not ours to hand over
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_uid == me and st.st_nlink == 1:
                    os.fchown(fd, uid, gid)
            finally:
                os.close(fd)
        os.fchown(dfd, uid, gid)
        os.fchmod(dfd, 0o700)
    finally:
        os.close(dfd)


class _MappingSwitch:
    """What setuid and glexec share: the mapping, the checks, the sandbox's hand-over."""

    name = ""

    def __init__(self, grid_mapfile: Path | None = None, min_uid: int = MIN_JOB_UID) -> None:
        self.grid_map = GridMap(grid_mapfile)
        self.min_uid = min_uid
        self._prepared: dict[str, JobIdentity] = {}  # sandbox -> identity, from prepare to launch

    @staticmethod
    def _settings(config: Any, name: str) -> tuple[Path | None, int]:
        from gwms.config import ConfigError

        settings = config.section("startd")
        if os.geteuid() != 0:
            raise ConfigError(f"{config.source}: identity_switch = {name} needs a startd running as root "
                              f"(it runs as uid {os.geteuid()})")
        min_uid = settings["min_job_uid"]
        mapfile = settings["grid_mapfile"]
        if mapfile is not None:
            try:
                GridMap(mapfile).get()
            except IdentityError as e:
                raise ConfigError(f"{config.source}: [startd] grid_mapfile: {e}") from None
        return mapfile, int(min_uid)

    def identity(self, job: Any) -> JobIdentity:
        """The account ``job`` runs as (IdentityError if none may)."""
        owner = str(job.get("Owner", "") or "")
        dn = _job_dn(job)
        account = map_account(owner, dn, self.grid_map.get(), self.min_uid)
        groups = tuple(sorted(set(os.getgrouplist(account.pw_name, account.pw_gid))))
        return JobIdentity(uid=account.pw_uid, gid=account.pw_gid, user=account.pw_name, groups=groups, dn=dn)

    def check_job(self, job: Any) -> JobIdentity:
        """At claim and activation: IdentityError if the job may not run here."""
        return self.identity(job)

    def prepare_sandbox(self, job: Any, sandbox: Path) -> JobIdentity:
        identity = self.identity(job)
        os.chmod(sandbox, 0o700)  # root's until launch: see hand_over
        # Forget what was prepared for sandboxes that are gone (jobs that never started).
        for path in [p for p in self._prepared if not os.path.isdir(p)]:
            del self._prepared[path]
        self._prepared[os.path.abspath(sandbox)] = identity
        return identity

    def _handed_over(self, job: Any, sandbox: Path) -> JobIdentity:
        identity = self._prepared.pop(os.path.abspath(sandbox), None) or self.identity(job)
        hand_over(sandbox, identity.uid, identity.gid)
        return identity


@implementer(IIdentitySwitch)
class SetuidIdentitySwitch(_MappingSwitch):
    """'setuid': a root startd runs each job as the local account it maps to; the launcher
    switches (setgroups, setgid, setuid) in the job's process before it enters the sandbox."""

    name = "setuid"

    @classmethod
    def from_config(cls, config: Any) -> SetuidIdentitySwitch:
        return cls(*cls._settings(config, cls.name))

    def launch(self, job: Any, argv: list[str], env: Mapping[str, str], sandbox: Path) -> LaunchSpec:
        identity = self._handed_over(job, sandbox)
        return LaunchSpec(argv=tuple(argv), env=dict(env), uid=identity.uid, gid=identity.gid,
                          groups=identity.groups)


# ---------------------------------------------------------------------------------------------
# glexec: a helper in the gLExec role

# What real gLExec reads: the user's proxy.
GLEXEC_CLIENT_CERT = "GLEXEC_CLIENT_CERT"
GLEXEC_SOURCE_PROXY = "GLEXEC_SOURCE_PROXY"
JOB_OWNER = "GWMS_JOB_OWNER"
# The job's variables that the helper's privileged stages must not see (see helper_environment).
SAVED_NAMES = "GWMS_GLEXEC_SAVED"
SAVED_PREFIX = "GWMS_GLEXEC_SAVED_"
_HELPER_VARIABLES = (GLEXEC_CLIENT_CERT, GLEXEC_SOURCE_PROXY, JOB_OWNER, SAVED_NAMES)
# What root may see of the job's environment: nothing here changes how a program or a library
# it loads behaves beyond messages and the PATH it searches after the switch.
_PASSED = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TERM", "USER", "LOGNAME", "X509_USER_PROXY",
                     "GWMS_JOB_MARKER", "_CONDOR_SCRATCH_DIR", "_CONDOR_SLOT", "_CONDOR_JOB_AD"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _passes(name: str) -> bool:
    return name in _PASSED or (name.startswith("LC_") and _IDENTIFIER.match(name) is not None)


def helper_environment(env: Mapping[str, str], proxy: str | None, owner: str) -> tuple[dict[str, str], list[str]]:
    """The environment the helper is started with, and the names of job variables dropped.

    The helper and the tool it switches with run as root *with this environment*, and they are
    not set-uid programs, so the dynamic loader (LD_PRELOAD, LD_LIBRARY_PATH, GLIBC_TUNABLES,
    ...), OpenSSL (OPENSSL_CONF), NSS and PAM modules would all honour variables a job may set.
    So only harmless variables pass as they are; every other job variable travels as
    ``GWMS_GLEXEC_SAVED_<NAME>`` (a name nothing interprets), listed in ``GWMS_GLEXEC_SAVED``, and
    the stock helper puts them back only *after* the switch, as the job's user. Variables whose
    names are not shell identifiers cannot be restored that way and are dropped (returned).
    Values the job set for the helper's own variables are replaced."""
    out: dict[str, str] = {}
    saved: list[str] = []
    dropped: list[str] = []
    for name, value in env.items():
        if name in _HELPER_VARIABLES or name.startswith(SAVED_PREFIX):
            dropped.append(name)
        elif _passes(name):
            out[name] = value
        elif _IDENTIFIER.match(name):
            out[SAVED_PREFIX + name] = value
            saved.append(name)
        else:
            dropped.append(name)
    if saved:
        out[SAVED_NAMES] = " ".join(saved)
    if proxy:
        out[GLEXEC_CLIENT_CERT] = out[GLEXEC_SOURCE_PROXY] = proxy
    out[JOB_OWNER] = owner
    return out, dropped


def stock_helper_command(grid_mapfile: Path | None, ca: Path | None, min_uid: int = MIN_JOB_UID) -> list[str]:
    """gwms's own helper (gwms/plugins/glexec_helper.py), with this interpreter, isolated (-I:
    no PYTHON* variable, no user site), by its file so that it runs wherever gwms is unpacked."""
    helper = Path(__file__).with_name("glexec_helper.py")
    argv = [sys.executable, "-I", str(helper)]
    if grid_mapfile is not None:
        argv += ["--grid-mapfile", str(grid_mapfile)]
    if ca is not None:
        argv += ["--ca", str(ca)]
    return [*argv, "--min-uid", str(min_uid), "--"]


@implementer(IIdentitySwitch)
class GlexecIdentitySwitch(_MappingSwitch):
    """'glexec': the job's command behind a helper that switches identity itself (seed Fig.
    2.4b). The startd prepares the sandbox for the account the job maps to (the same rules as
    setuid: the stock helper refuses to run a job in a sandbox that is not its account's) and
    tells the helper the user's proxy (GLEXEC_CLIENT_CERT, GLEXEC_SOURCE_PROXY: the job's
    X509_USER_PROXY, or its x509userproxy file in the sandbox) and Owner (GWMS_JOB_OWNER)."""

    name = "glexec"

    def __init__(self, command: Sequence[str], grid_mapfile: Path | None = None,
                 min_uid: int = MIN_JOB_UID) -> None:
        super().__init__(grid_mapfile, min_uid)
        if not command:
            raise ValueError("the glexec identity switch needs a helper command")
        self.command = tuple(command)

    @classmethod
    def from_config(cls, config: Any) -> GlexecIdentitySwitch:
        mapfile, min_uid = cls._settings(config, cls.name)
        command = list(config.section("startd")["glexec_command"])
        if not command:
            command = stock_helper_command(mapfile, config.pool.get("ca"), min_uid)
        return cls(command, mapfile, min_uid)

    @staticmethod
    def proxy_path(job: Any, env: Mapping[str, str], sandbox: Path) -> str | None:
        """The user's proxy for the helper: X509_USER_PROXY if the job has one (the delegated
        proxy), else the job's x509userproxy file if it was transferred into the sandbox. Only
        a file directly in the sandbox: the helper reads it as root, so the job must not be able
        to point it at somebody else's proxy elsewhere (the helper also checks the proxy's
        chain and that it maps to the sandbox's account)."""
        box = os.path.abspath(sandbox)
        candidates = []
        if env.get("X509_USER_PROXY"):
            candidates.append(os.path.join(box, env["X509_USER_PROXY"]))
        attribute = job.get("x509userproxy") if hasattr(job, "get") else None
        if isinstance(attribute, str) and attribute:
            candidates.append(os.path.join(box, os.path.basename(attribute)))
        for path in candidates:
            path = os.path.normpath(path)
            if os.path.dirname(path) == box and os.path.isfile(path) and not os.path.islink(path):
                return path
        return None

    def launch(self, job: Any, argv: list[str], env: Mapping[str, str], sandbox: Path) -> LaunchSpec:
        self._handed_over(job, sandbox)
        helper_env, dropped = helper_environment(env, self.proxy_path(job, env, sandbox),
                                                 str(job.get("Owner", "") or ""))
        if dropped:
            from twisted.logger import Logger

            Logger().warn("glexec: the job's environment variables {names} cannot go through the helper "
                          "and were dropped", names=", ".join(sorted(n[:40] for n in dropped)))
        return LaunchSpec(argv=(*self.command, *argv), env=helper_env)
