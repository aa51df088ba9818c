"""The authenticated message layer ("CEDAR-like"): one long-lived connection, many commands.

A connection opens in the clear with a HELLO: the client states its policy for the level it
means to use and the authentication methods it can offer; the server combines that with its own
policy (HTCondor's rules, ``gwms.security.negotiate``) and answers with the agreement. If the
agreement needs TLS both sides start it on the same connection, then the client sends AUTH with
its proof (a token, or nothing for x509 where the TLS handshake is the proof) and the server
answers with the identity it authenticated. From then on the connection carries requests, each
with an id, answered in any order, concurrently. Requests on one connection reach their
handlers in the order they were sent, so a client may pipeline a request behind the one it
depends on (the shadow sends its first WAIT_JOB right behind ACTIVATE_CLAIM).

Every request is checked against the server's policy and authorizer for its level; the decision
is made once per connection, command and level, audited once, and reused (this is what keeps
10,000 authenticated updates a second cheap).

Bad input: a frame that breaks the framing gets an ``E`` reply naming the problem and the
connection is closed; a well-framed request with a bad body gets an ``E`` reply and the
connection goes on. Either way the daemon serves everyone else.
"""

from __future__ import annotations

import itertools
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from gwms import classads
from gwms.protocols.framing import ERROR, ITEM, REPLY, REQUEST, Frame, FrameDecoder, FrameError, encode_frame
from gwms.security import (
    ANONYMOUS,
    Agreement,
    AuthenticationFailed,
    AuthorizationRequest,
    ChannelFacts,
    Decision,
    Identity,
    NegotiationFailed,
    ServerSecurity,
    negotiate,
)

log = Logger()

HELLO = "HELLO"
AUTH = "AUTH"


@dataclass(frozen=True)
class Limits:
    max_frame: int = 16 * 1024 * 1024
    handshake_timeout: float = 20.0
    idle_timeout: float = 600.0
    request_timeout: float = 60.0
    max_in_flight: int = 4096

    @classmethod
    def from_pool(cls, pool: Mapping[str, Any]) -> "Limits":
        return cls(max_frame=pool["max_frame_bytes"], idle_timeout=pool["idle_timeout"],
                   request_timeout=pool["request_timeout"])


