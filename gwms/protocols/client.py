"""The one client library every role and every CLI tool uses to talk to a daemon.

``DaemonClient`` keeps one authenticated connection per authorization level to one daemon and
reconnects when it drops. ``CollectorList`` talks to a pool's collectors: updates go to all of
them, queries go to one and fail over at once to the next when one is down (connect timeouts
are short and a collector that just failed is tried last), so a dead collector never stalls
``gwms status`` on long timeouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.logger import Logger

from gwms import classads
from gwms.config import LEVELS, HostConfig, LevelPolicy, parse_config
from gwms.credentials.x509 import Credential, load_credential
from gwms.protocols.messages import ClientProtocol, CommandError, ConnectionFailed, Limits

log = Logger()


@dataclass(frozen=True)
class Address:
    """Where a daemon listens: ``host:port`` or ``unix:/path``."""

    host: str = ""
    port: int = 0
    path: str | None = None
    pin: str | None = None  # the server's certificate SHA-256, for a daemon known by it (gwms.tls)
    # A daemon reached through a connection broker (gwms.gcb): the broker's registration
    # address and the daemon's name there, for asking it to connect back instead of relaying.
    broker: str | None = None
    broker_name: str | None = None
    identity: str | None = None  # the identity its certificate must prove, instead of naming the host

    @classmethod
    def parse(cls, text: str) -> "Address":
        from gwms.config import parse_address

        if text.startswith("unix:"):
            return cls(path=text[5:])
        host, port = parse_address(text)
        return cls(host=host, port=port)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class ClientCredentials:
    x509: Credential | None = None
    token: str | None = None


class ClientSecurity:
    """A client's policy per level, the methods it knows, and the credentials it holds."""

    def __init__(self, levels: Mapping[str, LevelPolicy], methods: Mapping[str, Any],
                 credentials: ClientCredentials, ca_file: Path | None) -> None:
        self.levels = levels
        self.methods = methods
        self.credentials = credentials
        self.ca_file = ca_file
        self._tls: Any = None

    def usable_methods(self, level: str, local: bool) -> list[str]:
        return [m for m in self.levels[level].methods
                if m in self.methods and self.methods[m].client_can_use(self.credentials, local)]

    def tls_creator(self, hostname: str, present_certificate: bool, pinned: bool = False) -> Any:
        from gwms.tls import ClientTLS

        if self._tls is None:
            self._tls = ClientTLS(self.ca_file, self.credentials.x509)
        return self._tls.creator(hostname, present_certificate, pinned)

    def proof(self, method: str) -> Mapping[str, Any]:
        return self.methods[method].client_proof(self.credentials)

    @classmethod
    def from_config(cls, config: HostConfig, environment: Mapping[str, str] | None = None) -> "ClientSecurity":
        """A daemon's or a user's client security: credentials from the configuration, and for
        people also from the usual environment variables (X509_USER_PROXY, X509_USER_CERT and
        X509_USER_KEY, GWMS_CA_FILE, GWMS_TOKEN_FILE / BEARER_TOKEN_FILE)."""
        from gwms.plugins import load_auth_methods

        env = environment if environment is not None else {}
        pool = config.pool
        ca = pool["ca"] or _env_path(env, "GWMS_CA_FILE")
        credential = None
        proxy = pool["proxy"] or _env_path(env, "X509_USER_PROXY")
        cert = pool["cert"] or _env_path(env, "X509_USER_CERT")
        key = pool["key"] or _env_path(env, "X509_USER_KEY")
        if proxy is not None and proxy.exists():
            credential = load_credential(proxy)
        elif cert is not None:
            credential = load_credential(cert, key)
        token_file = pool["token"] or _env_path(env, "GWMS_TOKEN_FILE") or _env_path(env, "BEARER_TOKEN_FILE")
        token = None
        if token_file is not None:
            try:
                token = token_file.read_text().strip()
            except OSError as e:
                raise ConnectionFailed(f"cannot read token file {token_file}: {e.strerror}") from None
        methods, levels = load_auth_methods(config)
        return cls(levels, methods, ClientCredentials(x509=credential, token=token), ca)


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name)
    return Path(value) if value else None


def default_client_config() -> HostConfig:
    """What a user without a configuration file gets: READ in the clear if the pool allows it,
    everything else authenticated and encrypted, every stock method."""
    return parse_config('[security]\nmethods = ["x509", "token", "fs", "anonymous"]\n', "<defaults>")


