"""Relayed streams for connection brokering (GCB): many byte streams over one connection.

A daemon that can only connect out registers with the broker over one long-lived connection;
the broker relays each connection accepted on the daemon's dedicated port as one *stream* over
it. Both ends run :class:`MuxProtocol` (with a role); the daemon end builds a protocol from its
ordinary factory for every stream the broker opens and gives it a :class:`StreamTransport`,
which is a transport like TCP's, STARTTLS included: the daemons' message layer runs end to end
through the relay and the broker sees only ciphertext.

Frame format (all integers big-endian)::

    length:u32  type:u8  stream:u32  payload[length - 5]

``length`` counts everything after itself and is checked against the maximum before anything
is buffered. Types:

``OPEN`` (1)
    Opens ``stream``; the payload is the address the broker accepted the connection from, as
    ASCII ``TCP4 <ip> <port>`` or ``TCP6 <ip> <port>``, or empty when unknown. The broker opens
    odd stream ids, the daemon even ones, each strictly increasing (as in HTTP/2).
``DATA`` (2)
    Payload bytes of ``stream`` (at most ``max_data`` per frame, so streams interleave).
``CLOSE`` (3)
    ``code:u8`` then a UTF-8 reason. Codes: 0 DONE (orderly close after all data), 1 ABORT
    (reset: buffered data is discarded), 2 ERROR (a protocol error on this stream), 3 REFUSED
    (the stream was not accepted). The stream is closed in both directions; data already in
    flight for it is discarded. ``CLOSE`` on stream 0 closes the whole connection and says why.
``WINDOW`` (4)
    ``credit:u32``: the receiver of ``stream`` allows its sender that many more bytes.

Flow control: every stream starts with ``initial_window`` bytes of credit each way (both ends
must use the same value). A receiver grants credit back (WINDOW) as its protocol takes the data;
a protocol that pauses its transport (IPushProducer) stops taking data, so its sender runs out
of credit at one window while every other stream keeps flowing. A sender buffers what it may
not send yet and pauses its own producer above ``stream_buffer`` bytes. The underlying
connection's backpressure (the mux is a producer registered on its transport) stops DATA for
all streams; control frames still go out.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    ITCPTransport,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from gwms.protocols.messages import no_delay

log = Logger()

LENGTH = struct.Struct("!I")
HEADER = struct.Struct("!BI")  # frame type, stream id
WINDOW_INCREMENT = struct.Struct("!I")

OPEN, DATA, CLOSE, WINDOW = 1, 2, 3, 4
FRAME_NAMES = {OPEN: "OPEN", DATA: "DATA", CLOSE: "CLOSE", WINDOW: "WINDOW"}

DONE, ABORT, ERROR, REFUSED = 0, 1, 2, 3
CLOSE_NAMES = {DONE: "DONE", ABORT: "ABORT", ERROR: "ERROR", REFUSED: "REFUSED"}

INITIAL_WINDOW = 1024 * 1024
MAX_WINDOW = 2**31 - 1
MAX_DATA = 64 * 1024
MAX_REASON = 1024
MAX_ADDRESS = 128
MAX_STREAM_ID = 2**32 - 1
STREAM_BUFFER = 256 * 1024

ROLES = {"broker": 1, "daemon": 2}  # the first stream id each role opens

UNKNOWN_PEER = IPv4Address("TCP", "0.0.0.0", 0)


class MuxError(Exception):
    """The relay connection cannot open a stream (closed, too many streams, ids used up)."""


class StreamError(ConnectionLost):
    """A stream closed by a CLOSE other than DONE, or by a protocol error on it."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"relayed stream {CLOSE_NAMES.get(code, code)}: {reason}")
        self.code = code
        self.reason = reason


