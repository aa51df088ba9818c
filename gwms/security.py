"""Security policy: authorization levels, HTCondor's negotiation rules, identities and audit.

The message layer (``gwms.protocols.messages``) asks this module three questions: what a client
and a server agree on when a connection opens (``negotiate``), whether an established channel may
carry a command of a given level (``ServerSecurity.check``), and it records the answer of the
second as one audit event.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from twisted.logger import Logger

from gwms.config import LEVELS, LevelPolicy

# Which levels a grant of a level also grants (HTCondor: WRITE implies READ, ADMINISTRATOR
# implies WRITE; the daemon levels imply READ). Authorization and token scopes both use it.
IMPLIES: Mapping[str, tuple[str, ...]] = {
    "READ": (),
    "WRITE": ("READ",),
    "ADMINISTRATOR": ("WRITE",),
    "DAEMON": ("READ",),
    "NEGOTIATOR": ("READ",),
    "ADVERTISE_STARTD": ("READ",),
    "ADVERTISE_SCHEDD": ("READ",),
    "ADVERTISE_MASTER": ("READ",),
    "ADVERTISE_FACTORY": ("READ",),
    "ADVERTISE_FRONTEND": ("READ",),
}
assert set(IMPLIES) == set(LEVELS)


def granting_levels(level: str) -> frozenset[str]:
    """Every level whose grant also grants ``level`` (including ``level`` itself)."""
    result = {level}
    changed = True
    while changed:
        changed = False
        for grant, implied in IMPLIES.items():
            if grant not in result and result.intersection(implied):
                result.add(grant)
                changed = True
    return frozenset(result)


GRANTING = {level: granting_levels(level) for level in LEVELS}


class NegotiationFailed(Exception):
    """The two sides' policies cannot be satisfied together."""


class AuthenticationFailed(Exception):
    """The client's proof was refused; the message is safe to show to the client."""


def combine(client: str, server: str, what: str) -> bool:
    """HTCondor's rule for one setting (authentication or encryption) of the two sides.

    REQUIRED against NEVER fails; otherwise REQUIRED on either side means yes, then NEVER on
    either side means no, then PREFERRED on either side means yes; OPTIONAL with OPTIONAL is no.
    """
    sides = {client, server}
    if sides == {"REQUIRED", "NEVER"}:
        raise NegotiationFailed(f"{what} is REQUIRED by the "
                                f"{'client' if client == 'REQUIRED' else 'server'} and NEVER "
                                f"allowed by the {'server' if client == 'REQUIRED' else 'client'}")
    if "REQUIRED" in sides:
        return True
    if "NEVER" in sides:
        return False
    return "PREFERRED" in sides


@dataclass(frozen=True)
class Identity:
    """Who is on the other end of a channel, as authenticated."""

    method: str
    name: str
    authenticated: bool = True
    limited: bool = False  # an x509 limited proxy
    scopes: frozenset[str] | None = None  # token scopes; None = not restricted by the credential
    read_only: bool = False

    def permits(self, level: str) -> str | None:
        """Why the credential itself does not allow ``level``, or None if it does."""
        if self.read_only and level != "READ":
            return f"{self.method} identities may only READ"
        if self.scopes is not None and not GRANTING[level] & self.scopes:
            return f"token scope {' '.join(sorted(self.scopes)) or '(empty)'} does not include {level}"
        return None

    @property
    def names(self) -> tuple[str, str]:
        """How authorization lists may name this identity: plainly, or as ``method:name``."""
        return (self.name, f"{self.method}:{self.name}")


ANONYMOUS = Identity(method="anonymous", name="anonymous", authenticated=False, read_only=True)


@dataclass(frozen=True)
class ChannelFacts:
    """What the server knows about a connection when it authenticates the client."""

    peer_host: str  # IP address, or "local" for a UNIX socket
    local: bool
    tls: bool
    verified_chain: tuple[Any, ...] | None = None  # cryptography certificates, leaf first
    peer_uid: int | None = None
    peer_pid: int | None = None

    @property
    def encrypted(self) -> bool:
        # A UNIX socket never leaves the kernel: it counts as a private channel.
        return self.tls or self.local


@dataclass(frozen=True)
class AuthorizationRequest:
    identity: Identity
    peer_host: str
    command: str
    level: str


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str


@dataclass(frozen=True)
class Agreement:
    """What a client and server agreed when the connection opened."""

    authenticate: bool
    encrypt: bool
    method: str | None  # None when not authenticating

    @property
    def tls(self) -> bool:
        return self.encrypt


