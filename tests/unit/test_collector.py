"""The collector in memory: its commands over the message layer, on a Clock."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet.testing import MemoryReactorClock

from gwms import classads
from gwms.collector.service import Collector
from gwms.protocols.messages import CommandError, ConnectionFailed, Limits, MessageServerFactory
from gwms.testing.network import MemoryNetwork, memory_config, memory_security

LISTS = """
[security.READ]
allow = ["*"]
[security.ADVERTISE_STARTD]
allow = ["startd1", "startd2"]
[security.ADVERTISE_SCHEDD]
allow = ["schedd"]
[security.ADMINISTRATOR]
allow = ["admin"]
[security.NEGOTIATOR]
allow = ["negotiator"]
"""

SETTINGS = dict(ad_lifetime=900.0, max_ad_lifetime=3600.0, private_attributes=["ClaimId"], max_ads=100)


class Audit:
    def __init__(self):
        self.events = []

    def record(self, request, decision):
        self.events.append((request.identity.name, request.command, request.level, decision.allowed, decision.rule))

    def close(self):
        pass


@pytest.fixture
def pool():
    clock = MemoryReactorClock()
    config = memory_config(LISTS)
    collector = Collector(clock, SETTINGS, "test-collector")
    audit = Audit()
    security = memory_security(config, audit)
    factory = MessageServerFactory(clock, security, collector.commands(), Limits(max_frame=64 * 1024))
    net = MemoryNetwork(clock)

    class Pool:
        pass

    p = Pool()
    p.clock, p.collector, p.audit, p.factory, p.net, p.config = clock, collector, audit, factory, net, config

    def client(identity, level="READ", **kw):
        proto, server, pump = net.connect(factory, identity, level, config=config, **kw)
        net.flush()
        return proto

    def call(proto, command, text, stream=False):
        d = proto.call(command, classads.parse_new(text), stream=stream)
        net.flush()
        results = []
        d.addBoth(results.append)
        assert results, "no reply"
        r = results[0]
        if hasattr(r, "raiseException"):
            r.raiseException()
        return r

    def query(proto, text='[TargetType = "Machine"]', command="QUERY"):
        final, items = call(proto, command, text, stream=True)
        assert final["Count"] == len(items)
        return [classads.decode(b) for b in items]

    p.client, p.call, p.query = client, call, query
    return p


SLOT = '[MyType = "Machine"; Name = "slot1@host"; Cpus = 4; ClaimId = "secret"]'


def test_update_stamps_identity_and_query_returns_it(pool):
    startd = pool.client("startd1", "ADVERTISE_STARTD")
    assert startd.identity == "startd1"
    assert pool.call(startd, "UPDATE", SLOT)["Accepted"] is True
    reader = pool.client("anyone")
    [ad] = pool.query(reader)
    assert ad["Name"] == "slot1@host" and ad["Cpus"] == 4
    assert ad["AuthenticatedIdentity"] == "startd1" and ad["AuthenticationMethod"] == "fake"
    assert ad["LastHeardFrom"] == int(pool.clock.seconds())


def test_private_attributes_only_for_negotiator_queries(pool):
    startd = pool.client("startd1", "ADVERTISE_STARTD")
    pool.call(startd, "UPDATE", SLOT)
    [public] = pool.query(pool.client("reader"))
    assert "ClaimId" not in public
    [public] = pool.query(pool.client("reader"), '[TargetType = "Machine"; Projection = "Name,ClaimId"]')
    assert "ClaimId" not in public and public["Name"] == "slot1@host"
    with pytest.raises(CommandError) as e:
        pool.query(pool.client("reader", "NEGOTIATOR"), command="QUERY_PRIVATE")
    assert e.value.code == "PERMISSION_DENIED"
    [private] = pool.query(pool.client("negotiator", "NEGOTIATOR"), command="QUERY_PRIVATE")
    assert private["ClaimId"] == "secret"


def test_one_identity_cannot_replace_anothers_ad_but_an_administrator_can(pool):
    pool.call(pool.client("startd1", "ADVERTISE_STARTD"), "UPDATE", SLOT)
    other = pool.client("startd2", "ADVERTISE_STARTD")
    with pytest.raises(CommandError) as e:
        pool.call(other, "UPDATE", SLOT.replace("Cpus = 4", "Cpus = 64"))
    assert e.value.code == "NOT_OWNER" and "belongs to 'startd1'" in e.value.message
    [ad] = pool.query(pool.client("reader"))
    assert ad["Cpus"] == 4  # nothing stored was lost
    with pytest.raises(CommandError) as e:
        pool.call(other, "INVALIDATE", '[TargetType = "Machine"; Name = "slot1@host"]')
    assert e.value.code == "NOT_OWNER"
    assert any(ev[:4] == ("startd2", "UPDATE", "ADMINISTRATOR", False) for ev in pool.audit.events)


def test_update_needs_the_advertise_level_of_the_ad_type(pool):
    schedd = pool.client("schedd", "ADVERTISE_STARTD")
    with pytest.raises(CommandError) as e:
        pool.call(schedd, "UPDATE", SLOT)
    assert e.value.code == "PERMISSION_DENIED" and "ADVERTISE_STARTD" in e.value.message
    assert pool.call(schedd, "UPDATE", '[MyType = "Scheduler"; Name = "schedd@host"]')["Accepted"]
    assert ("schedd", "UPDATE", "ADVERTISE_STARTD", False, "'schedd' is not listed for ADVERTISE_STARTD") \
        in pool.audit.events


def test_ads_expire_after_their_lifetime_on_the_clock(pool):
    startd = pool.client("startd1", "ADVERTISE_STARTD")
    pool.call(startd, "UPDATE", SLOT)
    pool.call(startd, "UPDATE", '[MyType = "Machine"; Name = "short"; ClassAdLifetime = 10]')
    pool.call(startd, "UPDATE", '[MyType = "Machine"; Name = "capped"; ClassAdLifetime = 99999]')
    assert len(pool.query(pool.client("reader"))) == 3
    pool.clock.advance(11)
    assert sorted(a["Name"] for a in pool.query(pool.client("reader"))) == ["capped", "slot1@host"]
    pool.clock.advance(900)
    assert [a["Name"] for a in pool.query(pool.client("reader"))] == ["capped"]
    assert pool.collector.store.expire() == 2
    pool.clock.advance(3600)
    assert pool.query(pool.client("reader")) == []


def test_query_constraint_projection_and_any(pool):
    startd = pool.client("startd1", "ADVERTISE_STARTD")
    for i in range(5):
        pool.call(startd, "UPDATE", f'[MyType = "Machine"; Name = "slot{i}"; Cpus = {i}]')
    pool.call(pool.client("schedd", "ADVERTISE_SCHEDD"), "UPDATE", '[MyType = "Scheduler"; Name = "s"]')
    reader = pool.client("reader")
    ads = pool.query(reader, '[TargetType = "Machine"; Requirements = Cpus >= 3; Projection = "Name"]')
    assert sorted(a["Name"] for a in ads) == ["slot3", "slot4"]
    assert all(set(k.lower() for k in a.keys()) == {"name"} for a in ads)
    assert len(pool.query(reader, '[TargetType = "any"]')) == 6
    assert len(pool.query(reader, '[TargetType = "Machine"; Limit = 2]')) == 2


def test_invalidate_by_name_and_by_constraint(pool):
    startd = pool.client("startd1", "ADVERTISE_STARTD")
    for i in range(4):
        pool.call(startd, "UPDATE", f'[MyType = "Machine"; Name = "slot{i}"; Cpus = {i}]')
    assert pool.call(startd, "INVALIDATE", '[TargetType = "Machine"; Name = "slot0"]')["Invalidated"] == 1
    assert pool.call(startd, "INVALIDATE", '[TargetType = "Machine"; Requirements = Cpus > 1]')["Invalidated"] == 2
    assert [a["Name"] for a in pool.query(pool.client("r"))] == ["slot1"]


def test_malformed_update_is_refused_and_nothing_stored_is_lost(pool):
    startd = pool.client("startd1", "ADVERTISE_STARTD")
    pool.call(startd, "UPDATE", SLOT)
    with pytest.raises(CommandError) as e:
        pool.call(startd, "UPDATE", '[Name = "x"]')
    assert e.value.code == "MALFORMED_AD" and "MyType" in e.value.message
    with pytest.raises(CommandError) as e:
        pool.call(startd, "UPDATE", '[MyType = "Machine"; Name = 3]')
    assert e.value.code == "MALFORMED_AD" and "string attribute Name" in e.value.message
    d = startd.call("UPDATE", b"[MyType = \"Machine\"; Name = ")
    pool.net.flush()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].value.code == "MALFORMED_AD"
    [ad] = pool.query(pool.client("reader"))
    assert ad["Cpus"] == 4
    assert pool.call(startd, "UPDATE", SLOT)["Accepted"]  # the connection goes on working


def test_oversized_and_malformed_frames_close_only_that_connection(pool):
    good = pool.client("startd1", "ADVERTISE_STARTD")
    bad, server, pump = pool.net.connect(pool.factory, "startd2", "ADVERTISE_STARTD", config=pool.config)
    pool.net.flush()
    errors = []
    bad.frameError = lambda error: errors.append(error)
    received = []
    original = bad.frameReceived
    bad.frameReceived = lambda frame: (received.append(frame), original(frame))
    bad.transport.write(struct.pack("!I", 10 * 1024 * 1024) + b"Q 5 UPDATE\n")
    pool.net.flush()
    assert received and received[-1].kind == "E"
    assert b"FRAME_TOO_LARGE" in received[-1].body and b"exceeds the maximum" in received[-1].body
    assert server.closing
    assert pool.call(good, "UPDATE", SLOT)["Accepted"]


def test_unknown_command_and_request_timeout_on_the_client(pool):
    reader = pool.client("reader")
    with pytest.raises(CommandError) as e:
        pool.call(reader, "FROBNICATE", "[]")
    assert e.value.code == "UNKNOWN_COMMAND"
    # A reply that never comes: the client gives up after its request timeout, on the clock.
    for p in pool.net.pumps:
        p.serverIO.write = lambda data: None  # the server's replies are lost
    d = reader.call("QUERY", classads.parse_new('[TargetType = "Machine"]'), timeout=5)
    failures = []
    d.addErrback(failures.append)
    pool.clock.advance(5)
    assert failures and failures[0].value.code == "TIMEOUT"


def test_idle_connections_are_closed_by_the_server(pool):
    pool.client("reader")
    server = next(iter(pool.factory.connections))
    pool.clock.advance(Limits().idle_timeout + 1)
    assert server.closing
    assert server not in pool.factory.connections or server.transport.disconnecting


def test_commands_before_authentication_are_protocol_errors(pool):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from gwms.protocols.framing import FrameDecoder, encode_frame

    server = pool.factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    server.makeConnection(transport)
    server.dataReceived(encode_frame("Q", 1, "QUERY", b"[]"))
    frames, _ = FrameDecoder(4096).feed(transport.value())
    assert frames[0].kind == "E" and b"expected HELLO, got QUERY" in frames[0].body
    assert transport.disconnecting


def test_negotiation_failure_is_reported_to_the_client(pool):
    proto, server, pump = pool.net.connect(pool.factory, "x", "ADVERTISE_STARTD", config=memory_config(
        '[security.ADVERTISE_STARTD]\nauthentication = "NEVER"\n'))
    pool.net.flush()
    failures = []
    proto.ready.addErrback(failures.append)
    assert failures and isinstance(failures[0].value, ConnectionFailed)
    assert "REQUIRED by the server and NEVER allowed by the client" in str(failures[0].value)
    assert pool.audit.events[-1][3] is False and "negotiation" in pool.audit.events[-1][4]


def test_unauthenticated_clients_may_only_send_small_frames(pool):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from gwms.protocols.framing import FrameDecoder

    server = pool.factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5556))
    server.makeConnection(transport)
    server.dataReceived(struct.pack("!I", 60 * 1024 + 100 * 1024) + b"Q 0 HELLO\n")
    frames, _ = FrameDecoder(4096).feed(transport.value())
    assert b"exceeds the maximum of 65536 bytes" in frames[0].body and transport.disconnecting


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(garbage=st.binary(min_size=1, max_size=300))
def test_hostile_bytes_after_authentication_lose_nothing_stored(pool, garbage):
    startd = pool.client("startd1", "ADVERTISE_STARTD")
    pool.call(startd, "UPDATE", SLOT)
    hostile, server, pump = pool.net.connect(pool.factory, "startd2", "ADVERTISE_STARTD", config=pool.config)
    pool.net.flush()
    hostile.transport.write(garbage)
    pool.net.flush()
    [ad] = pool.query(pool.client("reader"))
    assert ad["Cpus"] == 4 and ad["AuthenticatedIdentity"] == "startd1"
    assert pool.call(startd, "UPDATE", SLOT)["Accepted"]