def frame(kind: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One encoded frame."""
    return LENGTH.pack(HEADER.size + len(payload)) + HEADER.pack(kind, stream_id) + payload


def encode_address(address: Any) -> bytes:
    if isinstance(address, IPv4Address) and address.type == "TCP":
        return b"TCP4 %s %d" % (address.host.encode("ascii"), address.port)
    if isinstance(address, IPv6Address) and address.type == "TCP":
        return b"TCP6 %s %d" % (address.host.encode("ascii"), address.port)
    return b""


def decode_address(payload: bytes) -> Any:
    """The address an OPEN carries; raises ValueError naming what is wrong."""
    if not payload:
        return UNKNOWN_PEER
    if len(payload) > MAX_ADDRESS:
        raise ValueError(f"address of {len(payload)} bytes is longer than {MAX_ADDRESS}")
    parts = payload.split(b" ")
    if len(parts) != 3 or parts[0] not in (b"TCP4", b"TCP6"):
        raise ValueError(f"address {payload[:60]!r} is not 'TCP4|TCP6 <ip> <port>'")
    family, host, port = parts
    try:
        ip = ipaddress.ip_address(host.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{host[:60]!r} is not an IP address") from None
    if (ip.version == 4) != (family == b"TCP4"):
        raise ValueError(f"{host.decode()} is not a {family.decode()} address")
    if not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise ValueError(f"bad port {port[:10]!r}")
    cls = IPv4Address if family == b"TCP4" else IPv6Address
    return cls("TCP", str(ip), int(port))


# ------------------------------------------------------------------------------------------
# One stream
# ------------------------------------------------------------------------------------------


@implementer(ITransport, IConsumer, IPushProducer)
class _RawStream:
    """The transport the TLS layer writes its records to: the stream below TLS."""

    def __init__(self, stream: StreamTransport) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        self._stream._raw_write(data)

    def writeSequence(self, seq: Any) -> None:
        self._stream._raw_write(b"".join(seq))

    def loseConnection(self) -> None:
        self._stream._raw_lose()

    def abortConnection(self) -> None:
        self._stream._raw_abort()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._stream._raw_register(producer, streaming)

    def unregisterProducer(self) -> None:
        self._stream._raw_unregister()

    def pauseProducing(self) -> None:
        self._stream.pauseProducing()

    def resumeProducing(self) -> None:
        self._stream.resumeProducing()

    def stopProducing(self) -> None:
        self._stream._raw_lose()

    def getPeer(self) -> Any:
        return self._stream.getPeer()

    def getHost(self) -> Any:
        return self._stream.getHost()

    @property
    def disconnecting(self) -> bool:
        return self._stream._closing or self._stream.disconnected

    def logPrefix(self) -> str:
        return self._stream.logPrefix()


@implementer(ITCPTransport, ITLSTransport, IConsumer, IPushProducer)
class StreamTransport:
    """The transport a protocol sees for one relayed stream.

    Writes are buffered until the stream has credit; ``loseConnection`` closes after what was
    written has been sent; ``pauseProducing`` stops delivery to the protocol (and the granting
    of credit to the sender); ``startTLS`` puts TLS on the stream like TCP's startTLS does.
    ``getPeer`` is, on the daemon's end, the address the broker accepted the connection from
    (from the OPEN frame; 0.0.0.0:0 when the broker did not say), on the broker's end the
    relay connection's peer."""

    def __init__(self, mux: MuxProtocol, stream_id: int, relayed_peer: Any, opened_here: bool) -> None:
        self.mux = mux
        self.stream_id = stream_id
        self.relayed_peer = relayed_peer
        self.opened_here = opened_here
        self.protocol: Any = None
        self._tls: TLSMemoryBIOProtocol | None = None
        # flow control
        self._send_credit = mux.initial_window
        self._recv_credit = mux.initial_window
        self._consumed = 0
        # outgoing
        self._outbound: deque[bytes] = deque()
        self._outbound_size = 0
        self._queued = False  # in the mux's ready queue
        self._producer: Any = None
        self._streaming = False
        self._producer_paused = False
        # incoming
        self._inbound: deque[bytes] = deque()
        self._paused = False
        self._delivering = False
        # life
        self._closing = False  # loseConnection below TLS: CLOSE once the buffer is sent
        self._remote_closed = False
        self._pending_lost: Failure | None = None  # peer's DONE, delivered after buffered data
        self.disconnected = False
        self._lost_delivered = False
        self._unattached_lost: Failure | None = None

    def __repr__(self) -> str:
        return f"<StreamTransport {self.stream_id} of {self.mux.role} mux>"

    # -- what the protocol sees ------------------------------------------------------------
    @property
    def disconnecting(self) -> bool:
        return (self._closing or self._remote_closed or self.disconnected
                or bool(self._tls is not None and self._tls.disconnecting))

    @property
    def connected(self) -> bool:
        return not self.disconnecting

    @property
    def TLS(self) -> bool:
        return self._tls is not None

    def write(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.write(data)
        else:
            self._raw_write(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        if self._tls is not None:
            if not self.disconnected:
                self._tls.loseConnection()
        else:
            self._raw_lose()

    def abortConnection(self) -> None:
        if self._tls is not None and not self.disconnected:
            self._tls.abortConnection()  # ends in _raw_abort
        self._raw_abort()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._tls is not None:
            self._tls.registerProducer(producer, streaming)
        else:
            self._raw_register(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._tls is not None:
            self._tls.unregisterProducer()
        else:
            self._raw_unregister()

    def getPeer(self) -> Any:
        if self.opened_here:
            transport = self.mux.transport
            return transport.getPeer() if transport is not None else UNKNOWN_PEER
        return self.relayed_peer

    def getHost(self) -> Any:
        transport = self.mux.transport
        return transport.getHost() if transport is not None else UNKNOWN_PEER

    def getHandle(self) -> Any:
        """The OpenSSL connection once TLS is started (what the message layer reads the
        verified chain from), else None: a stream has no socket."""
        return self._tls.getHandle() if self._tls is not None else None

    def getPeerCertificate(self) -> Any:
        return self._tls.getPeerCertificate() if self._tls is not None else None

    def logPrefix(self) -> str:
        return f"relay-stream-{self.stream_id}"

    # TCP options mean nothing for a stream; the relay connection has its own.
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    # -- IPushProducer: the flow of received data to the protocol ----------------------------
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._drain_inbound()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- TLS -------------------------------------------------------------------------------
    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        """Put TLS on the stream, as TCP's startTLS does: bytes written before go out in the
        clear before the handshake. The end that opened the stream is the TLS client."""
        if self._tls is not None:
            raise RuntimeError("TLS is already started on this stream")
        if self.disconnected:
            return
        client = self.opened_here if normal else not self.opened_here
        producer, streaming = self._producer, self._streaming
        if producer is not None:
            self._raw_unregister()
        tls_factory = TLSMemoryBIOFactory(contextFactory, client, None, clock=self.mux.clock)
        # The plain TLSMemoryBIOProtocol, not the write-aggregating default: no timer, one
        # record per write (the message layer batches its frames itself).
        self._tls = TLSMemoryBIOProtocol(tls_factory, self.protocol, _connectWrapped=False)
        self._tls.makeConnection(_RawStream(self))
        if producer is not None:
            self._tls.registerProducer(producer, streaming)

    # -- below TLS ---------------------------------------------------------------------------
    def attach(self, protocol: Any) -> None:
        """Connect ``protocol`` to this stream (the broker's end when open_stream was given
        none). Data that arrived before is delivered now."""
        if self.protocol is not None:
            raise RuntimeError("a protocol is already attached to this stream")
        self.protocol = protocol
        try:
            protocol.makeConnection(self)
        except Exception:
            log.failure("relayed stream {stream}: connectionMade failed", stream=self.stream_id)
            self.abortConnection()
            return
        if self._unattached_lost is not None:
            self._deliver_lost(self._unattached_lost)
            return
        self._drain_inbound()

    def _raw_write(self, data: bytes) -> None:
        if self._closing or self._remote_closed or self.disconnected or not data:
            return
        self._outbound.append(bytes(data))
        self._outbound_size += len(data)
        self.mux._want_send(self)
        if (self._producer is not None and self._streaming and not self._producer_paused
                and self._outbound_size > self.mux.stream_buffer):
            self._producer_paused = True
            self._producer.pauseProducing()

    def _take(self, n: int) -> bytes:
        parts = []
        left = n
        while left:
            head = self._outbound[0]
            if len(head) <= left:
                parts.append(self._outbound.popleft())
                left -= len(head)
            else:
                parts.append(head[:left])
                self._outbound[0] = head[left:]
                left = 0
        self._outbound_size -= n
        return b"".join(parts)

    def _after_send(self) -> None:
        """Some buffered data went out: let the producer go on, finish a pending close."""
        if self._producer is not None and self._outbound_size <= self.mux.stream_buffer // 2:
            if self._streaming:
                if self._producer_paused:
                    self._producer_paused = False
                    self._producer.resumeProducing()
            elif not self._outbound:
                self._producer.resumeProducing()
        self._maybe_finish_close()

    def _raw_register(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"cannot register producer {producer!r}: {self._producer!r} is "
                               "already registered")
        if self.disconnected:
            producer.stopProducing()
            return
        self._producer, self._streaming, self._producer_paused = producer, streaming, False
        if streaming:
            if self._outbound_size > self.mux.stream_buffer:
                self._producer_paused = True
                producer.pauseProducing()
        else:
            producer.resumeProducing()

    def _raw_unregister(self) -> None:
        self._producer = None
        self._producer_paused = False

    def _raw_lose(self) -> None:
        if self._closing or self.disconnected:
            return
        self._closing = True
        self._maybe_finish_close()

    def _maybe_finish_close(self) -> None:
        if self._closing and not self._outbound and not self.disconnected:
            if not self._remote_closed:
                self.mux._send_close(self.stream_id, DONE, "")
            self._finish(Failure(ConnectionDone("relayed stream closed")), later=True)

    def _raw_abort(self) -> None:
        if self.disconnected:
            return
        self._outbound.clear()
        self._outbound_size = 0
        if not self._remote_closed:
            self.mux._send_close(self.stream_id, ABORT, "aborted")
        self._finish(Failure(ConnectionAborted("relayed stream aborted")), later=True)

    def _finish(self, reason: Failure, later: bool) -> None:
        """The stream is over: forget it, and tell the protocol (later when this runs inside
        the protocol's own call, as TCP never calls connectionLost from loseConnection)."""
        if self.disconnected:
            return
        self.disconnected = True
        self._inbound.clear()
        self._outbound.clear()
        self._outbound_size = 0
        self.mux._forget(self)
        if later:
            self.mux.clock.callLater(0, self._deliver_lost, reason)
        else:
            self._deliver_lost(reason)

    def _deliver_lost(self, reason: Failure) -> None:
        if self._lost_delivered:
            return
        self._lost_delivered = True
        self._producer = None
        target = self._tls if self._tls is not None else self.protocol
        if target is None:
            self._lost_delivered = False
            self._unattached_lost = reason  # delivered by attach
            return
        try:
            target.connectionLost(reason)
        except Exception:
            log.failure("relayed stream {stream}: connectionLost failed", stream=self.stream_id)

    # -- from the mux ------------------------------------------------------------------------
    def _data_received(self, data: bytes) -> None:
        if len(data) > self._recv_credit:
            self.mux._stream_error(self, f"flow control: {len(data)} bytes of DATA beyond the "
                                         f"{self._recv_credit} bytes of credit granted on stream "
                                         f"{self.stream_id}")
            return
        self._recv_credit -= len(data)
        if data:
            self._inbound.append(data)
        self._drain_inbound()

    def _drain_inbound(self) -> None:
        if self._delivering:
            return  # the loop below picks it up
        self._delivering = True
        try:
            while (self._inbound and not self._paused and self.protocol is not None
                   and not self.disconnected):
                data = self._inbound.popleft()
                self._consumed += len(data)
                target = self._tls if self._tls is not None else self.protocol
                try:
                    target.dataReceived(data)
                except Exception:
                    log.failure("relayed stream {stream}: dataReceived failed; aborting the stream",
                                stream=self.stream_id)
                    self.abortConnection()
        finally:
            self._delivering = False
        if self.disconnected:
            return
        if self._remote_closed:
            if not self._inbound and not self._paused and self._pending_lost is not None:
                reason, self._pending_lost = self._pending_lost, None
                self._finish(reason, later=False)
            return
        if self._consumed and self._consumed >= self.mux.window_update_threshold:
            credit, self._consumed = self._consumed, 0
            self._recv_credit += credit
            self.mux._write_frame(WINDOW, self.stream_id, WINDOW_INCREMENT.pack(credit))

    def _window(self, increment: int) -> None:
        if self._send_credit + increment > MAX_WINDOW:
            self.mux._stream_error(self, f"window overflow: {self._send_credit} + {increment} bytes of "
                                         f"credit on stream {self.stream_id} exceeds {MAX_WINDOW}")
            return
        self._send_credit += increment
        if self._outbound:
            self.mux._want_send(self)

    def _peer_closed(self, code: int, reason: str) -> None:
        self._remote_closed = True
        self._outbound.clear()
        self._outbound_size = 0
        if code == DONE:
            self.mux._forget(self)
            self._pending_lost = Failure(ConnectionDone("relayed stream closed by the other end"))
            self._drain_inbound()  # delivers connectionLost now, or once the protocol resumes
        else:
            if code == ABORT:
                failure = Failure(ConnectionLost(f"relayed stream reset by the other end: {reason}"))
            else:
                failure = Failure(StreamError(code, reason))
            self._finish(failure, later=False)


# ------------------------------------------------------------------------------------------
# The connection
# ------------------------------------------------------------------------------------------


@implementer(IPushProducer)
class MuxProtocol(Protocol):
    """One end of a relay connection: streams multiplexed with per-stream flow control.

    ``role`` is "broker" (opens odd stream ids: ``open_stream``) or "daemon" (opens even ids;
    builds a protocol from ``factory`` for every stream the broker opens). Either end may open
    streams and either may accept them if given a factory. ``clock`` (an IReactorTime) defers
    connectionLost after a local close; it defaults to the global reactor."""

    def __init__(self, role: str, factory: Any = None, *, clock: Any = None,
                 initial_window: int = INITIAL_WINDOW, max_data: int = MAX_DATA,
                 max_streams: int = 1024, stream_buffer: int = STREAM_BUFFER) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be 'broker' or 'daemon', not {role!r}")
        if not 0 < initial_window <= MAX_WINDOW:
            raise ValueError(f"initial window must be 1..{MAX_WINDOW} bytes")
        if clock is None:
            from twisted.internet import reactor as clock
        self.role = role
        self.factory = factory
        self.clock = clock
        self.initial_window = initial_window
        self.window_update_threshold = max(1, initial_window // 2)
        self.max_data = max_data
        self.max_frame = HEADER.size + max(max_data, 1 + MAX_REASON, MAX_ADDRESS)
        self.max_streams = max_streams
        self.stream_buffer = stream_buffer
        self.streams: dict[int, StreamTransport] = {}
        self._next_id = ROLES[role]
        self._own_parity = ROLES[role] % 2
        self._peer_last_id = 0
        self._buffer = bytearray()
        self._ready: deque[StreamTransport] = deque()
        self._sending = False
        self._out_paused = False
        self._failed = False  # a protocol error: input is no longer read
        self._gone = False
        self.error: str | None = None
        # Fires (with the exception that ended it, as a result) when the connection is gone.
        self.lost: defer.Deferred[BaseException] = defer.Deferred()

    # -- connection life ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._gone = True
        self._ready.clear()
        why = self.error or reason.getErrorMessage()
        for stream in list(self.streams.values()):
            stream._finish(Failure(ConnectionLost(f"relay connection lost: {why}")), later=False)
        self.streams.clear()
        if not self.lost.called:
            self.lost.callback(reason.value)

    def _peer_name(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        host = getattr(peer, "host", None)
        return f"{host}:{getattr(peer, 'port', '')}" if host else str(peer)

    def _connection_error(self, reason: str) -> None:
        """The peer broke the protocol: say why (to it and in the log), and close."""
        if self._failed:
            return
        self._failed = True
        self.error = reason
        log.warn("relay connection from {peer} closed: {reason}", peer=self._peer_name(), reason=reason,  # noqa: G010 (twisted.logger has no warning())
                 role=self.role)
        self._send_close(0, ERROR, reason)
        self.transport.loseConnection()

    def _stream_error(self, stream: StreamTransport, reason: str) -> None:
        """The peer broke the protocol on one stream: close that stream only."""
        log.warn("relayed stream {stream} from {peer} closed: {reason}", stream=stream.stream_id,  # noqa: G010 (twisted.logger has no warning())
                 peer=self._peer_name(), reason=reason, role=self.role)
        self._send_close(stream.stream_id, ERROR, reason)
        stream._remote_closed = True
        stream._finish(Failure(StreamError(ERROR, reason)), later=False)

    # -- opening streams -----------------------------------------------------------------------
    def open_stream(self, peer_address: Any = None, protocol: Any = None) -> StreamTransport:
        """Open a stream; ``peer_address`` (where the relayed connection came from) is sent to
        the other end, which sees it as the stream's getPeer(). ``protocol``, if given, is
        connected at once; otherwise call ``attach`` (received data waits until then)."""
        if self._gone or self._failed or self.transport is None:
            raise MuxError("the relay connection is closed")
        if len(self.streams) >= self.max_streams:
            raise MuxError(f"too many streams on one relay connection (at most {self.max_streams})")
        if self._next_id > MAX_STREAM_ID:
            raise MuxError("stream ids are used up on this relay connection")
        sid = self._next_id
        self._next_id += 2
        stream = StreamTransport(self, sid, peer_address, opened_here=True)
        self.streams[sid] = stream
        self._write_frame(OPEN, sid, encode_address(peer_address))
        if protocol is not None:
            stream.attach(protocol)
        return stream

    # -- sending -----------------------------------------------------------------------------
    def _write_frame(self, kind: int, sid: int, payload: bytes = b"") -> None:
        if self._gone or self.transport is None:
            return
        head = LENGTH.pack(HEADER.size + len(payload)) + HEADER.pack(kind, sid)
        if len(payload) > 512:
            self.transport.writeSequence([head, payload])
        else:
            self.transport.write(head + payload)

    def _send_close(self, sid: int, code: int, reason: str) -> None:
        text = reason.encode("utf-8")[:MAX_REASON]
        self._write_frame(CLOSE, sid, bytes([code]) + text)

    def _want_send(self, stream: StreamTransport) -> None:
        if not stream._queued and stream._send_credit > 0 and stream._outbound:
            stream._queued = True
            self._ready.append(stream)
        self._send_ready()

    def _send_ready(self) -> None:
        """Send buffered DATA, one frame per stream in turn, while the connection takes it."""
        if self._sending:
            return
        self._sending = True
        try:
            while self._ready and not self._out_paused and not self._gone:
                stream = self._ready.popleft()
                stream._queued = False
                if stream.disconnected or not stream._outbound or stream._send_credit <= 0:
                    continue
                n = min(stream._send_credit, self.max_data, stream._outbound_size)
                chunk = stream._take(n)
                stream._send_credit -= n
                self._write_frame(DATA, stream.stream_id, chunk)
                if stream._outbound and stream._send_credit > 0 and not stream._queued:
                    stream._queued = True
                    self._ready.append(stream)
                stream._after_send()
        finally:
            self._sending = False

    def _forget(self, stream: StreamTransport) -> None:
        self.streams.pop(stream.stream_id, None)

    # IPushProducer: the relay connection's own transport asks us to hold DATA back.
    def pauseProducing(self) -> None:
        self._out_paused = True

    def resumeProducing(self) -> None:
        self._out_paused = False
        self._send_ready()

    def stopProducing(self) -> None:
        self._out_paused = True

    # -- receiving -----------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._failed or self._gone:
            return
        buf = self._buffer
        buf += data
        offset = 0
        try:
            while not self._failed and not self._gone and len(buf) - offset >= 4:
                (length,) = LENGTH.unpack_from(buf, offset)
                if length > self.max_frame:
                    self._connection_error(f"frame of {length} bytes exceeds the maximum of "
                                           f"{self.max_frame} bytes")
                    break
                if length < HEADER.size:
                    self._connection_error(f"frame of {length} bytes is too short to hold a type "
                                           "and a stream id")
                    break
                end = offset + 4 + length
                if len(buf) < end:
                    break
                kind, sid = HEADER.unpack_from(buf, offset + 4)
                payload = bytes(buf[offset + 4 + HEADER.size:end])
                offset = end
                try:
                    self._frame(kind, sid, payload)
                except Exception:
                    log.failure("relay connection: handling a {kind} frame failed",
                                kind=FRAME_NAMES.get(kind, kind))
                    self._connection_error("internal error in the relay")
        finally:
            if self._failed or self._gone:
                buf.clear()
            else:
                del buf[:offset]

    def _state(self, sid: int) -> str:
        """"open", "closed" (was open: late frames are expected) or "never" (a protocol error)."""
        if sid in self.streams:
            return "open"
        if sid % 2 == self._own_parity:
            return "closed" if sid < self._next_id else "never"
        return "closed" if sid <= self._peer_last_id else "never"

    def _frame(self, kind: int, sid: int, payload: bytes) -> None:
        name = FRAME_NAMES.get(kind)
        if name is None:
            return self._connection_error(f"unknown frame type {kind} on stream {sid}")
        if sid == 0:
            if kind != CLOSE:
                return self._connection_error(f"{name} frame on stream 0")
            code, reason = self._close_payload(payload)
            log.info("relay peer {peer} closed the connection ({code}): {reason}", peer=self._peer_name(),
                     code=CLOSE_NAMES.get(code, code), reason=reason)
            self.error = f"closed by the other end: {reason}" if reason else None
            self._failed = True
            self.transport.loseConnection()
            return None
        if kind == OPEN:
            return self._on_open(sid, payload)
        state = self._state(sid)
        if state == "never":
            return self._connection_error(f"{name} for stream {sid}, which was never opened")
        if kind == DATA:
            if state == "closed":
                log.debug("discarding {n} bytes for closed stream {stream}", n=len(payload), stream=sid)
                return None
            return self.streams[sid]._data_received(payload)
        if kind == WINDOW:
            if len(payload) != WINDOW_INCREMENT.size:
                return self._connection_error(f"WINDOW frame for stream {sid} has {len(payload)} "
                                              "bytes of payload, not 4")
            if state == "open":
                self.streams[sid]._window(WINDOW_INCREMENT.unpack(payload)[0])
            return None
        # CLOSE
        if state == "open":
            code, reason = self._close_payload(payload)
            self.streams[sid]._peer_closed(code, reason)
        return None

    @staticmethod
    def _close_payload(payload: bytes) -> tuple[int, str]:
        if not payload:
            return DONE, ""
        code = payload[0] if payload[0] in CLOSE_NAMES else ERROR
        return code, payload[1:1 + MAX_REASON].decode("utf-8", "replace")

    def _on_open(self, sid: int, payload: bytes) -> None:
        if sid % 2 == self._own_parity:
            return self._connection_error(f"OPEN for stream {sid}: the {self.role} end allocates "
                                          "that id itself")
        if sid <= self._peer_last_id:
            return self._connection_error(f"OPEN for stream {sid}, not above the last stream "
                                          f"opened ({self._peer_last_id})")
        self._peer_last_id = sid
        refusal = None
        address = UNKNOWN_PEER
        if self.factory is None:
            refusal = f"the {self.role} end accepts no streams"
        elif len(self.streams) >= self.max_streams:
            refusal = f"too many streams (at most {self.max_streams})"
        else:
            try:
                address = decode_address(payload)
            except ValueError as e:
                refusal = f"bad peer address in OPEN: {e}"
        protocol = None
        if refusal is None:
            try:
                protocol = self.factory.buildProtocol(address)
            except Exception:
                log.failure("relayed stream {stream}: buildProtocol failed", stream=sid)
            if protocol is None:
                refusal = "the daemon refused the connection"
        if refusal is not None:
            log.warn("relayed stream {stream} from {peer} refused: {reason}", stream=sid,  # noqa: G010 (twisted.logger has no warning())
                     peer=self._peer_name(), reason=refusal, role=self.role)
            self._send_close(sid, REFUSED, refusal)
            return None
        stream = StreamTransport(self, sid, address, opened_here=False)
        self.streams[sid] = stream
        stream.attach(protocol)
        return None


# ------------------------------------------------------------------------------------------
# The broker's end of a relayed TCP connection
# ------------------------------------------------------------------------------------------


class _StreamToConnection(Protocol):
    """The protocol on the broker's end of a stream: what arrives goes to the TCP client."""

    def __init__(self, relayed: RelayedConnection) -> None:
        self.relayed = relayed

    def dataReceived(self, data: bytes) -> None:
        self.relayed.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        tcp = self.relayed.transport
        self.relayed.stream_lost = True
        tcp.unregisterProducer()
        if reason.check(ConnectionDone):
            tcp.loseConnection()
        else:
            tcp.abortConnection()


class RelayedConnection(Protocol):
    """A connection accepted on a registered daemon's port at the broker: relayed as one stream
    over the daemon's relay connection, both ways, with backpressure both ways (the TCP
    connection pauses the stream's delivery, the stream's send buffer pauses TCP reads)."""

    def __init__(self, mux: MuxProtocol) -> None:
        self.mux = mux
        self.stream: StreamTransport | None = None
        self.stream_lost = False

    def connectionMade(self) -> None:
        no_delay(self.transport)
        try:
            stream = self.mux.open_stream(self.transport.getPeer())
        except MuxError as e:
            log.warn("cannot relay the connection from {peer}: {reason}", peer=self.transport.getPeer(),  # noqa: G010 (twisted.logger has no warning())
                     reason=str(e))
            self.transport.abortConnection()
            return
        self.stream = stream
        self.transport.registerProducer(stream, True)
        stream.registerProducer(self.transport, True)
        stream.attach(_StreamToConnection(self))

    def dataReceived(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        stream = self.stream
        if stream is None or self.stream_lost:
            return
        stream.unregisterProducer()
        if reason.check(ConnectionDone):
            stream.loseConnection()
        else:
            stream.abortConnection()


class RelayedConnectionFactory(Factory):
    """The factory of the broker's per-registration listening port."""

    def __init__(self, mux: MuxProtocol) -> None:
        self.mux = mux

    def buildProtocol(self, addr: Any) -> RelayedConnection:
        return RelayedConnection(self.mux)
