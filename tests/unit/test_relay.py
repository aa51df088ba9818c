"""The relay's stream multiplexing (gwms.protocols.relay), in memory over iosim."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test import iosim

from gwms import classads
from gwms.protocols import relay
from gwms.protocols.relay import (
    CLOSE,
    DATA,
    ERROR,
    OPEN,
    WINDOW,
    MuxProtocol,
    RelayedConnectionFactory,
    StreamError,
    frame,
)

BROKER_ADDR = IPv4Address("TCP", "10.0.0.1", 9618)
DAEMON_ADDR = IPv4Address("TCP", "10.0.0.2", 40001)
CLIENT_ADDR = IPv4Address("TCP", "192.0.2.7", 5555)


class Recorder(Protocol):
    def __init__(self, pause: bool = False) -> None:
        self.data = bytearray()
        self.lost = None
        self.pause = pause

    def connectionMade(self) -> None:
        if self.pause:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        assert self.lost is None, "connectionLost twice"
        self.lost = reason


class RecorderFactory(Factory):
    def __init__(self, pause_first: int = 0) -> None:
        self.built: list[Recorder] = []
        self.addresses: list = []
        self.pause_first = pause_first

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        p = Recorder(pause=len(self.built) < self.pause_first)
        self.built.append(p)
        return p


class Pair:
    """A broker and a daemon mux joined by an iosim pump."""

    def __init__(self, factory=None, **kw) -> None:
        self.clock = MemoryReactorClock()
        self.factory = factory if factory is not None else RecorderFactory()
        self.broker = MuxProtocol("broker", clock=self.clock, **kw)
        self.daemon = MuxProtocol("daemon", self.factory, clock=self.clock, **kw)
        self.broker_io = iosim.FakeTransport(self.broker, isServer=True, hostAddress=BROKER_ADDR,
                                             peerAddress=DAEMON_ADDR)
        self.daemon_io = iosim.FakeTransport(self.daemon, isServer=False, hostAddress=DAEMON_ADDR,
                                             peerAddress=BROKER_ADDR)
        self.pump = iosim.connect(self.broker, self.broker_io, self.daemon, self.daemon_io,
                                  clock=self.clock)

    def flush(self) -> None:
        self.pump.flush()


def test_many_streams_both_ways_arrive_intact_and_in_order():
    pair = Pair(initial_window=4096, max_data=1000)
    rng = random.Random(6)
    n = 25
    broker_side = [Recorder() for _ in range(n)]
    streams = [pair.broker.open_stream(CLIENT_ADDR, p) for p in broker_side]
    pair.flush()
    daemon_side = pair.factory.built
    assert len(daemon_side) == n and [s.stream_id for s in streams] == list(range(1, 2 * n, 2))
    assert all(a == CLIENT_ADDR for a in pair.factory.addresses)
    assert daemon_side[0].transport.getPeer() == CLIENT_ADDR
    sent_down = [bytearray() for _ in range(n)]
    sent_up = [bytearray() for _ in range(n)]
    for _ in range(600):
        i = rng.randrange(n)
        chunk = rng.randbytes(rng.randrange(1, 3000))
        if rng.random() < 0.5:
            streams[i].write(chunk)
            sent_down[i] += chunk
        else:
            daemon_side[i].transport.write(chunk)
            sent_up[i] += chunk
        if rng.random() < 0.1:
            pair.pump.pump()
    pair.flush()
    for i in range(n):
        assert daemon_side[i].data == sent_down[i]
        assert broker_side[i].data == sent_up[i]
        assert daemon_side[i].lost is None and broker_side[i].lost is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.binary(min_size=1, max_size=5000)),
                max_size=40),
       st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_random_writes_and_wire_chunkings_arrive_in_order(writes, cuts):
    """Whatever the writes, and however the relay connection's bytes are cut up on the wire."""
    pair = Pair(initial_window=2048, max_data=700)
    ups = [Recorder() for _ in range(4)]
    streams = [pair.broker.open_stream(CLIENT_ADDR, p) for p in ups]
    pair.flush()
    downs = pair.factory.built
    expect_down = [bytearray() for _ in range(4)]
    expect_up = [bytearray() for _ in range(4)]
    for i, down, data in writes:
        (streams[i] if down else downs[i].transport).write(data)
        (expect_down if down else expect_up)[i] += data
    # deliver every byte both ways in the given chunk sizes, until nothing moves
    for _ in range(10_000):
        moved = False
        for src, dst in ((pair.broker_io, pair.daemon), (pair.daemon_io, pair.broker)):
            out = b"".join(src.stream)
            src.stream.clear()
            k = 0
            while out:
                n = cuts[k % len(cuts)]
                k += 1
                dst.dataReceived(out[:n])
                out = out[n:]
                moved = True
        if not moved:
            break
    assert [bytes(d.data) for d in downs] == [bytes(e) for e in expect_down]
    assert [bytes(u.data) for u in ups] == [bytes(e) for e in expect_up]


