"""A daemon's side of the connection broker: register, keep the tunnel up, serve through it.

``BrokerRegistration`` registers the daemon's name with one broker (``GCB_REGISTER`` over the
message layer), opens the tunnel with the one-time secret it got, and serves every relayed
stream with the daemon's own message-server factory (its normal TLS and authentication run
end to end through the relay). When the tunnel or the broker goes away it registers again,
with a back-off, and tells the daemon its (possibly new) public address.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gwms import classads
from gwms.gcb.broker import TUNNEL_GREETING
from gwms.protocols.client import Address, ClientSecurity, DaemonClient
from gwms.protocols.messages import no_delay

log = Logger()


class TunnelClient(Protocol):
    """Sends the greeting with the secret, then hands the connection to the mux."""

    def __init__(self, secret: str, mux: Any, lost: Callable[[], None]) -> None:
        self.secret = secret
        self.mux = mux
        self.lost = lost

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.transport.write(TUNNEL_GREETING + self.secret.encode("ascii") + b"\n")
        self.transport.protocol = self.mux
        self.mux.makeConnection(self.transport)
        original = self.mux.connectionLost

        def lost(reason: Failure) -> None:
            original(reason)
            self.lost()

        self.mux.connectionLost = lost


CONNECT_BACK_GREETING = b"GCB-CONNECT-BACK "


class ConnectBack(Protocol):
    """A connection this daemon opened to a client that asked for it: it names the request's
    nonce, then serves it like an accepted one (the client runs the message layer's client end)."""

    def __init__(self, nonce: str, server_factory: Any) -> None:
        self.nonce = nonce
        self.server_factory = server_factory

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.transport.write(CONNECT_BACK_GREETING + self.nonce.encode("ascii") + b"\n")
        protocol = self.server_factory.buildProtocol(self.transport.getPeer())
        protocol.reversed_connection = True  # the TLS server end, on a connection it dialled
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)


class BrokerRegistration(service.Service):
    def __init__(self, reactor: Any, broker: Address, name: str, server_factory: Any, security: ClientSecurity,
                 on_address: Callable[[str | None], None], retry: float = 2.0, connector: Any = None) -> None:
        self.reactor = reactor
        self.broker = broker
        # Not `name`: that is twisted's Service.name, unique among a parent's services.
        self.daemon_name = name
        self.server_factory = server_factory
        self.client = DaemonClient(reactor, broker, security, connector=connector)
        self.on_address = on_address
        self.retry = retry
        self.public: str | None = None  # its address at this broker while the tunnel is up
        self.last_port: int | None = None  # asked for again when it registers anew
        self.tunnel: Any = None
        self._pending: Any = None

    def startService(self) -> None:
        super().startService()
        self._register()

    def stopService(self) -> Any:
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self.client.close()
        return defer.succeed(None)

    def _again(self) -> None:
        if self.running and (self._pending is None or not self._pending.active()):
            self._pending = self.reactor.callLater(self.retry, self._register)

    @defer.inlineCallbacks
    def _register(self) -> Any:
        from gwms.protocols.relay import MuxProtocol

        query = classads.ClassAd()
        query["Name"] = self.daemon_name
        if self.last_port is not None:  # the same port again, if the broker restarted meanwhile
            query["WantPort"] = self.last_port
        try:
            reply = yield self.client.call("GCB_REGISTER", query, "DAEMON")
            host, _, port = str(reply["TunnelAddress"]).rpartition(":")
            mux = MuxProtocol(role="daemon", factory=self.server_factory)
            yield connectProtocol(TCP4ClientEndpoint(self.reactor, host, int(port), timeout=5),
                                  TunnelClient(str(reply["TunnelSecret"]), mux, self._tunnel_lost))
        except Exception as e:
            log.warn("gcb: registering {name} with {broker} failed ({error}); again in {s:g} s", name=self.daemon_name,
                     broker=str(self.broker), error=str(e), s=self.retry)
            self._again()
            return
        self.public = str(reply["PublicAddress"])
        self.last_port = int(self.public.rpartition(":")[2])
        log.info("gcb: {name} reachable at {public} through {broker}", name=self.daemon_name, public=self.public,
                 broker=str(self.broker))
        self.on_address(self.public)
        self.tunnel = mux
        self._wait_events(mux)

    @defer.inlineCallbacks
    def _wait_events(self, mux: Any) -> Any:
        """Long-poll the broker for clients that ask this daemon to connect to them (HTCondor's
        CCB way: no relay), for as long as this tunnel lives."""
        query = classads.ClassAd()
        query["Name"] = self.daemon_name
        query["Timeout"] = 20
        while self.running and self.tunnel is mux and mux.transport is not None:
            try:
                event = yield self.client.call("GCB_WAIT_EVENT", query, "DAEMON", timeout=40)
            except Exception as e:
                log.info("gcb: waiting for events from {broker} stopped: {error}", broker=str(self.broker),
                         error=str(e))
                return
            address, nonce = event.get("ConnectBack"), event.get("Nonce")
            if isinstance(address, str) and isinstance(nonce, str):
                self._connect_back(address, nonce)

    def _connect_back(self, address: str, nonce: str) -> None:
        host, _, port = address.rpartition(":")
        d = connectProtocol(TCP4ClientEndpoint(self.reactor, host, int(port), timeout=5),
                            ConnectBack(nonce, self.server_factory))
        d.addErrback(lambda f: log.info("gcb: connecting back to {address} failed: {error}", address=address,
                                        error=f.getErrorMessage()))

    def _tunnel_lost(self) -> None:
        self.tunnel = None
        self.public = None
        self.on_address(None)  # the daemon may advertise another broker's address meanwhile
        log.info("gcb: the tunnel to {broker} closed; registering again", broker=str(self.broker))
        self.client.close()
        self._again()


class Brokers(service.MultiService):
    """A daemon's registrations with its brokers (``[pool] brokers``): ``current`` is the first
    that has it registered now, whose public address the daemon advertises; ``on_change`` is
    called whenever that may have changed (a registration came or went)."""

    def __init__(self, reactor: Any, addresses: list[tuple[str, int]], name: str, server_factory: Any,
                 security: ClientSecurity, on_change: Callable[[], None]) -> None:
        super().__init__()
        self.registrations = [
            BrokerRegistration(reactor, Address(host=host, port=port), name, server_factory, security,
                               lambda _public: on_change())
            for host, port in addresses]
        for registration in self.registrations:
            registration.setServiceParent(self)

    @property
    def current(self) -> BrokerRegistration | None:
        return next((r for r in self.registrations if r.public), None)


def brokered_listener_options(config: Any, tcp: tuple[str, int]) -> tuple[tuple[str, int] | None, bool]:
    """(the TCP address a role listens on, whether it registers with brokers): none with
    ``[pool] broker_only`` (then it must have brokers)."""
    from gwms.config import ConfigError

    brokers = bool(config.pool["brokers"])
    if config.pool["broker_only"]:
        if not brokers:
            raise ConfigError(f"{config.source}: [pool] broker_only needs [pool] brokers")
        return None, True
    return tcp, brokers