def negotiate(client_auth: str, client_enc: str, client_methods: Sequence[str],
              server_level: LevelPolicy, server_methods: Mapping[str, Any], local: bool,
              level: str) -> Agreement:
    """The server's decision for a client's HELLO: whether to authenticate and encrypt, and how.

    ``client_methods`` are the methods the client can use, in its order of preference; the first
    one the server also accepts for ``level`` wins. Methods that need TLS force it on (x509 and
    tokens cannot run in the clear), so they always give an encrypted channel; a local channel
    never runs TLS (it is private already).
    """
    authenticate = combine(client_auth, server_level.authentication, f"authentication for {level}")
    encrypt = combine(client_enc, server_level.encryption, f"encryption for {level}")
    method = None
    if authenticate:
        accepted = [m for m in client_methods if m in server_level.methods and m in server_methods]
        usable = [m for m in accepted if local or not server_methods[m].local_only]
        if not usable:
            raise NegotiationFailed(
                f"no common authentication method for {level}: the client offers "
                f"{', '.join(client_methods) or 'none'}, the server accepts "
                f"{', '.join(m for m in server_level.methods if m in server_methods) or 'none'}"
                + ("" if local else " (fs works only over the local socket)"))
        method = usable[0]
        if server_methods[method].requires_tls:
            encrypt = True
    if local:
        encrypt = False
    return Agreement(authenticate=authenticate, encrypt=encrypt, method=method)


class Auditor:
    """One structured event per authorization decision: to the log and, if configured, to a
    JSON-lines file that an operator (or a test) can read without parsing log text."""

    log = Logger(namespace="gwms.audit")

    def __init__(self, path: Path | None = None) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8") if path else None

    def record(self, request: AuthorizationRequest, decision: Decision) -> None:
        event = {
            "identity": request.identity.name,
            "method": request.identity.method,
            "limited_proxy": request.identity.limited,
            "peer": request.peer_host,
            "command": request.command,
            "level": request.level,
            "allowed": decision.allowed,
            "rule": decision.rule,
        }
        # (twisted.logger reserves "level": the authorization level is logged as auth_level)
        self.log.info("{verdict} {identity} ({method}) from {peer}: {command} at {auth_level} by {rule}",
                      verdict="ALLOW" if decision.allowed else "DENY", auth_level=request.level,
                      **{k: v for k, v in event.items() if k != "level"})
        if self._file is not None:
            self._file.write(json.dumps(event, sort_keys=True) + "\n")

    def note(self, event: dict[str, Any]) -> None:
        """A security event that is not an authorization decision (e.g. a factory ignoring a
        frontend's request): logged, and written to the JSON-lines file as it is."""
        self.log.warn("{event}", event=json.dumps(event, sort_keys=True))
        if self._file is not None:
            self._file.write(json.dumps(event, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class ServerSecurity:
    """Everything a listening daemon needs to authenticate and authorize its clients."""

    levels: Mapping[str, LevelPolicy]
    methods: Mapping[str, Any]  # name -> IAuthMethod provider
    authorizer: Any  # IAuthorizer provider
    auditor: Auditor = field(default_factory=Auditor)
    tls: Any = None  # gwms.tls.ServerTLS, or None where no host credential is configured

    def check(self, identity: Identity, channel: ChannelFacts, command: str, level: str) -> Decision:
        """May this channel carry ``command`` at ``level``? Records the decision."""
        policy = self.levels[level]
        request = AuthorizationRequest(identity, channel.peer_host, command, level)
        decision = self._decide(identity, channel, policy, request)
        self.auditor.record(request, decision)
        return decision

    def _decide(self, identity: Identity, channel: ChannelFacts, policy: LevelPolicy,
                request: AuthorizationRequest) -> Decision:
        level = request.level
        if policy.authentication == "REQUIRED" and not identity.authenticated:
            return Decision(False, f"policy: {level} requires authentication")
        if policy.encryption == "REQUIRED" and not channel.encrypted:
            return Decision(False, f"policy: {level} requires encryption")
        if policy.encryption == "NEVER" and channel.tls:
            return Decision(False, f"policy: {level} never allows encryption")
        if identity.authenticated and identity.method not in policy.methods:
            return Decision(False, f"policy: method {identity.method} not accepted for {level}")
        refusal = identity.permits(level)
        if refusal:
            return Decision(False, f"credential: {refusal}")
        return self.authorizer.authorize(request)


def peer_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer address as an ip_address, or None for local sockets and odd transports."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None

