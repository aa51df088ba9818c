"""The broker's registrations on a memory reactor: names belong to who registered them, a
daemon gets its port back, malformed registrations and tunnel greetings are refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gwms import classads
from gwms.config import parse_config
from gwms.gcb.broker import Broker, TunnelGreeting
from gwms.protocols.messages import CommandError


@dataclass
class Identity:
    name: str


@dataclass
class FakeRequest:
    ad: Any
    identity: Identity


def register(broker: Broker, who: str, **values: Any) -> Any:
    ad = classads.ClassAd()
    for k, v in values.items():
        ad[k] = v
    out: list = []
    broker.register(FakeRequest(ad, Identity(who))).addBoth(out.append)
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class FakeMux:
    def __init__(self):
        self.received = b""
        self.transport = None

    def makeConnection(self, transport):
        self.transport = transport

    def dataReceived(self, data):
        self.received += data


@pytest.fixture
def broker():
    config = parse_config('[gcb]\nlisten = "127.0.0.1:9630"\npublic_host = "gcb.example.org"\n')
    b = Broker(MemoryReactorClock(), config, FakeMux)
    b.tunnel_address = "127.0.0.1:9631"
    return b


def test_a_registration_gets_a_public_port_and_a_secret_and_keeps_its_port(broker):
    first = register(broker, "/CN=wn1", Name="startd@wn1")
    assert first["PublicAddress"].startswith("gcb.example.org:") and len(first["TunnelSecret"]) == 64
    again = register(broker, "/CN=wn1", Name="startd@wn1")
    assert again["PublicAddress"] == first["PublicAddress"] and again["TunnelSecret"] != first["TunnelSecret"]
    assert broker.by_secret(first["TunnelSecret"]) is None  # the old secret opens nothing any more


def test_nobody_takes_over_another_daemons_name(broker):
    register(broker, "/CN=wn1", Name="startd@wn1")
    with pytest.raises(CommandError) as e:
        register(broker, "/CN=mallory", Name="startd@wn1")
    assert e.value.code == "PERMISSION_DENIED" and "startd@wn1 is registered by /CN=wn1, not /CN=mallory" in e.value.message


@pytest.mark.parametrize("values", [{}, {"Name": ""}, {"Name": 42}, {"Name": "x" * 201}])
def test_a_registration_needs_a_sensible_name(broker, values):
    with pytest.raises(CommandError) as e:
        register(broker, "/CN=wn1", **values)
    assert e.value.code == "MALFORMED_AD" and "GCB_REGISTER needs a Name" in e.value.message


def test_a_tunnel_with_its_secret_becomes_the_registrations_mux(broker):
    secret = register(broker, "/CN=wn1", Name="startd@wn1")["TunnelSecret"]
    greeting = TunnelGreeting(broker)
    transport = StringTransport()
    greeting.makeConnection(transport)
    greeting.dataReceived(b"GCB-TUNNEL " + secret.encode() + b"\nfirst mux bytes")
    mux = broker.registrations["startd@wn1"].mux
    assert mux is not None and mux.received == b"first mux bytes" and not transport.disconnecting


@pytest.mark.parametrize("data", [b"GCB-TUNNEL " + b"0" * 64 + b"\n", b"HELLO\n", b"x" * 300])
def test_tunnels_with_a_bad_greeting_are_closed(broker, data):
    register(broker, "/CN=wn1", Name="startd@wn1")
    greeting = TunnelGreeting(broker)
    transport = StringTransport()
    greeting.makeConnection(transport)
    greeting.dataReceived(data)
    assert transport.disconnecting and broker.registrations["startd@wn1"].mux is None


def call(handler, who: str, **values: Any) -> Any:
    ad = classads.ClassAd()
    for k, v in values.items():
        ad[k] = v
    return handler(FakeRequest(ad, Identity(who)))


def test_a_connect_back_request_reaches_the_daemons_long_poll(broker):
    register(broker, "/CN=wn1", Name="startd@wn1")
    polled = call(broker.wait_event, "/CN=wn1", Name="startd@wn1", Timeout=20)
    assert not polled.called
    reply = call(broker.connect_back, "/CN=schedd", Name="startd@wn1", Address="10.0.0.5:9615", Nonce="a" * 64)
    assert reply["Requested"] is True
    event = polled.result
    assert (event["ConnectBack"], event["Nonce"]) == ("10.0.0.5:9615", "a" * 64)
    with pytest.raises(CommandError) as e:  # the poll was used up: nobody listens until the next one
        call(broker.connect_back, "/CN=schedd", Name="startd@wn1", Address="10.0.0.5:9615", Nonce="b" * 64)
    assert e.value.code == "NOT_WAITING"
    quiet = call(broker.wait_event, "/CN=wn1", Name="startd@wn1", Timeout=5)
    broker.reactor.advance(5)
    assert quiet.called and "ConnectBack" not in quiet.result  # answered empty when nothing came


@pytest.mark.parametrize("values, message", [
    ({"Name": "startd@wn1", "Address": "10.0.0.5", "Nonce": "a" * 64}, "needs an Address host:port"),
    ({"Name": "startd@wn1", "Address": "x; rm -rf /:1", "Nonce": "a" * 64}, "needs an Address host:port"),
    ({"Name": "startd@wn1", "Address": "10.0.0.5:9615", "Nonce": "short"}, "needs a Nonce of 64 hex digits"),
    ({"Name": "nobody", "Address": "10.0.0.5:9615", "Nonce": "a" * 64}, "nothing is registered as 'nobody'"),
])
def test_malformed_connect_back_requests_are_refused(broker, values, message):
    register(broker, "/CN=wn1", Name="startd@wn1")
    call(broker.wait_event, "/CN=wn1", Name="startd@wn1")
    with pytest.raises(CommandError) as e:
        call(broker.connect_back, "/CN=schedd", **values)
    assert message in e.value.message


def test_only_the_registered_identity_may_wait_for_its_events(broker):
    register(broker, "/CN=wn1", Name="startd@wn1")
    with pytest.raises(CommandError) as e:
        call(broker.wait_event, "/CN=mallory", Name="startd@wn1")
    assert e.value.code == "UNKNOWN_REGISTRATION"


def test_the_clients_listener_hands_connect_backs_to_their_requests_and_passes_the_rest_on():
    from twisted.internet import defer
    from twisted.internet.protocol import Factory, Protocol

    from gwms.gcb.reverse import ConnectBackFactory

    class Recorder(Protocol):
        def __init__(self):
            self.got = b""

        def dataReceived(self, data):
            self.got += data

    inner = Factory.forProtocol(Recorder)
    listener = ConnectBackFactory(inner)
    normal = listener.buildProtocol(None)
    transport = StringTransport()
    transport.protocol = normal
    normal.makeConnection(transport)
    normal.dataReceived(b"\x00\x00\x00\x10HELLO...")  # a message-layer frame: passed on at once
    assert isinstance(transport.protocol, Recorder) and transport.protocol.got == b"\x00\x00\x00\x10HELLO..."

    waiting = defer.Deferred()
    listener.pending["c" * 64] = waiting
    back = listener.buildProtocol(None)
    transport = StringTransport()
    back.makeConnection(transport)
    back.dataReceived(b"GCB-CONNECT-BACK " + b"c" * 64 + b"\nfirst")
    assert waiting.result == (transport, b"first") and "c" * 64 not in listener.pending

    stranger = listener.buildProtocol(None)
    transport = StringTransport()
    stranger.makeConnection(transport)
    stranger.dataReceived(b"GCB-CONNECT-BACK " + b"d" * 64 + b"\n")
    assert transport.disconnecting  # nobody asked for it


@pytest.mark.parametrize("level", ["daemon", "REGISTER", ""])
def test_a_registration_level_that_is_no_level_is_refused_at_start_up(level):
    from gwms.config import ConfigError

    config = parse_config(f'[gcb]\nregistration_level = "{level}"\n', "site.toml")
    with pytest.raises(ConfigError, match=r"site.toml: \[gcb\] registration_level must be one of .*DAEMON"):
        Broker(MemoryReactorClock(), config, FakeMux)
