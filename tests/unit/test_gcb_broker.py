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