class FakeProducer:
    def __init__(self) -> None:
        self.paused = False
        self.events: list[str] = []

    def pauseProducing(self):
        self.paused = True
        self.events.append("pause")

    def resumeProducing(self):
        self.paused = False
        self.events.append("resume")

    def stopProducing(self):
        self.events.append("stop")


def test_a_paused_consumer_stops_its_sender_at_the_window_while_others_flow():
    window = 8192
    pair = Pair(RecorderFactory(pause_first=1), initial_window=window, stream_buffer=16384)
    slow_up, fast_up = Recorder(), Recorder()
    slow = pair.broker.open_stream(CLIENT_ADDR, slow_up)
    fast = pair.broker.open_stream(CLIENT_ADDR, fast_up)
    producer = FakeProducer()
    slow.registerProducer(producer, True)
    pair.flush()
    slow_down, fast_down = pair.factory.built
    big = random.Random(1).randbytes(100_000)
    slow.write(big)
    fast.write(big)
    pair.flush()
    # the slow stream sent exactly one window and no more; the paused protocol got nothing
    assert slow_down.data == b""
    assert slow._send_credit == 0 and slow._outbound_size == len(big) - window
    assert sum(map(len, slow_down.transport._inbound)) == window
    assert producer.paused and producer.events == ["pause"]
    # the other stream went through entirely, in both directions
    assert fast_down.data == big
    fast_down.transport.write(b"reply")
    pair.flush()
    assert fast_up.data == b"reply"
    # resuming lets the rest through, and the producer is resumed once the buffer drains
    slow_down.transport.resumeProducing()
    pair.flush()
    assert slow_down.data == big
    assert producer.events == ["pause", "resume"]
    assert slow._outbound_size == 0


def test_pausing_the_relay_connection_holds_data_but_not_control_frames():
    pair = Pair()
    up = Recorder()
    s = pair.broker.open_stream(CLIENT_ADDR, up)
    pair.flush()
    (down,) = pair.factory.built
    pair.broker.pauseProducing()  # what the TCP transport does when its buffer is full
    s.write(b"held")
    s2 = pair.broker.open_stream(CLIENT_ADDR, Recorder())
    pair.flush()
    assert down.data == b"" and len(pair.factory.built) == 2  # the OPEN went out
    pair.broker.resumeProducing()
    pair.flush()
    assert down.data == b"held"
    assert s2.stream_id == 3


def test_close_after_data_both_ways_and_connection_lost_on_both_ends():
    pair = Pair(initial_window=1024, max_data=300)
    up = Recorder()
    s = pair.broker.open_stream(CLIENT_ADDR, up)
    s.write(b"x" * 5000)  # more than a window: the close waits for it
    s.loseConnection()
    s.write(b"dropped after loseConnection")
    pair.flush()
    (down,) = pair.factory.built
    assert down.data == b"x" * 5000
    assert down.lost.check(ConnectionDone) and up.lost.check(ConnectionDone)
    assert pair.broker.streams == {} and pair.daemon.streams == {}
    # and from the daemon's end
    up2 = Recorder()
    pair.broker.open_stream(CLIENT_ADDR, up2)
    pair.flush()
    down2 = pair.factory.built[1]
    down2.transport.write(b"bye")
    down2.transport.loseConnection()
    pair.flush()
    assert up2.data == b"bye" and up2.lost.check(ConnectionDone) and down2.lost.check(ConnectionDone)


