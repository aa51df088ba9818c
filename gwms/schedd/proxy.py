"""The users' proxies (``x509userproxy``): checked by the schedd, delegated to jobs the GSI way.

The schedd reads a job's proxy file with the owner's file-system rights (``gwms.userfiles``),
checks that it is a coherent proxy (or certificate) chain with its private key, and records
what HTCondor records: ``x509UserProxySubject`` (the identity DN, the end-entity subject) and
``x509UserProxyExpiration`` (epoch seconds of the earliest notAfter of the chain). A file that
cannot be read, that is not such a credential, or whose chain has expired holds the job with
HoldReasonCode 4 (HTCondor's CorruptedCredential) and a reason naming the path and the problem.
This happens at submit, in the shadow right before it starts the job, and every
``proxy_check_interval`` seconds for idle and running jobs (:func:`check_proxies`).

Delegation (seed section 2.4): the starter makes a key pair and a certificate request; the shadow
signs a new proxy for the request's public key with the user's proxy (:func:`delegate`) and
sends the chain back. The user's private key stays on the submit host, the job's never leaves
the worker. When the user refreshes the file (a changed file: new content), the periodic check
delegates the new proxy to the running job again; so it does when a delegated proxy shorter-lived
than the user's (``delegate_job_GSI_credentials_lifetime``) has a quarter of its life left.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from gwms import userfiles
from gwms.credentials import x509
from gwms.schedd.queue import IDLE, RUNNING

if TYPE_CHECKING:
    from gwms.schedd.service import Schedd

log = Logger()

__all__ = [
    "CORRUPTED_CREDENTIAL",
    "DEFAULT_DELEGATION_LIFETIME",
    "ProxyProblem",
    "UserProxy",
    "check_job",
    "check_proxies",
    "delegate",
    "job_proxy_path",
    "read_user_proxy",
]

CORRUPTED_CREDENTIAL = 4  # HTCondor's HoldReasonCode for a bad or expired proxy
DEFAULT_DELEGATION_LIFETIME = 24 * 3600  # HTCondor's DELEGATE_JOB_GSI_CREDENTIALS_LIFETIME
# A delegated proxy is renewed once this share of its lifetime is left (HTCondor's
# DELEGATE_JOB_GSI_CREDENTIALS_REFRESH), if the user's proxy lasts longer.
REFRESH_FRACTION = 0.25
MAX_PROXY_BYTES = 1024 * 1024  # a proxy file is a few kB; anything this big is not one
SUBJECT = "x509UserProxySubject"
EXPIRATION = "x509UserProxyExpiration"


class ProxyProblem(Exception):
    """A job's proxy file that cannot be used; ``reason`` is the hold reason, ``kind`` one of
    ``unreadable``, ``invalid``, ``expired``."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class UserProxy:
    """A user's proxy file as read now."""

    path: str
    credential: x509.Credential
    info: x509.ChainInfo
    digest: str  # SHA-256 of the file: a refreshed proxy is a different file

    @property
    def subject(self) -> str:
        return self.info.identity

    @property
    def expiration(self) -> int:
        return int(self.info.not_after.timestamp())


def _utc(seconds: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)


