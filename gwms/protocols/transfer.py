"""Sandbox file transfer between shadow and starter, over the message layer.

Files move in chunks of at most ``CHUNK`` bytes, base64 inside a ClassAd: the input sandbox
with PUT_FILE (sequential offsets, the SHA-256 of the whole file on the last chunk, checked by
the starter before the job may start), the output sandbox with LIST_OUTPUT (names, sizes,
SHA-256) and GET_FILE (checked by the shadow). Sandbox file names are plain base names: a name
with a slash, ``..``, a NUL or a leading dot-dot is refused wherever it arrives.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

CHUNK = 256 * 1024
STDOUT = "_condor_stdout"
STDERR = "_condor_stderr"


class TransferError(Exception):
    pass


def check_name(name: object) -> str:
    """A sandbox file name, or TransferError saying why it is not one."""
    if not isinstance(name, str) or not name:
        raise TransferError("a file name must be a non-empty string")
    if "/" in name or "\x00" in name or name in (".", "..") or len(name) > 255:
        raise TransferError(f"{name[:80]!r} is not a plain file name")
    return name


def encode_chunk(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_chunk(text: object) -> bytes:
    if not isinstance(text, str):
        raise TransferError("Data must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise TransferError("Data is not valid base64") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
