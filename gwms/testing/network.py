from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.test import iosim

from gwms.config import HostConfig, parse_config
from gwms.protocols.client import Address, ClientCredentials, ClientSecurity
from gwms.protocols.messages import ClientProtocol, ConnectionFailed, Limits, MessageServerFactory

TEST_SECURITY = """
[security]
methods = ["gwms.testing:FakeAuthMethod"]
authentication = "REQUIRED"
encryption = "OPTIONAL"
"""


@dataclass
class FakeCredentials(ClientCredentials):
    fake_identity: str | None = None


def memory_security(config: HostConfig, auditor: Any = None) -> Any:
    """The ServerSecurity of an in-memory daemon with this configuration."""
    from gwms.plugins import authorizer, load_auth_methods
    from gwms.security import Auditor, ServerSecurity

    methods, levels = load_auth_methods(config)
    return ServerSecurity(levels, methods, authorizer(config), auditor or Auditor())


def memory_client_security(config: HostConfig, identity: str | None) -> ClientSecurity:
    """The ClientSecurity of someone who authenticates as ``identity`` with FakeAuthMethod."""
    from gwms.plugins import load_auth_methods

    methods, levels = load_auth_methods(config)
    return ClientSecurity(levels, methods, FakeCredentials(fake_identity=identity), None)


def memory_config(extra: str = "") -> HostConfig:
    """A configuration whose levels accept the fake method in the clear (for memory tests)."""
    return parse_config(TEST_SECURITY + extra, "<test>")


class _MemoryTransport(iosim.FakeTransport):
    # DaemonClient reuses a connection only while ``transport.connected``; iosim's transport
    # has no such attribute, so say what a TCP transport would.
    @property
    def connected(self) -> bool:
        return not self.disconnecting and not self.disconnected


class MemoryNetwork:
    """Connects clients to in-memory servers; ``flush()`` moves bytes until nothing is left.

    Servers are registered by address (``listen("schedd.memory:9615", factory)``); ``connector``
    has the signature of ``gwms.protocols.client.connect``, so a DaemonClient or CollectorList
    given it reaches those servers over iosim transports instead of TCP. Nothing moves until
    ``flush()``: the whole pool advances only when the test says so."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []
        self.listeners: dict[str, MessageServerFactory] = {}
        self.connections_made: dict[str, int] = {}  # per address: how many connections were opened
        self._port = 40000

    # -- servers -------------------------------------------------------------------------------
    def listen(self, address: str | Address, factory: MessageServerFactory) -> None:
        self.listeners[str(address)] = factory

    def unlisten(self, address: str | Address) -> None:
        """Stop accepting connections at ``address`` (those already open stay open)."""
        self.listeners.pop(str(address), None)

    # -- clients -------------------------------------------------------------------------------
    def _wire(self, factory: MessageServerFactory, client: ClientProtocol, peer_host: str,
              greet: bool) -> tuple[Any, iosim.IOPump]:
        self._port += 1
        peer = IPv4Address("TCP", peer_host, self._port)
        server = factory.buildProtocol(peer)
        server_transport = _MemoryTransport(server, isServer=True, peerAddress=peer)
        client_transport = _MemoryTransport(client, isServer=False, hostAddress=peer)
        pump = iosim.connect(server, server_transport, client, client_transport, greet=greet)
        self.pumps.append(pump)
        return server, pump

    def connect(self, factory: MessageServerFactory, identity: str | None, level: str = "READ",
                config: HostConfig | None = None, limits: Limits = Limits(),
                peer_host: str = "127.0.0.1") -> tuple[ClientProtocol, Any, iosim.IOPump]:
        config = config or memory_config()
        security = memory_client_security(config, identity)
        client = ClientProtocol(self.clock, limits, security, level, "localhost")
        server, pump = self._wire(factory, client, peer_host, greet=True)
        return client, server, pump

    def connector(self, reactor: Any, address: Address, level: str, security: ClientSecurity,
                  limits: Limits = Limits(), connect_timeout: float = 2.0) -> defer.Deferred[ClientProtocol]:
        """``gwms.protocols.client.connect`` in memory: fires with a ready ClientProtocol once
        the network has been flushed enough for HELLO and AUTH to go back and forth."""
        factory = self.listeners.get(str(address))
        if factory is None:
            return defer.fail(ConnectionFailed(f"cannot connect to {address}: connection refused "
                                               "(nothing listens there on this MemoryNetwork)"))
        self.connections_made[str(address)] = self.connections_made.get(str(address), 0) + 1
        client = ClientProtocol(reactor, limits, security, level, address.host or "localhost",
                                setup_timeout=2 * connect_timeout)
        # No greeting flush here: the connector is called from inside daemons' callbacks, and
        # pumping from there would deliver bytes re-entrantly. flush() does it from the top.
        self._wire(factory, client, "127.0.0.1", greet=False)
        return client.ready

    def close_all(self) -> None:
        """Close every connection, as the end of a test run; both ends hear connectionLost."""
        for pump in self.pumps:
            pump.clientIO.loseConnection()
        self.flush()

    # -- moving bytes --------------------------------------------------------------------------
    def flush(self, rounds: int = 100) -> bool:
        """Pump every connection until no bytes move (or ``rounds`` passes); returns whether
        anything moved. Connections closed on both ends are forgotten."""
        moved = False
        for _ in range(rounds):
            # A pump may open new connections (a handler that calls another daemon): iterate
            # over a copy and pick the new ones up in the next round. A list, not a generator:
            # any() would stop at the first pump that moved something and starve the others.
            if not any([p.pump() for p in list(self.pumps)]):  # noqa: C419
                break
            moved = True
        self.pumps = [p for p in self.pumps if not (p.clientIO.disconnected and p.serverIO.disconnected)]
        return moved