def test_a_close_reaches_a_paused_protocol_only_after_its_data():
    pair = Pair(RecorderFactory(pause_first=1))
    s = pair.broker.open_stream(CLIENT_ADDR, Recorder())
    s.write(b"abc")
    s.loseConnection()
    pair.flush()
    (down,) = pair.factory.built
    assert down.data == b"" and down.lost is None
    down.transport.resumeProducing()
    assert down.data == b"abc" and down.lost.check(ConnectionDone)


@pytest.mark.parametrize("from_broker", [True, False])
def test_abort_resets_the_stream_on_the_other_end(from_broker):
    pair = Pair(RecorderFactory(pause_first=1))
    up = Recorder()
    s = pair.broker.open_stream(CLIENT_ADDR, up)
    pair.flush()
    (down,) = pair.factory.built
    if from_broker:
        s.write(b"unsent?")
        s.abortConnection()
        pair.flush()
        mine, other = up, down
    else:
        down.transport.abortConnection()
        pair.flush()
        mine, other = down, up
    assert mine.lost.check(relay.ConnectionAborted)
    assert other.lost.check(ConnectionLost)
    assert "reset by the other end: aborted" in other.lost.getErrorMessage()
    assert other.data == b""  # an abort discards what was buffered


def test_losing_the_relay_connection_loses_every_stream():
    pair = Pair()
    ups = [Recorder() for _ in range(3)]
    for p in ups:
        pair.broker.open_stream(CLIENT_ADDR, p)
    pair.flush()
    pair.daemon_io.loseConnection()
    pair.flush()
    for p in ups + pair.factory.built:
        assert p.lost.check(ConnectionLost) and "relay connection lost" in p.lost.getErrorMessage()
    with pytest.raises(relay.MuxError, match="closed"):
        pair.broker.open_stream(CLIENT_ADDR)


# -- hostile input ---------------------------------------------------------------------------


def daemon_alone(**kw):
    """A daemon mux on a transport whose output the test reads, fed bytes by the test."""
    clock = MemoryReactorClock()
    factory = RecorderFactory()
    mux = MuxProtocol("daemon", factory, clock=clock, **kw)
    transport = iosim.FakeTransport(mux, isServer=False, peerAddress=BROKER_ADDR)
    mux.makeConnection(transport)
    return mux, transport, factory


def warnings(events):
    return [e["reason"] for e in events if "reason" in e and e.get("log_level").name == "warn"]


def sent_frames(transport):
    data = b"".join(transport.stream)
    out = []
    while data:
        (n,) = relay.LENGTH.unpack_from(data)
        kind, sid = relay.HEADER.unpack_from(data, 4)
        out.append((kind, sid, data[9:4 + n]))
        data = data[4 + n:]
    return out


@pytest.mark.parametrize("data, reason", [
    (relay.LENGTH.pack(1_000_000), f"frame of 1000000 bytes exceeds the maximum of {5 + relay.MAX_DATA} bytes"),
    (relay.LENGTH.pack(3) + b"abc", "frame of 3 bytes is too short to hold a type and a stream id"),
    (frame(9, 1), "unknown frame type 9 on stream 1"),
    (frame(DATA, 7, b"x"), "DATA for stream 7, which was never opened"),
    (frame(WINDOW, 5, b"\0\0\0\1"), "WINDOW for stream 5, which was never opened"),
    (frame(OPEN, 2), "OPEN for stream 2: the daemon end allocates that id itself"),
    (frame(OPEN, 3) + frame(OPEN, 1), "OPEN for stream 1, not above the last stream opened (3)"),
    (frame(DATA, 0, b"x"), "DATA frame on stream 0"),
])
def test_a_protocol_error_closes_the_connection_with_its_reason(data, reason):
    mux, transport, factory = daemon_alone()
    with capturedLogs() as events:
        mux.dataReceived(frame(OPEN, 1) if not data.startswith(frame(OPEN, 3)) else b"")
        mux.dataReceived(data)
        mux.dataReceived(frame(OPEN, 101))  # ignored: the connection is failed
    assert warnings(events) == [reason]
    assert transport.disconnecting
    assert sent_frames(transport)[-1] == (CLOSE, 0, bytes([ERROR]) + reason.encode())
    assert all(a != IPv4Address("TCP", "0.0.0.0", 101) for a in factory.addresses)
    mux.connectionLost(iosim.Failure(ConnectionDone()))
    for p in factory.built:
        assert p.lost.check(ConnectionLost) and reason in p.lost.getErrorMessage()


