"""gwms's stock helper in the gLExec role: run a command as the local account a user maps to.

::

    python -I .../gwms/plugins/glexec_helper.py [--grid-mapfile FILE] [--ca FILE] [--min-uid N] [--] COMMAND [ARG...]
    python -m gwms.plugins.glexec_helper ...        (the same)

The ``glexec`` identity switch puts it in front of every job's command (``[startd]
glexec_command``, whose default is this helper with the startd's interpreter); the startd's
launcher starts it as root in the job's sandbox, with the job's standard files open. What it
reads, as real gLExec does, from its environment:

- ``GLEXEC_CLIENT_CERT`` (or ``GLEXEC_SOURCE_PROXY``): the user's proxy. Its chain must verify
  against ``--ca`` (an expired, forged or foreign proxy is refused); its end-entity DN is the
  user's identity.
- ``GWMS_JOB_OWNER``: the job's Owner, the identity when there is no proxy (or its DN is not in
  the grid-mapfile).

Then, in order, each refusal one line ``gwms-glexec: ...`` on stderr (the job's) and exit 126:

1. map the identity to a local account (``gwms.plugins.identity.map_account``: the grid-mapfile's
   '"DN" account' and 'owner account' lines, else the Owner if it is a local account); refuse
   root, uid 0, gid 0, nobody, system accounts below ``--min-uid``, unknown and unmapped
   identities;
2. refuse unless the current directory (the sandbox) belongs to that account: the startd
   prepared it for the account it mapped the job to, and both must agree;
3. switch with ``setpriv --reuid --regid --init-groups`` (util-linux), or ``runuser -p -u
   ACCOUNT`` where there is no setpriv, and exec the command: its environment, current
   directory and standard files are the job's.

The job's environment variables that must not reach a root process (the loader's LD_*, ...: see
``gwms.plugins.identity.helper_environment``) arrive renamed ``GWMS_GLEXEC_SAVED_<NAME>`` and
listed in ``GWMS_GLEXEC_SAVED``; after the switch, as the job's user, ``/bin/sh`` gives them their
names back and execs the command.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from pathlib import Path

if not __package__:  # run by its file (python -I: not even its own directory is on sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

REFUSED = 126
# Where the switching tools are looked for: never the job's PATH (the helper is root).
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SHELL = "/bin/sh"
MAX_PROXY_BYTES = 1 << 20
# Run as the job's user: each NAME listed before "--" gets its value back from
# GWMS_GLEXEC_SAVED_NAME (a name the helper checked is a shell identifier; the value is never
# parsed), then the command runs. `command eval`: a name the shell keeps read-only (bash's UID)
# is skipped instead of ending the shell.
RESTORE = ('while [ "$1" != "--" ]; do '
           'command eval "$1=\\${GWMS_GLEXEC_SAVED_$1}; export $1" 2>/dev/null; '
           'unset "GWMS_GLEXEC_SAVED_$1"; shift; done; shift; exec "$@"')
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Refused(Exception):
    pass


def parse_arguments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Options (--grid-mapfile, --ca, --min-uid, each with a value) up to ``--`` or the first
    word that is not one; the rest is the command."""
    options: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg in ("--grid-mapfile", "--ca", "--min-uid"):
            if i + 1 >= len(argv):
                raise Refused(f"{arg} needs a value")
            options[arg[2:]] = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--") and "=" in arg and arg.split("=", 1)[0] in ("--grid-mapfile", "--ca", "--min-uid"):
            name, value = arg[2:].split("=", 1)
            options[name] = value
            i += 1
            continue
        if arg.startswith("-"):
            raise Refused(f"unknown option {arg!r}")
        break
    command = argv[i:]
    if not command:
        raise Refused("no command to run")
    return options, command


def proxy_identity(path: str, ca: str | None) -> str:
    """The end-entity DN of the proxy at ``path``, once its chain verifies against ``ca``."""
    from gwms.credentials import x509

    if not ca:
        raise Refused(f"cannot verify the proxy {path}: no CA (--ca) to verify it with")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise Refused(f"cannot read the proxy {path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused(f"the proxy {path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_PROXY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_PROXY_BYTES:
        raise Refused(f"the proxy {path} is larger than {MAX_PROXY_BYTES} bytes")
    try:
        credential = x509.credential_from_pem(data, path)
        trusted = x509.load_certificates(ca)
        info = x509.verify_chain([credential.cert, *credential.chain], trusted)
    except (x509.CredentialError, OSError, ValueError) as e:
        raise Refused(f"the proxy {path} does not verify: {e}") from None
    return info.identity


def decide(options: dict[str, str], environ: dict[str, str]) -> tuple[object, str | None]:
    """(the passwd entry of the account to run as, the DN it was mapped from or None)."""
    from gwms.plugins.identity import GridMap, IdentityError, map_account

    try:
        min_uid = int(options.get("min-uid", "1000"))
    except ValueError:
        raise Refused(f"--min-uid must be a number, not {options['min-uid']!r}") from None
    proxy = environ.get("GLEXEC_CLIENT_CERT") or environ.get("GLEXEC_SOURCE_PROXY")
    dn = proxy_identity(proxy, options.get("ca")) if proxy else None
    owner = environ.get("GWMS_JOB_OWNER", "")
    mapfile = options.get("grid-mapfile")
    try:
        mapping = GridMap(Path(mapfile) if mapfile else None).get()
        account = map_account(owner, dn, mapping, min_uid)
    except IdentityError as e:
        raise Refused(str(e)) from None
    return account, dn


def switch_command(account: object, command: list[str], saved: list[str]) -> list[str]:
    uid, gid, name = account.pw_uid, account.pw_gid, account.pw_name  # type: ignore[attr-defined]
    setpriv = shutil.which("setpriv", path=SAFE_PATH)
    runuser = shutil.which("runuser", path=SAFE_PATH)
    if setpriv:
        switch = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--"]
    elif runuser:
        switch = [runuser, "-p", "-u", name, "--"]
    else:
        raise Refused(f"neither setpriv nor runuser is installed (looked in {SAFE_PATH})")
    if saved:
        return [*switch, SHELL, "-c", RESTORE, "gwms-glexec", *saved, "--", *command]
    return [*switch, *command]


def main(argv: list[str] | None = None) -> int:
    """Never returns on success (the command replaces it); the exit code on refusal."""
    args = list(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)
    try:
        options, command = parse_arguments(args)
        if os.geteuid() != 0:
            raise Refused(f"must run as root to switch identity (runs as uid {os.geteuid()})")
        account, _dn = decide(options, environ)
        here = os.stat(".")
        if here.st_uid != account.pw_uid:  # type: ignore[attr-defined]
            raise Refused(f"the job maps to {account.pw_name!r} (uid {account.pw_uid}), but its "  # type: ignore[attr-defined]
                          f"directory {os.getcwd()} belongs to uid {here.st_uid}: refusing to run it there")
        saved = environ.pop("GWMS_GLEXEC_SAVED", "").split()
        bad = [n for n in saved if not _IDENTIFIER.match(n)]
        if bad:
            raise Refused(f"GWMS_GLEXEC_SAVED lists {bad[0][:40]!r}, which is not a variable name")
        final = switch_command(account, command, saved)
    except Refused as e:
        print(f"gwms-glexec: {e}", file=sys.stderr, flush=True)
        return REFUSED
    try:
        os.execve(final[0], final, environ)
    except OSError as e:
        print(f"gwms-glexec: cannot execute {final[0]}: {e.strerror}", file=sys.stderr, flush=True)
        return REFUSED
    return REFUSED  # not reached


if __name__ == "__main__":
    sys.exit(main())
