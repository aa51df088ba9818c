from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.test import iosim

from gwms.config import HostConfig, parse_config
from gwms.protocols.client import ClientCredentials, ClientSecurity
from gwms.protocols.messages import ClientProtocol, Limits, MessageServerFactory

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


def memory_config(extra: str = "") -> HostConfig:
    """A configuration whose levels accept the fake method in the clear (for memory tests)."""
    return parse_config(TEST_SECURITY + extra, "<test>")


class MemoryNetwork:
    """Connects clients to in-memory servers; ``flush()`` moves bytes until nothing is left."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []
        self._port = 40000

    def connect(self, factory: MessageServerFactory, identity: str | None, level: str = "READ",
                config: HostConfig | None = None, limits: Limits = Limits(),
                peer_host: str = "127.0.0.1") -> tuple[ClientProtocol, Any, iosim.IOPump]:
        from gwms.plugins import load_auth_methods

        config = config or memory_config()
        methods, levels = load_auth_methods(config)
        security = ClientSecurity(levels, methods, FakeCredentials(fake_identity=identity), None)
        client = ClientProtocol(self.clock, limits, security, level, "localhost")
        self._port += 1
        server = factory.buildProtocol(IPv4Address("TCP", peer_host, self._port))
        server_transport = iosim.FakeTransport(server, isServer=True,
                                               peerAddress=IPv4Address("TCP", peer_host, self._port))
        client_transport = iosim.FakeTransport(client, isServer=False,
                                               hostAddress=IPv4Address("TCP", peer_host, self._port))
        pump = iosim.connect(server, server_transport, client, client_transport, greet=True)
        self.pumps.append(pump)
        return client, server, pump

    def flush(self) -> None:
        for _ in range(100):
            if not any([p.pump() for p in self.pumps]):
                return
