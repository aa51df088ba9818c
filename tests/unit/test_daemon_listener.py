"""MessageListener's advertised address: a daemon bound to every interface publishes the address
it reaches its collector from, not 0.0.0.0."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from gwms.daemon import MessageListener, outbound_host


class NoFactory:
    connections: list = []


class Port:
    def __init__(self, interface: str, port: int) -> None:
        self.host = IPv4Address("TCP", interface, port or 40001)

    def getHost(self) -> IPv4Address:
        return self.host


class Reactor(MemoryReactorClock):
    """listenTCP's port knows the interface it was bound to (MemoryReactor's does not)."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        super().listenTCP(port, factory, backlog, interface)
        return Port(interface or "0.0.0.0", port)


def listening(tcp, toward):
    reactor = Reactor()
    listener = MessageListener(reactor, NoFactory(), tcp, advertise_toward=toward)
    listener.startService()
    return listener


def test_outbound_host_is_the_address_that_reaches_the_peer():
    assert outbound_host("127.0.0.1", 9618) == "127.0.0.1"


def test_outbound_host_without_a_route_falls_back_to_the_fqdn(monkeypatch):
    import socket

    monkeypatch.setattr(socket, "getfqdn", lambda: "node17.example.org")
    assert outbound_host("no-such-host.invalid", 9618) == "node17.example.org"


def test_a_listener_on_every_interface_advertises_the_address_toward_its_collector():
    listener = listening(("0.0.0.0", 0), ("127.0.0.1", 9618))
    assert listener.address is not None and listener.address.host == "127.0.0.1"


def test_a_listener_on_a_named_address_advertises_that_address():
    listener = listening(("127.0.0.2", 0), ("127.0.0.1", 9618))
    assert listener.address.host == "127.0.0.2"


def test_without_a_collector_the_bound_address_is_kept():
    listener = listening(("0.0.0.0", 0), None)
    assert listener.address.host == "0.0.0.0"
