"""The starter: one job in a fresh sandbox, from its input files to its output files.

An object inside the startd (not a process): it receives the input sandbox from the shadow,
starts the job through the identity-switch plugin, tracks its whole process tree
(``gwms.startd.process``), lists and serves the output sandbox, and removes the sandbox.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gwms import classads
from gwms.credentials import x509
from gwms.protocols.transfer import CHUNK, STDERR, STDOUT, TransferError, check_name, sha256_file

log = Logger()

# The job's delegated proxy in its sandbox (X509_USER_PROXY): a dot file, so never part of the
# output sandbox, and never served by GET_FILE either (its key must not cross the wire).
PROXY_FILE = ".x509up"


def job_argv(job: classads.ClassAd, sandbox: Path, transferred: set[str]) -> list[str]:
    from gwms.submit import split_arguments

    cmd = str(job.get("Cmd", ""))
    if not cmd:
        raise TransferError("the job has no Cmd")
    name = os.path.basename(cmd)
    executable = str(sandbox / name) if name in transferred else cmd
    return [executable, *split_arguments(str(job.get("Arguments", "")))]


def job_environment(job: classads.ClassAd, sandbox: Path, slot_name: str) -> dict[str, str]:
    from gwms.submit import parse_environment

    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(sandbox), "TMPDIR": str(sandbox)}
    env.update(parse_environment(str(job.get("Environment", ""))))
    env["_CONDOR_SCRATCH_DIR"] = str(sandbox)
    env["_CONDOR_SLOT"] = slot_name
    env["_CONDOR_JOB_AD"] = str(sandbox / ".job.ad")
    return env


def wanted_streams(job: classads.ClassAd) -> set[str]:
    """Which of stdout and stderr the job wants back. One it does not want (HTCondor's default
    of /dev/null) goes to /dev/null on the worker too: no file to create, hash and remove."""
    wanted = set()
    for stream, attr in ((STDOUT, "Out"), (STDERR, "Err")):
        if str(job.get(attr, "/dev/null") or "/dev/null") != "/dev/null":
            wanted.add(stream)
    return wanted


class Starter:
    def __init__(self, reactor: Any, switch: Any, execute_dir: Path, slot_name: str, job: classads.ClassAd,
                 process_factory: Any = None) -> None:
        self.reactor = reactor
        self.process_factory = process_factory
        self.switch = switch
        self.slot_name = slot_name
        self.job = job
        self.sandbox = execute_dir / f"dir_{os.getpid()}_{secrets.token_hex(6)}"
        self.sandbox.mkdir(mode=0o700)
        try:
            self.identity = switch.prepare_sandbox(job, self.sandbox)
        except BaseException:  # no account for the job (IdentityError): no sandbox either
            from gwms.startd.process import remove_sandbox

            remove_sandbox(self.sandbox)
            raise
        self._incoming: dict[str, tuple[Any, Any, int]] = {}  # name -> (file, sha256 state, size so far)
        self.received: dict[str, str] = {}  # complete input files -> sha256
        self.process: Any = None
        self.result: Any = None
        self.output_listing: Any = None  # set by the startd once the job has ended
        self.started_at: float | None = None
        self.streams = wanted_streams(job)
        self.finished: defer.Deferred[Any] = defer.Deferred()
        self.proxy_path: Path | None = None  # the delegated proxy, once there is one
        self._delegation_key: Any = None  # the key of the pending delegation request
        (self.sandbox / ".job.ad").write_text(classads.format_old(job, sort=False))

    # -- the job's proxy, delegated the GSI way --------------------------------------------------
    def delegation_request(self, key: Any = None) -> bytes:
        """A key pair for the job's proxy (``key``, made for us, or a new one; kept here) and a
        PEM certificate request for its public key, for the shadow to sign with the user's
        proxy. A later request replaces an unanswered one."""
        key, request = x509.make_delegation_request(key)
        self._delegation_key = key
        return request

    def accept_delegation(self, chain_pem: str) -> x509.ChainInfo:
        """The chain the shadow signed for our request: key + chain go to the job's proxy file
        (Globus order, mode 0600, owned by the job's account), replacing an earlier one
        atomically at the same path. The proxy must be of the identity the job ad names."""
        import datetime

        key = self._delegation_key
        if key is None:
            raise x509.CredentialError("no delegation request is pending (DELEGATE_REQUEST first)")
        now = datetime.datetime.fromtimestamp(self.reactor.seconds(), tz=datetime.timezone.utc)
        cred, info = x509.accept_delegation(key, chain_pem, now=now)
        expected = self.job.get("x509UserProxySubject")
        if isinstance(expected, str) and expected and info.identity != expected:
            raise x509.CredentialError(f"the delegated proxy is of {info.identity}, but the job's "
                                       f"x509UserProxySubject is {expected}")
        path = self.sandbox / PROXY_FILE
        try:
            x509.write_credential(path, cred, owner=self._proxy_owner())
        except PermissionError as e:
            raise x509.CredentialError(f"cannot write the job's proxy {path} for its account: "
                                       f"{e.strerror or e}") from None
        self._delegation_key = None
        self.proxy_path = path
        return info

    def _proxy_owner(self) -> tuple[int, int] | None:
        """(uid, gid) the proxy file is given to: the job's account (from the identity switch),
        when it is not ours already."""
        uid, gid = getattr(self.identity, "uid", None), getattr(self.identity, "gid", None)
        if not isinstance(uid, int) or not isinstance(gid, int):
            return None
        if (uid, gid) == (os.geteuid(), os.getegid()):
            return None
        return uid, gid

    # -- input sandbox ------------------------------------------------------------------------
    def put(self, name: object, offset: int, data: bytes, final: bool, sha256: object, executable: bool) -> None:
        if self.process is not None:
            raise TransferError("the job has started: no more input files")
        name = check_name(name)
        if name in self.received:
            raise TransferError(f"{name} was already received")
        entry = self._incoming.get(name)
        if entry is None:
            if offset != 0:
                raise TransferError(f"{name}: first chunk must start at offset 0, not {offset}")
            mode = 0o700 if executable else 0o600
            fd = os.open(self.sandbox / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            entry = (os.fdopen(fd, "wb"), hashlib.sha256(), 0)
        f, digest, size = entry
        if offset != size:
            raise TransferError(f"{name}: chunk at offset {offset}, expected {size}")
        f.write(data)
        digest.update(data)
        self._incoming[name] = (f, digest, size + len(data))
        if final:
            f.close()
            del self._incoming[name]
            if digest.hexdigest() != sha256:
                (self.sandbox / name).unlink(missing_ok=True)
                raise TransferError(f"{name}: SHA-256 mismatch (expected {sha256}, got {digest.hexdigest()})")
            self.received[name] = digest.hexdigest()

    # -- the job -------------------------------------------------------------------------------
    def start(self) -> None:
        from gwms.startd.process import JobProcess

        factory = self.process_factory or JobProcess
        if self._incoming:
            raise TransferError(f"input files not complete: {', '.join(sorted(self._incoming))}")
        argv = job_argv(self.job, self.sandbox, set(self.received))
        env = job_environment(self.job, self.sandbox, self.slot_name)
        if self.job.get("x509userproxy"):
            if self.proxy_path is None:  # never run a proxy job without its proxy
                raise TransferError("the job's x509userproxy has not been delegated (DELEGATE_PROXY)")
            env["X509_USER_PROXY"] = str(self.proxy_path)
        stdin_name = os.path.basename(str(self.job.get("In", "/dev/null")))
        stdin = self.sandbox / stdin_name if stdin_name in self.received else None
        marker = secrets.token_hex(16)
        self.started_at = time.time()
        stdout, stderr = (self.sandbox / s if s in self.streams else Path(os.devnull) for s in (STDOUT, STDERR))
        self.process = factory(self.reactor, self.switch, self.job, argv, env, self.sandbox, stdin,
                               stdout, stderr, marker)
        self.process.start()
        self.process.finished.addBoth(self._ended)

    def _ended(self, result: Any) -> None:
        if isinstance(result, Failure):
            log.failure("job process tracking failed", result)
        self.result = result
        self.finished.callback(result)

    @property
    def running(self) -> bool:
        return self.process is not None and self.result is None

    def kill(self, grace: float) -> defer.Deferred[Any]:
        if self.process is None or self.result is not None:
            return defer.succeed(self.result)
        return self.process.kill(grace)

    # -- output sandbox ------------------------------------------------------------------------
    def outputs(self) -> list[dict[str, Any]]:
        """What goes back: stdout and stderr (if wanted), and TransferOutput's files (or, without it, every
        file the job created or changed at the top of the sandbox, as HTCondor does)."""
        names: list[str] = [s for s in (STDOUT, STDERR) if s in self.streams]
        listed = str(self.job.get("TransferOutput", "") or "")
        wanted = [n.strip() for n in listed.split(",") if n.strip()]
        if wanted:
            names += [os.path.basename(n) for n in wanted if os.path.basename(n) != PROXY_FILE]
        else:
            since = self.started_at or 0
            for entry in sorted(os.scandir(self.sandbox), key=lambda e: e.name):
                if entry.name in (STDOUT, STDERR) or entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name in self.received and entry.stat().st_mtime < since:
                    continue
                names.append(entry.name)
        items = []
        for name in dict.fromkeys(names):
            path = self.sandbox / name
            if path.is_file() and not path.is_symlink():
                items.append({"Name": name, "Size": path.stat().st_size, "Sha256": sha256_file(path), "Missing": False})
            else:
                items.append({"Name": name, "Size": 0, "Sha256": "", "Missing": True})
        return items

    def read(self, name: object, offset: int, length: int) -> tuple[bytes, bool]:
        name = check_name(name)
        path = self.sandbox / name
        if name == PROXY_FILE or path.is_symlink() or not path.is_file():
            raise TransferError(f"no output file {name}")
        length = max(0, min(length, CHUNK))
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
            return data, f.tell() >= os.fstat(f.fileno()).st_size

    def close(self) -> None:
        """Close input files still being received (the startd then removes the sandbox)."""
        for f, _digest, _size in self._incoming.values():
            f.close()
        self._incoming.clear()
