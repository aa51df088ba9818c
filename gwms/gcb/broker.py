"""The connection broker (``twistd -n gwms-gcb --config FILE``), seed section 2.3.

A daemon that can only connect out registers over the message layer (``GCB_REGISTER``, at the
level ``[gcb] registration_level``, DAEMON by default: nobody can take over another daemon's
name) and gets a port of its own on the broker and a one-time tunnel secret. It then opens a
plain TCP tunnel to the broker (``GCB-TUNNEL <secret>`` as the first line); from then on the
tunnel carries many relayed streams (``gwms.protocols.relay``: multiplexed, each with its own
flow control). A connection to the daemon's port becomes one stream; the daemon's end runs
its normal message layer on it, TLS included, so the broker sees only ciphertext.

A name registered again (the daemon reconnecting, or the broker restarted) gets its old port
back when it is free, and the old tunnel is closed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from gwms import classads
from gwms.config import HostConfig
from gwms.daemon import DaemonOptions, MessageListener, message_factory
from gwms.protocols.messages import Command, CommandError, Request, no_delay

log = Logger()

TUNNEL_GREETING = b"GCB-TUNNEL "
MAX_GREETING = 256


@dataclass
class Registration:
    name: str
    identity: str
    secret: str
    port: Any = None  # the listening port of the daemon's public address
    mux: Any = None  # the tunnel, once the daemon has opened it
    waiter: Any = None  # the daemon's pending GCB_WAIT_EVENT: how to ask it to connect back



class TunnelGreeting(Protocol):
    """The first line of a tunnel names its registration's secret; the rest is the mux."""

    def __init__(self, broker: "Broker") -> None:
        self.broker = broker
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" not in self.buffer:
            if len(self.buffer) > MAX_GREETING:
                log.warn("gcb: a tunnel sent no greeting line: closed")
                self.transport.loseConnection()
            return
        line, _, rest = self.buffer.partition(b"\n")
        if not line.startswith(TUNNEL_GREETING):
            log.warn("gcb: a tunnel greeted with {line!r}: closed", line=line[:40])
            self.transport.loseConnection()
            return
        registration = self.broker.by_secret(line[len(TUNNEL_GREETING):].decode("ascii", "replace").strip())
        if registration is None:
            log.warn("gcb: a tunnel with an unknown secret: closed")
            self.transport.loseConnection()
            return
        no_delay(self.transport)
        mux = self.broker.make_mux()
        self.transport.protocol = mux  # from here on the connection speaks the mux
        mux.makeConnection(self.transport)
        self.broker.tunnel_up(registration, mux)
        if rest:
            mux.dataReceived(rest)


class RegistrationRelay(Factory):
    """A registered daemon's public port: each connection becomes a stream of its tunnel (none
    while the daemon has not opened its tunnel: the connection is refused)."""

    def __init__(self, registration: Registration) -> None:
        self.registration = registration

    def buildProtocol(self, addr: Any) -> Any:
        from gwms.protocols.relay import RelayedConnection

        mux = self.registration.mux
        if mux is None or mux.transport is None:
            log.info("gcb: {name} has no tunnel: connection from {peer} refused", name=self.registration.name,
                     peer=str(addr))
            return None
        log.info("gcb: relaying a connection from {peer} to {name}", peer=str(addr), name=self.registration.name)
        return RelayedConnection(mux)