def connect(reactor: Any, address: Address, level: str, security: ClientSecurity,
            limits: Limits = Limits(), connect_timeout: float = 2.0) -> defer.Deferred[ClientProtocol]:
    """Connect, negotiate and authenticate; fires with a ready ClientProtocol or fails with
    ConnectionFailed saying what went wrong. ``connect_timeout`` bounds the TCP connect and
    twice it the whole set-up, so a daemon that accepts but never answers is given up on as
    quickly as one that is down."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level}")
    if address.path:
        endpoint: Any = UNIXClientEndpoint(reactor, address.path, timeout=connect_timeout)
        hostname = "localhost"
    else:
        endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=connect_timeout)
        hostname = address.host
    proto = ClientProtocol(reactor, limits, security, level, hostname, setup_timeout=2 * connect_timeout,
                           pin=address.pin, identity=address.identity)

    def connected(p: ClientProtocol) -> defer.Deferred[ClientProtocol]:
        return p.ready

    def failed(f: Any) -> Any:
        if f.check(ConnectionFailed):
            return f
        raise ConnectionFailed(f"cannot connect to {address}: {f.getErrorMessage()}")

    d = connectProtocol(endpoint, proto)
    d.addCallback(connected)
    d.addErrback(failed)
    return d


Connector = Callable[[Any, Address, str, ClientSecurity, Limits, float], "defer.Deferred[ClientProtocol]"]


class DaemonClient:
    """Calls to one daemon, over one connection per authorization level, reconnected on demand.

    ``connector`` makes the connections: the real ``connect`` by default, or an in-memory one
    (``gwms.testing.MemoryNetwork.connector``) so that whole pools run on one fake reactor."""

    def __init__(self, reactor: Any, address: Address, security: ClientSecurity,
                 limits: Limits = Limits(), connect_timeout: float = 2.0,
                 connector: Connector | None = None) -> None:
        self.reactor = reactor
        self.address = address
        self.security = security
        self.limits = limits
        self.connect_timeout = connect_timeout
        self.connector = connector or connect
        self._connections: dict[str, ClientProtocol] = {}
        self._connecting: dict[str, list[defer.Deferred[ClientProtocol]]] = {}

    def connection(self, level: str) -> defer.Deferred[ClientProtocol]:
        proto = self._connections.get(level)
        if proto is not None and not proto.closing and proto.transport is not None and proto.transport.connected:
            return defer.succeed(proto)
        self._connections.pop(level, None)
        waiter: defer.Deferred[ClientProtocol] = defer.Deferred()
        waiters = self._connecting.get(level)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._connecting[level] = [waiter]

        def done(result: Any) -> None:
            for w in self._connecting.pop(level, []):
                if isinstance(result, ClientProtocol):
                    w.callback(result)
                else:
                    w.errback(result)
            if isinstance(result, ClientProtocol):
                self._connections[level] = result

        self.connector(self.reactor, self.address, level, self.security, self.limits,
                       self.connect_timeout).addBoth(done)
        return waiter

    def call(self, command: str, ad: classads.ClassAd | bytes, level: str,
             timeout: float | None = None, stream: bool = False) -> defer.Deferred[Any]:
        return self.connection(level).addCallback(lambda p: p.call(command, ad, timeout, stream))

    def close(self) -> None:
        for proto in self._connections.values():
            proto.close()
        self._connections.clear()


class CollectorList:
    """The pool's collectors as one: advertise to all, query with instant fail-over."""

    def __init__(self, reactor: Any, addresses: Sequence[Address], security: ClientSecurity,
                 limits: Limits = Limits(), connect_timeout: float = 2.0, retry_after: float = 30.0,
                 connector: Connector | None = None) -> None:
        if not addresses:
            raise ValueError("no collectors configured")
        self.reactor = reactor
        self.clients = [DaemonClient(reactor, a, security, limits, connect_timeout, connector) for a in addresses]
        self.retry_after = retry_after
        self._failed_at: dict[int, float] = {}

    def _order(self) -> list[int]:
        now = self.reactor.seconds()
        fresh = [i for i in range(len(self.clients)) if now - self._failed_at.get(i, -1e18) > self.retry_after]
        stale = sorted((i for i in range(len(self.clients)) if i not in fresh),
                       key=lambda i: self._failed_at[i])
        return fresh + stale

    def advertise(self, ad: classads.ClassAd, level: str, command: str = "UPDATE") -> defer.Deferred[list[Any]]:
        """Send to every collector; fires with one entry per collector: the reply or the Failure."""
        body = classads.encode(ad)
        calls = [c.call(command, body, level) for c in self.clients]
        d = defer.DeferredList(calls, consumeErrors=True)
        return d.addCallback(lambda results: [r for _ok, r in results])

    @defer.inlineCallbacks
    def query(self, command: str, ad: classads.ClassAd, level: str = "READ") -> Any:
        """Ask one collector; fires with (final ad, [encoded ads]). On a connection failure go
        on at once to the next one; a refusal (CommandError) is an answer, not an outage, and
        is raised."""
        errors = []
        for i in self._order():
            client = self.clients[i]
            try:
                result = yield client.call(command, ad, level, stream=True)
            except ConnectionFailed as e:
                self._failed_at[i] = self.reactor.seconds()
                errors.append(f"{client.address}: {e}")
                continue
            self._failed_at.pop(i, None)
            return result
        raise ConnectionFailed("no collector answered (" + "; ".join(errors) + ")")

    def close(self) -> None:
        for c in self.clients:
            c.close()


def first_failure(results: Sequence[Any]) -> str | None:
    """The first error in what ``DeferredList`` of ``CollectorList.advertise`` calls fired with
    (each a list with one reply or Failure per collector), or None if all went through."""
    for _ok, per_collector in results:
        for r in per_collector if isinstance(per_collector, list) else [per_collector]:
            if hasattr(r, "getErrorMessage"):
                return str(r.getErrorMessage())
    return None


def query_ads(collectors: CollectorList, ad_type: str, constraint: str | None = None,
              projection: Sequence[str] = (), private: bool = False) -> defer.Deferred[list[classads.ClassAd]]:
    """The ads of a type (``"any"`` for all) that satisfy a constraint."""
    query = classads.ClassAd()
    query["TargetType"] = ad_type
    if constraint:
        query["Requirements"] = classads.parse_expr(constraint)
    if projection:
        query["Projection"] = ",".join(projection)
    command, level = ("QUERY_PRIVATE", "NEGOTIATOR") if private else ("QUERY", "READ")
    d = collectors.query(command, query, level)
    return d.addCallback(lambda result: [classads.decode(b) for b in result[1]])


__all__ = ["Address", "ClientCredentials", "ClientSecurity", "CollectorList", "CommandError",
           "ConnectionFailed", "DaemonClient", "connect", "query_ads", "default_client_config"]
