"""Which accounts a startd's jobs run as: the startd's side of the identity switch.

One place for what the startd checks around its ``IIdentitySwitch``:

- **At start** (``JobAccounts.startup``): the execute directory may be written by nobody but
  the startd (mode 0755 or 0711, owned by the startd's user) and, when jobs run as other
  accounts, must be searchable by them; the pilot credential (``[startd] pilot_credential``) is
  0600 and the startd's own, so that no job can read it; with ``identity_switch = none`` and
  ``allow_shared_identity = true``, one warning saying why that is dangerous.
- **At claim and activation** (``JobAccounts.check``): the switch's own refusal
  (``check_job``: root, unmapped, system accounts...) becomes a CommandError
  ``IDENTITY_REFUSED``; with ``none`` and no ``allow_shared_identity``, a job whose Owner differs
  from the Owner of a job the startd ran, runs or holds a claim for is refused with
  ``SHARED_IDENTITY`` (seed Fig. 2.4c: jobs of different users as one account could read,
  change and kill each other's files and processes, and the startd's).
- **In the slot ads** (``JobAccounts.start``): once an Owner has the startd's account, START
  admits only that Owner's jobs, so that the negotiator stops matching others to it.
- **In the exit status** (``JobAccounts.describe``): the account a job ran as
  (``RemoteAccount``) and, if known, the DN it was mapped from (``RemoteAccountDN``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from gwms import classads
from gwms.config import ConfigError
from gwms.protocols.messages import CommandError

log = Logger()

# Switches whose jobs all run as the startd's own user.
SHARED_IDENTITY_SWITCHES = frozenset({"none"})

SHARED_IDENTITY_WARNING = (
    "identity_switch = none with allow_shared_identity = true: jobs of different users all run "
    "as this startd's own account, so each job can read, change and kill the other users' files "
    "and processes, and the startd's too: its credentials{pilot}, and through the startd the "
    "proxies of every user's job (seed Fig. 2.4c). Use identity_switch = setuid or glexec for "
    "a multi-user pool.")


class JobAccounts:
    def __init__(self, switch: Any, settings: dict[str, Any]) -> None:
        self.switch = switch
        self.shared = getattr(switch, "name", None) in SHARED_IDENTITY_SWITCHES
        self.allow_shared = bool(settings.get("allow_shared_identity", False))
        self.start_text = str(settings.get("start", "true"))
        self.owners: set[str] = set()  # Owners of the jobs it ran or runs
        self._restricted: dict[str, Any] = {}  # owner -> START expression restricted to them

    # -- at start -----------------------------------------------------------------------------
    def startup(self, execute: Path, pilot_credential: Path | None) -> None:
        switching = not self.shared
        self._secure_execute_dir(execute, switching)
        if pilot_credential is not None:
            self._secure_pilot_credential(Path(pilot_credential), switching)
        if self.shared and self.allow_shared:
            pilot = f" (the pilot credential {pilot_credential})" if pilot_credential else ""
            log.warn(SHARED_IDENTITY_WARNING.format(pilot=pilot))
        if switching:
            try:
                with open("/proc/sys/fs/protected_hardlinks") as f:
                    protected = f.read().strip() != "0"
            except OSError:
                protected = True
            if not protected:
                log.warn("fs.protected_hardlinks is 0: a job could hard-link files it cannot read into its "
                         "sandbox and have the startd (root) read or truncate them; set it to 1")

    def _secure_execute_dir(self, execute: Path, switching: bool) -> None:
        st = os.stat(execute)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid():
            message = (f"the execute directory {execute} belongs to uid {st.st_uid}, not to the startd's "
                       f"user (uid {os.geteuid()}): that user could replace the jobs' sandboxes")
            if switching:
                raise ConfigError(message)
            log.warn(message)
            return
        wanted = mode & ~0o022  # nobody else may create, rename or remove sandboxes
        if switching:
            wanted |= 0o711  # the jobs' accounts must reach their sandboxes (never list: 0711 is enough)
        if wanted != mode:
            log.info("execute directory {path}: mode {old:o} -> {new:o}", path=str(execute), old=mode, new=wanted)
            os.chmod(execute, wanted)
        if switching:
            blocked = [str(p) for p in Path(os.path.abspath(execute)).parents
                       if os.path.isdir(p) and not os.stat(p).st_mode & 0o001]
            if blocked:
                log.warn("the jobs' accounts cannot reach the execute directory {path}: {dirs} cannot be "
                         "searched by others (chmod o+x); every job will fail to enter its sandbox",
                         path=str(execute), dirs=", ".join(blocked))

    @staticmethod
    def _secure_pilot_credential(path: Path, switching: bool) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            log.warn("the pilot credential {path} does not exist (yet): its mode is not checked",
                     path=str(path))
            return
        if st.st_uid != os.geteuid():
            message = (f"the pilot credential {path} belongs to uid {st.st_uid}, not to the startd's user "
                       f"(uid {os.geteuid()})")
            if switching:
                raise ConfigError(message + ": a job's account could read it")
            log.warn(message)
            return
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            log.warn("the pilot credential {path} had mode {mode:o}: now 0600, so that no job can read it",
                     path=str(path), mode=mode)
            os.chmod(path, mode & 0o700)

    # -- per job ------------------------------------------------------------------------------
    def check(self, job: Any, claimed_by: Iterable[str] = ()) -> None:
        """Before a claim (``claimed_by``: the Owners of the startd's other claims) and before
        an activation: CommandError if the job may not run here."""
        from gwms.plugins.identity import IdentityError

        owner = str(job.get("Owner", "") or "")
        if self.restricting:
            others = (self.owners | set(claimed_by)) - {owner}
            if others:
                raise CommandError(
                    "SHARED_IDENTITY",
                    f"this startd runs jobs as its own account (identity_switch = none) and has run or "
                    f"holds jobs of another user: a job of {owner!r} would share that account, and each "
                    f"could read, change and kill the other's files and processes. The startd's admin "
                    f"may use identity_switch = setuid or glexec, or allow it (allow_shared_identity, "
                    f"dangerous)")
        check = getattr(self.switch, "check_job", None)
        if check is not None:
            try:
                check(job)
            except IdentityError as e:
                raise CommandError("IDENTITY_REFUSED", f"no account to run the job as: {e}") from None

    @property
    def restricting(self) -> bool:
        """Whether one Owner at a time has the startd's account (``none``, not allowed shared)."""
        return self.shared and not self.allow_shared

    def running(self, job: Any) -> bool:
        """A job of this Owner is activated: from now on the startd's account is theirs (with
        ``none`` and no ``allow_shared_identity``). True if that changes the slots' START."""
        owner = str(job.get("Owner", "") or "")
        if not owner or owner in self.owners:
            return False
        self.owners.add(owner)
        return self.restricting

    def start(self, base: Any, claimed_by: Iterable[str] = ()) -> Any:
        """The slot's START: ``base``, or once one Owner has the startd's account, ``base`` and
        that Owner only."""
        if not self.restricting:
            return base
        owners = self.owners | set(claimed_by)
        if len(owners) != 1:
            return base  # none yet (or, after a restart with the flag changed, several)
        (owner,) = owners
        expr = self._restricted.get(owner)
        if expr is None:
            expr = classads.parse_expr(f"({self.start_text}) && TARGET.Owner =?= {classads.quote(owner)}")
            self._restricted[owner] = expr
        return expr

    @staticmethod
    def describe(identity: Any, ad: classads.ClassAd) -> None:
        """Accounting: the account the job ran as, and the DN it was mapped from."""
        user = getattr(identity, "user", None)
        if isinstance(user, str) and user:
            ad["RemoteAccount"] = user
        dn = getattr(identity, "dn", None)
        if isinstance(dn, str) and dn:
            ad["RemoteAccountDN"] = dn