class Broker:
    """The broker's registrations and commands, independent of how it is run."""

    def __init__(self, reactor: Any, config: HostConfig, make_mux: Callable[[], Any]) -> None:
        self.reactor = reactor
        settings = config.section("gcb")
        from gwms.config import LEVELS, ConfigError

        if settings["registration_level"] not in LEVELS:
            raise ConfigError(f"{config.source}: [gcb] registration_level must be one of {', '.join(LEVELS)}, "
                              f"got {settings['registration_level']!r}")
        self.settings = settings
        self.public_host = settings["public_host"] or settings["listen"][0]
        self.make_mux = make_mux
        self.registrations: dict[str, Registration] = {}
        self.tunnel_address = ""

    def commands(self) -> list[Command]:
        return [Command("GCB_REGISTER", self.settings["registration_level"], self.register),
                Command("GCB_WAIT_EVENT", self.settings["registration_level"], self.wait_event),
                Command("GCB_CONNECT_BACK", "DAEMON", self.connect_back)]

    def wait_event(self, request: Request) -> Any:
        """The registered daemon's long-poll: answered when a client asks it to connect back
        (HTCondor's CCB way), or empty after Timeout seconds (at most 30)."""
        name = request.ad.get("Name")
        registration = self.registrations.get(name) if isinstance(name, str) else None
        if registration is None or registration.identity != request.identity.name:
            raise CommandError("UNKNOWN_REGISTRATION", f"{name!r} is not registered by {request.identity.name}")
        if registration.waiter is not None and not registration.waiter.called:
            registration.waiter.callback(classads.ClassAd())  # a newer poll replaces it
        timeout = request.ad.get("Timeout", 20)
        timeout = min(max(float(timeout), 0.1), 30.0) if isinstance(timeout, (int, float)) else 20.0
        waiter: defer.Deferred[Any] = defer.Deferred()
        registration.waiter = waiter
        timer = self.reactor.callLater(timeout, lambda: None if waiter.called else waiter.callback(classads.ClassAd()))
        waiter.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return waiter

    def connect_back(self, request: Request) -> classads.ClassAd:
        """A client that can be reached asks a registered daemon to connect to it instead of
        being relayed: passed on through the daemon's long-poll."""
        import re

        ad = request.ad
        name, address, nonce = ad.get("Name"), ad.get("Address"), ad.get("Nonce")
        if not isinstance(address, str) or not re.fullmatch(r"[0-9A-Za-z.\-]+:\d{1,5}", address):
            raise CommandError("MALFORMED_AD", "GCB_CONNECT_BACK needs an Address host:port")
        if not isinstance(nonce, str) or not re.fullmatch(r"[0-9a-f]{64}", nonce):
            raise CommandError("MALFORMED_AD", "GCB_CONNECT_BACK needs a Nonce of 64 hex digits")
        registration = self.registrations.get(name) if isinstance(name, str) else None
        if registration is None:
            raise CommandError("UNKNOWN_REGISTRATION", f"nothing is registered as {name!r}")
        waiter = registration.waiter
        if waiter is None or waiter.called:
            raise CommandError("NOT_WAITING", f"{name} is not listening for connect-back requests now")
        event = classads.ClassAd()
        event["ConnectBack"] = address
        event["Nonce"] = nonce
        log.info("gcb: asked {name} to connect back to {address} for {who}", name=name, address=address,
                 who=request.identity.name)
        waiter.callback(event)
        reply = classads.ClassAd()
        reply["Requested"] = True
        return reply

    def by_secret(self, secret: str) -> Registration | None:
        for registration in self.registrations.values():
            if secrets.compare_digest(registration.secret, secret):
                return registration
        return None

    @defer.inlineCallbacks
    def register(self, request: Request) -> Any:
        name = request.ad.get("Name")
        if not isinstance(name, str) or not name or len(name) > 200:
            raise CommandError("MALFORMED_AD", "GCB_REGISTER needs a Name (a string of at most 200 characters)")
        identity = request.identity.name
        old = self.registrations.get(name)
        if old is not None and old.identity != identity:
            raise CommandError("PERMISSION_DENIED", f"{name} is registered by {old.identity}, not {identity}")
        # The port it had: from this broker's memory, or (after a restart of the broker) as the
        # daemon remembers it, so that its address, and every connection to it, stays valid.
        wanted = old.port.getHost().port if old is not None and old.port is not None else 0
        asked = request.ad.get("WantPort")
        if not wanted and isinstance(asked, int) and not isinstance(asked, bool) and 1024 <= asked < 65536:
            wanted = asked
        if old is not None:
            self.drop(old)
        registration = Registration(name, identity, secrets.token_hex(32))
        host = self.settings["listen"][0]
        try:
            registration.port = yield TCP4ServerEndpoint(self.reactor, wanted, interface=host).listen(
                RegistrationRelay(registration))
        except Exception:  # the old port is taken: any other
            registration.port = yield TCP4ServerEndpoint(self.reactor, 0, interface=host).listen(
                RegistrationRelay(registration))
        self.registrations[name] = registration
        public = f"{self.public_host}:{registration.port.getHost().port}"
        log.info("gcb: {name} ({identity}) registered: {public}", name=name, identity=identity, public=public)
        reply = classads.ClassAd()
        reply["PublicAddress"] = public
        reply["TunnelAddress"] = self.tunnel_address
        reply["TunnelSecret"] = registration.secret
        reply["BrokerName"] = name
        return reply

    def tunnel_up(self, registration: Registration, mux: Any) -> None:
        if registration.mux is not None:
            registration.mux.transport.loseConnection()
        registration.mux = mux

    def drop(self, registration: Registration) -> None:
        if registration.port is not None:
            registration.port.stopListening()
        if registration.mux is not None and registration.mux.transport is not None:
            registration.mux.transport.loseConnection()
        self.registrations.pop(registration.name, None)


class Options(DaemonOptions):
    pass


class BrokerService(service.MultiService):
    def __init__(self, reactor: Any, config: HostConfig) -> None:
        from gwms.protocols.relay import MuxProtocol

        super().__init__()
        self.reactor = reactor
        settings = config.section("gcb")
        self.broker = Broker(reactor, config, lambda: MuxProtocol(role="broker", clock=reactor))
        self.listener = MessageListener(reactor, message_factory(reactor, config, self.broker.commands()),
                                        settings["listen"], None, settings["address_file"])
        self.listener.setServiceParent(self)
        self.tunnel_port: Any = None

    @defer.inlineCallbacks
    def startService(self) -> Any:
        super().startService()
        host, port = self.broker.settings["tunnel_listen"]
        self.tunnel_port = yield TCP4ServerEndpoint(self.reactor, port, interface=host).listen(
            Factory.forProtocol(lambda: TunnelGreeting(self.broker)))
        bound = self.tunnel_port.getHost()
        self.broker.tunnel_address = f"{bound.host}:{bound.port}"
        log.info("gcb: tunnels at {address}", address=self.broker.tunnel_address)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        for registration in list(self.broker.registrations.values()):
            self.broker.drop(registration)
        if self.tunnel_port is not None:
            yield self.tunnel_port.stopListening()
        yield super().stopService()


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    return BrokerService(reactor, options["host_config"])


__all__ = ["Broker", "BrokerService", "Registration", "TunnelGreeting"]