def _read(account: userfiles.Account, path: str) -> bytes:
    """The file's bytes, read with the owner's rights. Non-blocking open and a regular-file
    check: a FIFO or a device named as a proxy must not hang or feed the schedd."""
    with userfiles.as_user(account):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ProxyProblem("unreadable", f"x509userproxy {path}: cannot read it as {account.user}: "
                                             f"{e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ProxyProblem("unreadable", f"x509userproxy {path}: not a regular file")
        chunks = []
        size = 0
        while size <= MAX_PROXY_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ProxyProblem("unreadable", f"x509userproxy {path}: cannot read it as {account.user}: "
                                         f"{e.strerror or e}") from None
    finally:
        os.close(fd)
    if size > MAX_PROXY_BYTES:
        raise ProxyProblem("invalid", f"x509userproxy {path}: not a proxy: larger than {MAX_PROXY_BYTES} bytes")
    return b"".join(chunks)


def read_user_proxy(account: userfiles.Account, path: str, now: float) -> UserProxy:
    """Read and check the proxy file ``path`` as ``account`` at epoch ``now``; ProxyProblem if
    it cannot be used (its ``reason`` names the path and what is wrong)."""
    data = _read(account, path)
    digest = hashlib.sha256(data).hexdigest()
    parsed = _PARSED.get(digest)
    if parsed is None:
        try:
            cred = x509.credential_from_pem(data, "the file", need_key=True)
            if cred.key is None:
                raise x509.CredentialError("the file holds no private key")
            info = x509.inspect_chain([cred.cert, *cred.chain])
        except (x509.CredentialError, ValueError, TypeError) as e:  # whatever a hostile file provokes
            raise ProxyProblem("invalid", f"x509userproxy {path}: not a proxy or certificate with its private "
                                          f"key: {e}") from None
        parsed = _PARSED[digest] = (cred, info)
        while len(_PARSED) > _PARSED_MAX:
            _PARSED.popitem(last=False)
    else:
        _PARSED.move_to_end(digest)
    cred, info = parsed
    if info.not_after.timestamp() <= now:
        raise ProxyProblem("expired", f"x509userproxy {path}: expired at "
                                      f"{info.not_after:%Y-%m-%d %H:%M:%S} UTC")
    return UserProxy(path, cred, info, digest)


# Parsed proxies by the SHA-256 of their file: loading an RSA key checks it (tens of ms), and the
# same file is read at every start and every check of every job that names it. Content-addressed:
# a refreshed file is parsed anew; the bytes were read with the reader's own rights each time.
_PARSED: OrderedDict[str, tuple[x509.Credential, x509.ChainInfo]] = OrderedDict()
_PARSED_MAX = 256


def delegate(proxy: UserProxy, request_pem: Any, lifetime: Any, limited: Any, now: float) -> str:
    """The shadow's half of a delegation: a new proxy for the public key of the starter's
    certificate request, signed with the user's proxy; returns the chain to send (PEM, leaf
    first, no private key). ``lifetime`` in seconds (0: the user's proxy's whole remaining
    lifetime; not a positive whole number: 24 h); ``limited``: a limited proxy (always when
    the user's proxy is limited itself)."""
    if not isinstance(request_pem, str):
        raise x509.CredentialError("the starter sent no certificate request")
    public_key = x509.read_delegation_request(request_pem)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime < 0:
        lifetime = DEFAULT_DELEGATION_LIFETIME
    hours = None if lifetime == 0 else lifetime / 3600
    limited = limited is True or x509.is_limited_proxy(proxy.credential.cert)
    chain = x509.sign_delegation(proxy.credential, public_key, hours, limited=limited, now=_utc(now))
    return x509.certificates_pem(chain).decode("ascii")


# -- the schedd's checks ------------------------------------------------------------------------

def _record(schedd: "Schedd", job_id: tuple[int, int], proxy: UserProxy) -> None:
    values: dict[str, Any] = {}
    if schedd.queue.get(job_id, SUBJECT) != proxy.subject:
        values[SUBJECT] = proxy.subject
    if schedd.queue.get(job_id, EXPIRATION) != proxy.expiration:
        values[EXPIRATION] = proxy.expiration
    if values:
        schedd.queue.set(job_id, values)
        schedd.commit_soon()


def check_job(schedd: "Schedd", job_id: tuple[int, int], cache: dict[Any, Any] | None = None) -> UserProxy | None:
    """Check one job's proxy now: record its subject and expiration and return it, or hold the
    job (code 4) and return None. A job without x509userproxy: None, nothing done. ``cache``
    (one per pass) reads each (owner, file) once however many jobs name it."""
    path = schedd.queue.get(job_id, "x509userproxy")
    if not isinstance(path, str) or not path:
        return None
    owner = schedd.queue.owner(job_id) or ""
    key = (owner, path)
    result = cache.get(key) if cache is not None else None
    if result is None:
        try:
            account = schedd.accounts(owner)
            result = read_user_proxy(account, path, schedd.reactor.seconds())
        except userfiles.UserFileError as e:
            result = ProxyProblem("unreadable", f"x509userproxy {path}: {e}")
        except ProxyProblem as e:
            result = e
        if cache is not None:
            cache[key] = result
    if isinstance(result, ProxyProblem):
        log.info("holding {job}: {reason}", job=f"{job_id[0]}.{job_id[1]}", reason=result.reason)
        if schedd.queue.get(job_id, "JobStatus") == RUNNING:
            schedd._act(job_id, "hold", result.reason, code=CORRUPTED_CREDENTIAL)  # its shadow kills it
        else:  # idle (a shadow about to start it sees the hold and does not)
            schedd.hold(job_id, result.reason, code=CORRUPTED_CREDENTIAL)
        schedd.commit_soon()
        return None
    _record(schedd, job_id, result)
    return result


def check_proxies(schedd: "Schedd", job_ids: list[tuple[int, int]] | None = None) -> None:
    """The periodic pass (and the submit-time check, for ``job_ids``): idle and running jobs
    with a proxy are checked; a running job whose proxy file changed since it was delegated
    gets the new one (its shadow delegates again)."""
    cache: dict[Any, Any] = {}
    targets = job_ids if job_ids is not None else schedd.queue.ids(IDLE) + schedd.queue.ids(RUNNING)
    for job_id in targets:
        status = schedd.queue.get(job_id, "JobStatus")
        if status not in (IDLE, RUNNING) or not schedd.queue.get(job_id, "x509userproxy"):
            continue
        try:
            proxy = check_job(schedd, job_id, cache)
        except Exception:
            log.failure("checking the proxy of {job}", job=f"{job_id[0]}.{job_id[1]}")
            continue
        if proxy is None or status != RUNNING:
            continue
        shadow = schedd.shadows.get(job_id)
        if shadow is not None and shadow.job_id == job_id:
            shadow.proxy_changed(proxy)


def job_proxy_path(job: Any) -> str | None:
    path = job.get("x509userproxy") if job is not None else None
    return path if isinstance(path, str) and path else None

