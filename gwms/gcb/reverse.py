"""The client's side of a connect-back (HTCondor's CCB way): a daemon registered with a broker
connects out to a client that can be reached, instead of the broker relaying.

A client with a TCP listener (the schedd) asks the daemon's broker (``GCB_CONNECT_BACK``, with
its own address and a fresh nonce); the daemon connects to that listener and names the nonce
in its first line; the listener (``ConnectBackFactory`` around the client's own server
factory: normal connections pass through untouched) hands that connection to the waiting
request, which runs the message layer's client end on it (TLS and authentication as always).
If no connection comes within a few seconds, or the broker cannot ask, the client connects
through the broker's relay instead.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from gwms import classads
from gwms.gcb.client import CONNECT_BACK_GREETING
from gwms.protocols.client import Address, ClientSecurity, DaemonClient, connect
from gwms.protocols.messages import ClientProtocol, Limits

log = Logger()

WAIT_FOR_CONNECT_BACK = 5.0


class _Sniffer(Protocol):
    """Looks at a connection's first bytes: a connect-back names its nonce; anything else is
    handed to the wrapped factory's protocol at once (a frame length never starts with 'G')."""

    def __init__(self, owner: "ConnectBackFactory", addr: Any) -> None:
        self.owner = owner
        self.addr = addr
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not CONNECT_BACK_GREETING.startswith(self.buffer[:len(CONNECT_BACK_GREETING)]):
            return self._pass_on()
        if b"\n" not in self.buffer:
            if len(self.buffer) > len(CONNECT_BACK_GREETING) + 80:
                self.transport.loseConnection()
            return
        line, _, rest = self.buffer.partition(b"\n")
        nonce = line[len(CONNECT_BACK_GREETING):].decode("ascii", "replace")
        waiting = self.owner.pending.pop(nonce, None)
        if waiting is None or waiting.called:
            log.info("gcb: a connect-back with an unknown nonce from {peer}: closed", peer=str(self.addr))
            self.transport.loseConnection()
            return
        self.transport.protocol = Protocol()  # until the requester takes it over
        waiting.callback((self.transport, rest))

    def _pass_on(self) -> None:
        protocol = self.owner.inner.buildProtocol(self.addr)
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        if self.buffer:
            protocol.dataReceived(self.buffer)


class ConnectBackFactory(Factory):
    """The client's listener: connect-backs go to the requests waiting for them, everything
    else to ``inner`` (the daemon's own message server)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.pending: dict[str, defer.Deferred[Any]] = {}

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Sniffer(self, addr)

    def __getattr__(self, name: str) -> Any:  # connections, security, ...: the inner factory's
        return getattr(self.inner, name)


class ConnectBackConnector:
    """A DaemonClient connector: to a brokered daemon (its Address names a broker), ask for a
    connect-back to ``my_address``; otherwise, or when that fails, connect as usual (through
    the relay for a brokered daemon)."""

    def __init__(self, reactor: Any, listener: ConnectBackFactory, my_address: Any, security: ClientSecurity) -> None:
        self.reactor = reactor
        self.listener = listener
        self.my_address = my_address  # a callable: this client's reachable host:port, or ""
        self.security = security
        self.brokers: dict[str, DaemonClient] = {}

    def __call__(self, reactor: Any, address: Address, level: str, security: ClientSecurity,
                 limits: Limits = Limits(), connect_timeout: float = 2.0) -> defer.Deferred[ClientProtocol]:
        if address.broker is None or not self.my_address():
            return connect(reactor, address, level, security, limits, connect_timeout)
        d = self._connect_back(address, level, security, limits, connect_timeout)

        def relay_instead(failure: Any) -> Any:
            log.info("gcb: no connect-back from {name} ({error}); through the relay instead",
                     name=address.broker_name, error=failure.getErrorMessage())
            return connect(reactor, address, level, security, limits, connect_timeout)

        return d.addErrback(relay_instead)

    @defer.inlineCallbacks
    def _connect_back(self, address: Address, level: str, security: ClientSecurity, limits: Limits,
                      connect_timeout: float) -> Any:
        broker = self.brokers.get(address.broker)
        if broker is None:
            broker = self.brokers[address.broker] = DaemonClient(self.reactor, Address.parse(address.broker),
                                                                 self.security)
        nonce = secrets.token_hex(32)
        arrived: defer.Deferred[Any] = defer.Deferred()
        self.listener.pending[nonce] = arrived
        timer = self.reactor.callLater(WAIT_FOR_CONNECT_BACK, lambda: None if arrived.called else arrived.errback(
            TimeoutError(f"no connection within {WAIT_FOR_CONNECT_BACK:g} s")))
        request = classads.ClassAd()
        request["Name"] = address.broker_name
        request["Address"] = self.my_address()
        request["Nonce"] = nonce
        try:
            yield broker.call("GCB_CONNECT_BACK", request, "DAEMON")
            transport, rest = yield arrived
        finally:
            self.listener.pending.pop(nonce, None)
            if timer.active():
                timer.cancel()
        proto = ClientProtocol(self.reactor, limits, security, level, address.host,
                               setup_timeout=2 * connect_timeout, pin=address.pin, identity=address.identity)
        proto.reversed_connection = True  # the TLS client end, on a connection it accepted
        transport.protocol = proto
        proto.makeConnection(transport)
        if rest:
            proto.dataReceived(rest)
        result = yield proto.ready
        return result
