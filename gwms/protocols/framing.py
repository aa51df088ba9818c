"""Frames: the unit of the gwms message layer.

A frame is a 4-byte big-endian payload length followed by the payload::

    <kind> SP <request id> SP <command> LF <body>

``kind`` is one letter: ``Q`` a request, ``R`` the final reply, ``I`` one item of a streamed reply
(query results), ``E`` an error (final). The request id is chosen by the client and correlates
replies, so many commands run at once over one connection. The body is one ClassAd in new syntax
(``gwms.classads.encode``). The length is checked against the maximum before anything is
buffered, so a hostile length costs nothing.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

LENGTH = struct.Struct("!I")
KINDS = frozenset("QRIE")
MAX_HEADER = 128
MAX_REQUEST_ID = 2**63 - 1
_COMMAND = re.compile(rb"[A-Z][A-Z0-9_]{0,63}\Z")

REQUEST, REPLY, ITEM, ERROR = "Q", "R", "I", "E"


class FrameError(Exception):
    """A frame that breaks the protocol. ``code`` is a stable name a client can test."""

    def __init__(self, code: str, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(slots=True)
class Frame:
    kind: str
    request_id: int
    command: str
    body: bytes


def encode_frame(kind: str, request_id: int, command: str, body: bytes) -> bytes:
    header = b"%s %d %s\n" % (kind.encode("ascii"), request_id, command.encode("ascii"))
    return LENGTH.pack(len(header) + len(body)) + header + body


def _parse_payload(payload: bytes) -> Frame:
    newline = payload.find(b"\n", 0, MAX_HEADER)
    if newline < 0:
        raise FrameError("MALFORMED_FRAME", f"frame header is missing its end of line within "
                                            f"{MAX_HEADER} bytes")
    parts = payload[:newline].split(b" ")
    if len(parts) != 3:
        raise FrameError("MALFORMED_FRAME", f"frame header {payload[:newline][:60]!r} is not "
                                            "'<kind> <id> <command>'")
    kind, rid, command = parts
    request_id = 0
    if rid.isdigit() and len(rid) <= 19:
        request_id = int(rid)
    if kind.decode("latin-1") not in KINDS or len(kind) != 1:
        raise FrameError("MALFORMED_FRAME", f"unknown frame kind {kind[:8]!r}", request_id)
    if not rid.isdigit() or len(rid) > 19 or request_id > MAX_REQUEST_ID:
        raise FrameError("MALFORMED_FRAME", f"bad request id {rid[:24]!r}")
    if not _COMMAND.match(command):
        raise FrameError("MALFORMED_FRAME", f"bad command name {command[:70]!r}", request_id)
    return Frame(kind.decode("ascii"), request_id, command.decode("ascii"), payload[newline + 1:])


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back.

    After a FrameError the stream is out of step and the connection must be closed; the decoder
    refuses further input so that nothing after the error is misread as a frame.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._failed = False

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[list[Frame], FrameError | None]:
        """Add ``data``; return the whole frames it completed and the protocol error that
        followed them, if any (frames before a bad one are still good and are answered)."""
        if self._failed:
            return [], FrameError("MALFORMED_FRAME", "input after a protocol error")
        buf = self._buffer
        buf += data
        frames: list[Frame] = []
        offset = 0
        try:
            while len(buf) - offset >= 4:
                (length,) = LENGTH.unpack_from(buf, offset)
                if length > self.max_frame:
                    raise FrameError("FRAME_TOO_LARGE", f"frame of {length} bytes exceeds the "
                                                        f"maximum of {self.max_frame} bytes")
                if length < 6:
                    raise FrameError("MALFORMED_FRAME", f"frame of {length} bytes is too short "
                                                        "to hold a header")
                end = offset + 4 + length
                if len(buf) < end:
                    break
                frames.append(_parse_payload(bytes(buf[offset + 4:end])))
                offset = end
        except FrameError as error:
            self._failed = True
            buf.clear()
            return frames, error
        del buf[:offset]
        return frames, None