def test_data_beyond_the_credit_closes_only_that_stream():
    mux, transport, factory = daemon_alone(initial_window=1000, max_data=600)
    with capturedLogs() as events:
        mux.dataReceived(frame(OPEN, 1) + frame(OPEN, 3) + frame(DATA, 1, b"a" * 400) + frame(DATA, 1, b"b" * 601))
        mux.dataReceived(frame(DATA, 3, b"still fine") + frame(DATA, 1, b"late, discarded"))
    reason = "flow control: 601 bytes of DATA beyond the 600 bytes of credit granted on stream 1"
    assert warnings(events) == [reason]
    one, three = factory.built
    assert one.data == b"a" * 400
    assert one.lost.check(StreamError) and one.lost.value.reason == reason
    assert three.data == b"still fine" and three.lost is None
    assert not transport.disconnecting
    assert (CLOSE, 1, bytes([ERROR]) + reason.encode()) in sent_frames(transport)


def test_a_window_overflow_closes_only_that_stream():
    mux, transport, factory = daemon_alone()
    with capturedLogs() as events:
        mux.dataReceived(frame(OPEN, 1) + frame(WINDOW, 1, relay.WINDOW_INCREMENT.pack(2**31)))
    reason = (f"window overflow: {relay.INITIAL_WINDOW} + {2**31} bytes of credit on stream 1 "
              f"exceeds {2**31 - 1}")
    assert warnings(events) == [reason]
    assert factory.built[0].lost.check(StreamError)
    assert not transport.disconnecting


def test_bad_open_addresses_and_a_refusing_factory_refuse_the_stream():
    mux, transport, factory = daemon_alone(max_streams=2)
    factory.buildProtocol = lambda addr: None if addr.port == 13 else RecorderFactory.buildProtocol(factory, addr)
    with capturedLogs() as events:
        mux.dataReceived(frame(OPEN, 1, b"TCP4 ::1 22") + frame(OPEN, 3, b"TCP4 10.1.1.1 13")
                         + frame(OPEN, 5, b"TCP6 ::1 22") + frame(OPEN, 7, b"TCP4 10.1.1.1 1")
                         + frame(OPEN, 9, b"TCP4 10.1.1.1 2"))
    assert warnings(events) == ["bad peer address in OPEN: ::1 is not a TCP4 address",
                                "the daemon refused the connection",
                                "too many streams (at most 2)"]
    assert [p.transport.getPeer() for p in factory.built] == [
        relay.IPv6Address("TCP", "::1", 22), IPv4Address("TCP", "10.1.1.1", 1)]
    refused = [(sid, payload[0]) for kind, sid, payload in sent_frames(transport) if kind == CLOSE]
    assert refused == [(1, relay.REFUSED), (3, relay.REFUSED), (9, relay.REFUSED)]
    assert not transport.disconnecting


def test_an_exception_in_a_protocol_aborts_its_stream_and_nothing_escapes():
    class Boom(Recorder):
        def dataReceived(self, data):
            raise ValueError("bug")

    pair = Pair(Factory.forProtocol(Boom))
    up = Recorder()
    pair.broker.open_stream(CLIENT_ADDR, up).write(b"x")
    with capturedLogs() as events:
        pair.flush()
    assert any("dataReceived failed" in str(e.get("log_format")) for e in events)
    assert up.lost.check(ConnectionLost)


# -- the broker's relayed connections -------------------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data.upper())


def test_a_relayed_tcp_connection_is_piped_both_ways_and_closed():
    pair = Pair(Factory.forProtocol(Echo))
    client = Recorder()
    relayed = RelayedConnectionFactory(pair.broker).buildProtocol(CLIENT_ADDR)
    tcp = iosim.connect(relayed, iosim.FakeTransport(relayed, isServer=True, peerAddress=CLIENT_ADDR),
                        client, iosim.FakeTransport(client, isServer=False), clock=pair.clock)
    client.transport.write(b"hello through the relay")
    for _ in range(5):
        tcp.flush()
        pair.flush()
    assert client.data == b"HELLO THROUGH THE RELAY"
    (stream,) = pair.daemon.streams.values()
    assert stream.getPeer() == CLIENT_ADDR
    client.transport.loseConnection()
    for _ in range(5):
        tcp.flush()
        pair.flush()
    assert pair.broker.streams == {} and pair.daemon.streams == {}
    assert client.lost is not None