class CommandError(Exception):
    """A request refused or failed; ``code`` is a stable name, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def error_ad(code: str, message: str) -> classads.ClassAd:
    ad = classads.ClassAd()
    ad["ErrorCode"] = code
    ad["ErrorString"] = message
    return ad


def _error_from_body(body: bytes) -> CommandError:
    try:
        ad = classads.decode(body)
        return CommandError(str(ad.get("ErrorCode", "ERROR")), str(ad.get("ErrorString", "")))
    except classads.ClassAdError:
        return CommandError("ERROR", body[:200].decode("utf-8", "replace"))


@dataclass
class Items:
    """A streamed reply: each item goes out as its own frame (so a query over a large pool is
    never one huge frame), then ``final`` closes the reply. Items may be ClassAds or their
    already-encoded bytes (stores cache encodings)."""

    items: Iterable[Any]
    final: classads.ClassAd = field(default_factory=classads.ClassAd)


@dataclass(frozen=True)
class Command:
    """One command a daemon serves. ``level`` is fixed, or computed from the request ad (an
    UPDATE's level depends on the type of ad it carries)."""

    name: str
    level: str | Callable[[classads.ClassAd], str]
    handler: Callable[["Request"], Any]

    def level_for(self, ad: classads.ClassAd) -> str:
        return self.level if isinstance(self.level, str) else self.level(ad)


@dataclass
class Request:
    command: str
    ad: classads.ClassAd
    identity: Identity
    channel: ChannelFacts
    level: str
    connection: "ServerProtocol"

    def is_allowed(self, level: str) -> bool:
        """Whether this connection may also act at ``level`` (e.g. ADMINISTRATOR); audited."""
        return self.connection.decide(self.command, level).allowed


def no_delay(transport: Any) -> None:
    """TCP_NODELAY where the transport has it. Request/reply traffic of small frames (and the
    relay's tunnels, gwms.protocols.relay): without it Nagle's algorithm meets the peer's
    delayed ACK and replies wait tens of milliseconds."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


class _FramedProtocol(Protocol, TimeoutMixin):
    """Framing, write batching and timeouts shared by both ends."""

    def __init__(self, reactor: Any, limits: Limits) -> None:
        self.reactor = reactor
        self.callLater = reactor.callLater  # TimeoutMixin's clock: the reactor we were given
        self.limits = limits
        self.decoder = FrameDecoder(limits.max_frame)
        self._batch: list[bytes] | None = None
        self.closing = False
        # Set by a side that agreed to TLS: the switch happens after the reply in the clear has
        # been written and only if nothing else arrived in the clear.
        self.switching_to_tls = False
        self._tls_creator: Any = None
        # True on a connection dialled the other way round (the server end connected out):
        # TLS roles then follow the message layer, not TCP.
        self.reversed_connection = False

    def send(self, kind: str, request_id: int, command: str, ad: classads.ClassAd | bytes) -> None:
        body = ad if isinstance(ad, bytes) else classads.encode(ad)
        frame = encode_frame(kind, request_id, command, body)
        if self._batch is not None:
            self._batch.append(frame)
        elif not self.closing:
            self.transport.write(frame)

    def flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch and not self.closing:
            self.transport.write(b"".join(batch))

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        frames, error = self.decoder.feed(data)
        self._batch = []
        try:
            for index, frame in enumerate(frames):
                self.resetTimeout()
                self.frameReceived(frame)
                if self.closing:
                    break
                if self.switching_to_tls and (index + 1 < len(frames) or self.decoder.pending or error):
                    # Bytes that arrived in the clear must not be taken as sent through TLS.
                    self.frameError(FrameError("PROTOCOL_ERROR", "data sent before TLS was started"))
                    break
            else:
                if error is not None and not self.closing:
                    self.frameError(error)
        finally:
            self.flush()
            if self.switching_to_tls and not self.closing:
                self.switching_to_tls = False
                # normal=False: the TLS role is the message layer's, not the TCP connection's
                # (a connect-back: the daemon dialled the client, gwms.gcb).
                self.transport.startTLS(self._tls_creator, not self.reversed_connection)

    def frameReceived(self, frame: Frame) -> None:
        raise NotImplementedError

    def frameError(self, error: FrameError) -> None:
        raise NotImplementedError

    def no_delay(self) -> None:
        no_delay(self.transport)

    def close(self) -> None:
        self.flush()
        self.closing = True
        self.setTimeout(None)
        self.transport.loseConnection()


def _peer_credentials(transport: Any) -> tuple[int, int, int]:
    handle = transport.getHandle()
    raw = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


@implementer(IHandshakeListener)
class ServerProtocol(_FramedProtocol):
    """The daemon's end of a connection."""

    # Until a client has authenticated it may only send small frames: nobody unauthenticated
    # gets to make the daemon buffer megabytes.
    MAX_SETUP_FRAME = 64 * 1024

    def __init__(self, factory: "MessageServerFactory") -> None:
        super().__init__(factory.reactor, factory.limits)
        self.decoder.max_frame = min(self.limits.max_frame, self.MAX_SETUP_FRAME)
        self.factory = factory
        self.security: ServerSecurity = factory.security
        self.state = "hello"
        self.agreement: Agreement | None = None
        self.identity: Identity = ANONYMOUS
        self.channel: ChannelFacts | None = None
        self._decisions: dict[tuple[str, str], Decision] = {}
        self._in_flight: dict[int, Any] = {}
        self._handshake_done = False

    # -- connection life -------------------------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.local = not hasattr(peer, "host")
        if not self.local:
            self.no_delay()
        self.peer_host = "local" if self.local else peer.host
        self.setTimeout(self.limits.handshake_timeout)
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.setTimeout(None)
        self.factory.connections.discard(self)
        for d in list(self._in_flight.values()):
            d.cancel()
        self._in_flight.clear()
        if self.state == "tls" and not self._handshake_done:
            # The TLS handshake failed: a certificate from an unknown CA, an expired proxy, a
            # client that gave up. Authentication failures are audited like refusals.
            from gwms.tls import verify_error

            detail = _tls_reason(reason)
            why = verify_error(self.transport.getHandle()) if self.transport else None
            self._audit_auth_failure(f"TLS handshake failed: {detail}" + (f" ({why})" if why else ""))

    def timeoutConnection(self) -> None:
        log.debug("closing idle connection from {peer}", peer=self.peer_host)
        self.closing = True
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._handshake_done = True

    # -- frames ----------------------------------------------------------------------------
    def frameError(self, error: FrameError) -> None:
        log.info("protocol error from {peer}: {error}", peer=self.peer_host, error=error.message)
        self.send(ERROR, error.request_id, "PROTOCOL", error_ad(error.code, error.message))
        self.close()

    def frameReceived(self, frame: Frame) -> None:
        if frame.kind != REQUEST:
            return self.frameError(FrameError("MALFORMED_FRAME",
                                              f"a client may only send requests, not {frame.kind!r} frames",
                                              frame.request_id))
        if self.state == "ready":
            try:
                return self._request(frame)
            except Exception:
                # A bug in one request must not take down the connection, let alone the daemon.
                return self._reply_failure(frame.request_id, frame.command, Failure())
        if self.state == "hello" and frame.command == HELLO:
            return self._hello(frame)
        if self.state in ("auth", "tls") and frame.command == AUTH:
            # In "tls" state anything that arrives came through TLS: the handshake is done.
            return self._auth(frame)
        expected = {"hello": HELLO, "auth": AUTH, "tls": AUTH}[self.state]
        self.frameError(FrameError("PROTOCOL_ERROR", f"expected {expected}, got {frame.command}",
                                   frame.request_id))

    def _hello(self, frame: Frame) -> None:
        try:
            ad = classads.decode(frame.body)
            level = str(ad.get("Level", "READ"))
            if level not in self.security.levels:
                raise NegotiationFailed(f"unknown authorization level {level!r}")
            methods = ad.get("Methods", [])
            if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
                raise NegotiationFailed("Methods must be a list of strings")
            agreement = negotiate(str(ad.get("Authentication", "OPTIONAL")).upper(),
                                  str(ad.get("Encryption", "OPTIONAL")).upper(), methods,
                                  self.security.levels[level], self.security.methods, self.local, level)
            if agreement.tls and self.security.tls is None:
                raise NegotiationFailed("this daemon has no host certificate, so it cannot run TLS")
        except (classads.ClassAdError, NegotiationFailed) as e:
            code = "NEGOTIATION_FAILED" if isinstance(e, NegotiationFailed) else "MALFORMED_AD"
            self.send(ERROR, frame.request_id, HELLO, error_ad(code, str(e)))
            self._audit_auth_failure(f"negotiation: {e}")
            return self.close()
        self.agreement = agreement
        reply = classads.ClassAd()
        reply["Authenticate"] = agreement.authenticate
        reply["Encrypt"] = agreement.tls
        reply["Method"] = agreement.method or ""
        self.send(REPLY, frame.request_id, HELLO, reply)
        if agreement.tls:
            method = self.security.methods.get(agreement.method) if agreement.method else None
            wants_cert = bool(method is not None and method.wants_client_certificate)
            self._tls_creator = self.security.tls.creator(wants_cert)
            self.switching_to_tls = True
            self.state = "tls"
        else:
            self.state = "auth"

    def _channel_facts(self) -> ChannelFacts:
        chain = None
        uid = pid = None
        tls = bool(self.agreement and self.agreement.tls)
        if tls:
            handle = self.transport.getHandle()
            if isinstance(handle, SSL.Connection):
                chain = handle.get_verified_chain(as_cryptography=True)
        if self.local:
            try:
                pid, uid, _gid = _peer_credentials(self.transport)
            except (OSError, AttributeError):
                pass
        return ChannelFacts(peer_host=self.peer_host, local=self.local, tls=tls,
                            verified_chain=tuple(chain) if chain else None, peer_uid=uid, peer_pid=pid)

    def _auth(self, frame: Frame) -> None:
        self.channel = self._channel_facts()
        agreement = self.agreement
        assert agreement is not None
        try:
            proof = classads.decode(frame.body)
            if agreement.authenticate:
                method = self.security.methods[agreement.method]
                identity = method.authenticate(self.channel, dict(proof.items()))
            else:
                identity = ANONYMOUS
        except (classads.ClassAdError, AuthenticationFailed) as e:
            self.send(ERROR, frame.request_id, AUTH, error_ad("AUTHENTICATION_FAILED", str(e)))
            self._audit_auth_failure(str(e))
            return self.close()
        self.identity = identity
        self.state = "ready"
        self.decoder.max_frame = self.limits.max_frame
        self.setTimeout(self.limits.idle_timeout)
        reply = classads.ClassAd()
        reply["Identity"] = identity.name
        reply["Method"] = identity.method
        reply["Encrypted"] = self.channel.encrypted
        reply["LimitedProxy"] = identity.limited
        self.send(REPLY, frame.request_id, AUTH, reply)

    def _audit_auth_failure(self, reason: str) -> None:
        method = self.agreement.method if self.agreement and self.agreement.method else "none"
        who = Identity(method=method, name="(unauthenticated)", authenticated=False)
        self.security.auditor.record(AuthorizationRequest(who, self.peer_host, "AUTHENTICATE", "-"),
                                     Decision(False, f"authentication: {reason}"))

    # -- requests --------------------------------------------------------------------------
    def decide(self, command: str, level: str) -> Decision:
        key = (command, level)
        decision = self._decisions.get(key)
        if decision is None:
            assert self.channel is not None
            decision = self.security.check(self.identity, self.channel, command, level)
            self._decisions[key] = decision
        return decision

    def _request(self, frame: Frame) -> None:
        rid = frame.request_id
        if rid in self._in_flight:
            return self.send(ERROR, rid, frame.command,
                             error_ad("DUPLICATE_ID", f"request id {rid} is already in flight"))
        if len(self._in_flight) >= self.limits.max_in_flight:
            return self.send(ERROR, rid, frame.command, error_ad(
                "BUSY", f"more than {self.limits.max_in_flight} requests in flight on one connection"))
        command = self.factory.commands.get(frame.command)
        if command is None:
            return self.send(ERROR, rid, frame.command,
                             error_ad("UNKNOWN_COMMAND", f"this daemon has no command {frame.command}"))
        try:
            ad = classads.decode(frame.body)
            level = command.level_for(ad)
        except (classads.ClassAdError, CommandError) as e:
            code = e.code if isinstance(e, CommandError) else "MALFORMED_AD"
            return self.send(ERROR, rid, frame.command, error_ad(code, str(e) if code == "MALFORMED_AD"
                                                                  else e.message))
        decision = self.decide(frame.command, level)
        if not decision.allowed:
            return self.send(ERROR, rid, frame.command, error_ad(
                "PERMISSION_DENIED", f"{self.identity.name} may not {frame.command} at {level} "
                                     f"({decision.rule})"))
        assert self.channel is not None
        request = Request(frame.command, ad, self.identity, self.channel, level, self)
        try:
            result = command.handler(request)
        except Exception:
            return self._reply_failure(rid, frame.command, Failure())
        if isinstance(result, defer.Deferred):
            self._in_flight[rid] = result
            timer = self.callLater(self.limits.request_timeout, result.cancel)
            result.addBoth(self._async_done, rid, frame.command, timer)
        else:
            self._reply(rid, frame.command, result)

    def _async_done(self, result: Any, rid: int, command: str, timer: Any) -> None:
        if timer.active():
            timer.cancel()
        if self._in_flight.pop(rid, None) is None:
            return None  # connection gone
        if isinstance(result, Failure):
            if result.check(defer.CancelledError):
                result = Failure(CommandError("TIMEOUT", f"{command} took longer than "
                                                         f"{self.limits.request_timeout:g} s"))
            self._reply_failure(rid, command, result)
        else:
            self._reply(rid, command, result)
        return None

    def _reply(self, rid: int, command: str, result: Any) -> None:
        if isinstance(result, Items):
            for item in result.items:
                self.send(ITEM, rid, command, item)
            self.send(REPLY, rid, command, result.final)
        else:
            self.send(REPLY, rid, command, result if result is not None else classads.ClassAd())

    def _reply_failure(self, rid: int, command: str, failure: Failure) -> None:
        if failure.check(CommandError):
            err = failure.value
            self.send(ERROR, rid, command, error_ad(err.code, err.message))
        else:
            log.failure("{command} failed", failure, command=command)
            self.send(ERROR, rid, command, error_ad("INTERNAL_ERROR", f"{command} failed inside the daemon"))


def _tls_reason(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        parts = [str(item[-1]) for item in value.args[0] if item]
        return "; ".join(parts) or str(value)
    return str(value) or value.__class__.__name__


class MessageServerFactory(Factory):
    def __init__(self, reactor: Any, security: ServerSecurity, commands: Iterable[Command],
                 limits: Limits = Limits()) -> None:
        self.reactor = reactor
        self.security = security
        self.commands = {c.name: c for c in commands}
        self.limits = limits
        self.connections: set[ServerProtocol] = set()

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        return ServerProtocol(self)


# ------------------------------------------------------------------------------------------
# Client side
# ------------------------------------------------------------------------------------------


class ConnectionFailed(Exception):
    """Could not connect, negotiate or authenticate; the message says which and why."""


class ClientProtocol(_FramedProtocol):
    """The client's end: negotiates, authenticates, then sends requests and correlates replies."""

    def __init__(self, reactor: Any, limits: Limits, security: Any, level: str, hostname: str,
                 setup_timeout: float | None = None, pin: str | None = None,
                 identity: str | None = None) -> None:
        super().__init__(reactor, limits)
        self.setup_timeout = setup_timeout or limits.handshake_timeout
        self.security = security  # gwms.protocols.client.ClientSecurity
        self.level = level
        self.hostname = hostname
        self.pin = pin  # the server's certificate SHA-256, when it is known by that (gwms.tls)
        # The identity the server must prove with its chain, when its host name says nothing (a
        # daemon reached through a connection broker: the name is the broker's).
        self.expected_identity = identity
        self.ready: defer.Deferred[ClientProtocol] = defer.Deferred()
        self.identity: str | None = None
        self.encrypted = False
        self.authenticated = False
        self.method: str | None = None
        self._ids = itertools.count(1)
        # request id -> (Deferred, the items of a streamed reply or None, (deadline, command,
        # timeout) or None)
        self._pending: dict[int, tuple[defer.Deferred[Any], list[bytes] | None, Any]] = {}
        self._deadline_check: Any = None
        self._tls_started = False
        self._failure_reason: str | None = None

    def connectionMade(self) -> None:
        self.local = not hasattr(self.transport.getPeer(), "host")
        if not self.local:
            self.no_delay()
        policy = self.security.levels[self.level]
        hello = classads.ClassAd()
        hello["Level"] = self.level
        hello["Authentication"] = policy.authentication
        hello["Encryption"] = policy.encryption
        hello["Methods"] = self.security.usable_methods(self.level, self.local)
        self.setTimeout(self.setup_timeout)
        self.send(REQUEST, 0, HELLO, hello)

    def timeoutConnection(self) -> None:
        self._fail_setup("timed out while setting up the connection")
        self.transport.abortConnection()

    def _fail_setup(self, message: str) -> None:
        if not self.ready.called:
            self.ready.errback(ConnectionFailed(message))

    def frameError(self, error: FrameError) -> None:
        self._fail_setup(f"protocol error from server: {error.message}")
        self.close()

    def frameReceived(self, frame: Frame) -> None:
        if not self.ready.called:
            return self._setup_frame(frame)
        entry = self._pending.get(frame.request_id)
        if entry is None:
            return  # a reply after our timeout gave up on it
        d, items, _deadline = entry
        stream = items is not None
        if frame.kind == ITEM:
            if items is None:
                return self._pending.pop(frame.request_id)[0].errback(
                    CommandError("MALFORMED_REPLY", f"items in the reply to a {frame.command} that streams none"))
            items.append(frame.body)
            return
        del self._pending[frame.request_id]
        if frame.kind == ERROR:
            d.errback(_error_from_body(frame.body))
            return
        try:
            final = classads.decode(frame.body)
        except classads.ClassAdError as e:
            d.errback(CommandError("MALFORMED_REPLY", str(e)))
            return
        d.callback((final, items or []) if stream else final)

    def _setup_frame(self, frame: Frame) -> None:
        if frame.kind == ERROR:
            err = _error_from_body(frame.body)
            self._fail_setup(f"{frame.command} refused: {err.message}")
            return self.close()
        try:
            ad = classads.decode(frame.body)
        except classads.ClassAdError as e:
            self._fail_setup(f"bad {frame.command} reply: {e}")
            return self.close()
        if frame.command == HELLO:
            self.authenticated = bool(ad.get("Authenticate", False))
            self.method = str(ad.get("Method", "")) or None
            if bool(ad.get("Encrypt", False)):
                try:
                    creator = self.security.tls_creator(self.hostname, self.method == "x509",
                                                        pinned=self.pin is not None)
                except Exception as e:
                    self._fail_setup(str(e))
                    return self.close()
                self.transport.startTLS(creator, not self.reversed_connection)
                self._tls_started = True
            proof = classads.ClassAd()
            if self.method:
                for key, value in self.security.proof(self.method).items():
                    proof[key] = value
            self.send(REQUEST, 0, AUTH, proof)
        elif frame.command == AUTH:
            if self._tls_started and not self._check_server_name():
                return
            self.identity = str(ad.get("Identity", ""))
            self.encrypted = bool(ad.get("Encrypted", False))
            self.setTimeout(None)
            self.ready.callback(self)

    def _check_server_name(self) -> bool:
        from gwms.tls import VerificationError, fingerprint, verify_server_name

        handle = self.transport.getHandle()
        cert = handle.get_peer_certificate(as_cryptography=True) if isinstance(handle, SSL.Connection) else None
        try:
            if cert is None:
                raise VerificationError(errors=["no server certificate"])
            if self.pin is not None:
                if fingerprint(cert) != self.pin:
                    raise VerificationError(errors=[f"its SHA-256 {fingerprint(cert)} is not the advertised {self.pin}"])
            elif self.expected_identity is not None:
                proven = self._server_identity(handle)
                if proven != self.expected_identity:
                    raise VerificationError(errors=[f"it proves {proven!r}, not {self.expected_identity!r}"])
            else:
                verify_server_name(cert, self.hostname)
        except VerificationError as e:
            what = ("the advertised certificate" if self.pin is not None else
                    self.expected_identity if self.expected_identity is not None else self.hostname)
            self._fail_setup(f"server certificate does not match {what}: {e}")
            self.transport.abortConnection()
            return False
        return True

    @staticmethod
    def _server_identity(handle: Any) -> str | None:
        """The identity the server's chain (verified against our CA) proves: the end-entity DN."""
        from gwms.credentials.x509 import CredentialError, chain_info_from_verified
        from gwms.tls import verified_chain

        try:
            chain = verified_chain(handle)
            return chain_info_from_verified(chain).identity if chain else None
        except CredentialError:
            return None

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.setTimeout(None)
        if not self.ready.called:
            detail = _tls_reason(reason) if self._tls_started else str(reason.value)
            self._fail_setup(f"connection closed during set-up: {detail}")
        pending, self._pending = self._pending, {}
        if self._deadline_check is not None and self._deadline_check.active():
            self._deadline_check.cancel()
        for d, _items, _deadline in pending.values():
            d.errback(ConnectionFailed(f"connection lost: {reason.getErrorMessage()}"))

    def call(self, command: str, ad: classads.ClassAd | bytes, timeout: float | None = None,
             stream: bool = False) -> defer.Deferred[Any]:
        """Send a request; the Deferred fires with the reply ad, or with (final ad, [encoded
        items]) if ``stream``, or fails with CommandError / ConnectionFailed."""
        if self.closing or not self.ready.called:
            return defer.fail(ConnectionFailed("connection is not ready"))
        rid = next(self._ids)
        d: defer.Deferred[Any] = defer.Deferred()
        timeout = self.limits.request_timeout if timeout is None else timeout
        deadline = self.reactor.seconds() + timeout if timeout else None
        self._pending[rid] = (d, [] if stream else None, (deadline, command, timeout) if deadline else None)
        self.send(REQUEST, rid, command, ad)
        if deadline is not None and (self._deadline_check is None or not self._deadline_check.active()):
            self._deadline_check = self.callLater(min(timeout, self.DEADLINE_TICK), self._check_deadlines)
        return d

    # One timer per connection, not one per request: at tens of thousands of requests a second
    # a callLater each is a measurable share of the client's time. Timeouts fire up to one
    # tick late.
    DEADLINE_TICK = 1.0

    def _check_deadlines(self) -> None:
        self._deadline_check = None
        now = self.reactor.seconds()
        expired = [rid for rid, (_d, _i, info) in self._pending.items() if info is not None and info[0] <= now]
        for rid in expired:
            d, _items, (_deadline, command, timeout) = self._pending.pop(rid)
            d.errback(CommandError("TIMEOUT", f"no reply to {command} within {timeout:g} s"))
        if any(info is not None for _d, _i, info in self._pending.values()):
            self._deadline_check = self.callLater(self.DEADLINE_TICK, self._check_deadlines)