def test_without_a_relay_connection_the_tcp_connection_is_aborted():
    pair = Pair()
    pair.daemon_io.loseConnection()
    pair.flush()
    relayed = RelayedConnectionFactory(pair.broker).buildProtocol(CLIENT_ADDR)
    t = iosim.FakeTransport(relayed, isServer=True, peerAddress=CLIENT_ADDR)
    with capturedLogs() as events:
        relayed.makeConnection(t)
    assert t.disconnecting
    assert [e["reason"] for e in events if "reason" in e] == ["the relay connection is closed"]


def test_tcp_backpressure_pauses_the_stream_and_the_stream_pauses_tcp_reads():
    pair = Pair(RecorderFactory(pause_first=1), initial_window=1024, stream_buffer=2048)
    relayed = RelayedConnectionFactory(pair.broker).buildProtocol(CLIENT_ADDR)
    t = iosim.FakeTransport(relayed, isServer=True, peerAddress=CLIENT_ADDR)
    relayed.makeConnection(t)
    tcp_reads = FakeProducer()
    relayed.stream._producer = tcp_reads  # stand in for the TCP transport's reading side
    relayed.dataReceived(b"z" * 10_000)  # the daemon's protocol is paused: credit runs out
    pair.flush()
    assert tcp_reads.paused
    pair.factory.built[0].transport.resumeProducing()
    pair.flush()
    assert pair.factory.built[0].data == b"z" * 10_000 and not tcp_reads.paused
    # the TCP transport's write buffer is full: it pauses the stream, which stops granting
    assert t.producer is relayed.stream
    t.producer.pauseProducing()
    pair.factory.built[0].transport.write(b"q" * 5000)
    pair.flush()
    assert b"".join(t.stream) == b""  # held at the broker: one window, no more
    assert sum(map(len, relayed.stream._inbound)) == 1024
    assert pair.factory.built[0].transport._outbound_size == 5000 - 1024
    t.producer.resumeProducing()
    pair.flush()
    assert b"".join(t.stream) == b"q" * 5000


# -- the message layer, TLS and x509, through a relayed stream ------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from gwms.credentials import ca

    base = tmp_path_factory.mktemp("relay-pki")
    ca.init_ca(base, name="relay test CA")
    host = ca.issue_host(base, "localhost")
    user = ca.issue_user(base, "alice")
    return base, host, user


def _message_ends(pki):
    from gwms.config import parse_config
    from gwms.credentials.x509 import load_credential
    from gwms.plugins import authorizer, load_auth_methods
    from gwms.protocols.client import ClientSecurity
    from gwms.protocols.messages import Command, Limits, MessageServerFactory
    from gwms.security import Auditor, ServerSecurity
    from gwms.tls import ServerTLS

    base, (host_cert, host_key), (user_cert, user_key) = pki
    security = ('[security]\nmethods = ["x509"]\n[security.READ]\nauthentication = "REQUIRED"\n'
                'encryption = "REQUIRED"\nallow = ["*"]\n')
    server_config = parse_config(f'[pool]\nca = "{base}/ca.pem"\n' + security)
    methods, levels = load_auth_methods(server_config)
    seen = []

    def whoami(request):
        seen.append(request)
        reply = classads.ClassAd()
        reply["You"] = request.identity.name
        reply["From"] = request.channel.peer_host
        return reply

    server_security = ServerSecurity(levels, methods, authorizer(server_config), Auditor(),
                                     tls=ServerTLS(load_credential(host_cert, host_key), base / "ca.pem"))
    client_config = parse_config(f'[pool]\nca = "{base}/ca.pem"\ncert = "{user_cert}"\nkey = "{user_key}"\n'
                                 + security)
    client_security = ClientSecurity.from_config(client_config)
    return server_security, client_security, Command("WHOAMI", "READ", whoami), Limits, MessageServerFactory, seen


def _check_session(pair, client, seen, flush):
    ready = []
    client.ready.addBoth(ready.append)
    flush()
    assert ready and ready[0] is client, ready
    assert client.encrypted and client.method == "x509"
    assert client.identity.endswith("CN=alice")
    replies = []
    client.call("WHOAMI", classads.ClassAd()).addBoth(replies.append)
    flush()
    assert replies[0]["You"] == client.identity
    assert replies[0]["From"] == "192.0.2.7"  # the address the broker accepted from
    assert seen[0].channel.tls and seen[0].channel.verified_chain
    # the relay carried only ciphertext after the HELLO exchange
    return replies


def test_message_layer_with_tls_and_x509_through_a_relayed_stream(pki):
    from gwms.protocols.messages import ClientProtocol

    server_security, client_security, command, Limits, MessageServerFactory, seen = _message_ends(pki)
    pair = Pair()
    pair.daemon.factory = MessageServerFactory(pair.clock, server_security, [command])
    wire = []
    original = pair.broker_io.bufferReceived

    def tap(buf):
        wire.append(buf)
        original(buf)

    pair.broker_io.bufferReceived = tap
    client = ClientProtocol(pair.clock, Limits(), client_security, "READ", "localhost")
    pair.broker.open_stream(CLIENT_ADDR, client)
    _check_session(pair, client, seen, pair.flush)
    assert b"CN=alice" not in b"".join(wire[2:]) and b"You" not in b"".join(wire)
    client.transport.loseConnection()
    pair.flush()
    assert pair.daemon.streams == {} and pair.broker.streams == {}
    assert not pair.daemon.factory.connections


class RealTLSFakeTransport(iosim.FakeTransport):
    """An iosim transport whose startTLS is real TLS (iosim's own only pretends)."""

    _tls = None

    def startTLS(self, contextFactory, beNormal=True):
        client = (not self.isServer) if beNormal else self.isServer
        factory = TLSMemoryBIOFactory(contextFactory, client, None, clock=MemoryReactorClock())
        self._tls = TLSMemoryBIOProtocol(factory, self.protocol, _connectWrapped=False)
        self.protocol = self._tls
        outer = self

        class Below:
            def write(self, data):
                iosim.FakeTransport.write(outer, data)

            def writeSequence(self, seq):
                iosim.FakeTransport.write(outer, b"".join(seq))

            def loseConnection(self):
                iosim.FakeTransport.loseConnection(outer)

            abortConnection = loseConnection

            def getPeer(self):
                return outer.getPeer()

            def getHost(self):
                return outer.getHost()

        self._tls.makeConnection(Below())

    def write(self, data):
        if self._tls is not None:
            self._tls.write(data)
        else:
            super().write(data)

    def loseConnection(self):
        if self._tls is not None:
            self._tls.loseConnection()
        else:
            super().loseConnection()

    def getHandle(self):
        return self._tls.getHandle()


def test_message_layer_from_a_tcp_client_through_the_broker_to_the_daemon(pki):
    """The whole path: client --TCP--> RelayedConnection --mux--> daemon's ServerProtocol."""
    from gwms.protocols.messages import ClientProtocol

    server_security, client_security, command, Limits, MessageServerFactory, seen = _message_ends(pki)
    pair = Pair()
    pair.daemon.factory = MessageServerFactory(pair.clock, server_security, [command])
    client = ClientProtocol(pair.clock, Limits(), client_security, "READ", "localhost")
    relayed = RelayedConnectionFactory(pair.broker).buildProtocol(CLIENT_ADDR)
    tcp = iosim.connect(relayed, iosim.FakeTransport(relayed, isServer=True, peerAddress=CLIENT_ADDR),
                        client, RealTLSFakeTransport(client, isServer=False, peerAddress=BROKER_ADDR),
                        clock=pair.clock)

    def flush():
        for _ in range(20):
            if not (tcp.pump() | pair.pump.pump()):
                break

    _check_session(pair, client, seen, flush)
    client.transport.loseConnection()
    flush()
    assert pair.daemon.streams == {} and pair.broker.streams == {}
    assert not pair.daemon.factory.connections
