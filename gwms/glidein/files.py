"""The glidein files: a content-addressed store, the description that lists it, and its web view.

A factory publishes the files a glidein needs (validation scripts, a wheelhouse, the CA bundle,
entry attributes) into a store directory::

    store/files/<hexdigest>/<name>           every file under the SHA-256 of its bytes
    store/descriptions/<sha256>              a description, under the SHA-256 of its own bytes

and serves it over plain HTTP at the same relative paths. The description's hash travels with the
glidein submission (the trusted channel); ``glidein_startup.sh`` checks the description against
it and every file against the description. Because every URL carries the hash of what it names,
a proxy cache (Squid) or a factory half-way through an upgrade can never hand a glidein a mix of
old and new files: a URL's content never changes, so it may be cached forever.

Description format (UTF-8, every line ends with ``\\n``, nothing else allowed)::

    # gwms glidein description 1
    sha256:<64 hex> validate 10-disk.sh
    sha256:<64 hex> wheel gwms-0.1.0-py3-none-any.whl
    sha1:<40 hex> file extra.tar.gz

SHA-1 is accepted when reading, for compatibility with glideinWMS factories; :func:`publish`
always writes SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from zope.interface import implementer

__all__ = [
    "ALGORITHMS",
    "CACHE_CONTROL",
    "HEADER",
    "KINDS",
    "MAX_NAME",
    "DescriptionError",
    "FileEntry",
    "GlideinFilesResource",
    "parse_description",
    "publish",
    "startup_script",
    "stock_validation_scripts",
]

HEADER = "# gwms glidein description 1"
#: What each kind of file is for; glidein_startup.sh acts on each kind differently.
KINDS = ("validate", "wheel", "ca", "attrs", "file")
#: Hash algorithms a description may name, with the length of their hex digests.
ALGORITHMS = {"sha256": 64, "sha1": 40}
MAX_NAME = 200
# No '/', no leading '.': a name is one plain path component, never '.', '..' or hidden.
_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_HEX = re.compile(r"[0-9a-f]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Every URL names its content by hash, so its bytes can never change: cache it for a year.
CACHE_CONTROL = b"public, max-age=31536000, immutable"
_CHUNK = 1 << 16


class DescriptionError(ValueError):
    """A malformed description (or a file list :func:`publish` cannot describe); the message
    names the line and what is wrong with it."""


@dataclass(frozen=True)
class FileEntry:
    """One line of a description."""

    algo: str
    digest: str
    kind: str
    name: str


def _name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a glidein file name, or None."""
    if len(name) > MAX_NAME:
        return f"name is {len(name)} characters long (at most {MAX_NAME})"
    if not _NAME.fullmatch(name):
        return (f"bad name {name!r} (letters, digits, '.', '_', '+' and '-' only; "
                "no '/', not starting with '.')")
    return None


def _excerpt(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def parse_description(data: bytes, max_bytes: int = 1 << 20) -> list[FileEntry]:
    """The entries of a description, in order; DescriptionError for anything malformed.

    Strict on purpose: the glidein side parses the same text with a few lines of shell, so
    anything a shell could read differently (CR, tabs, doubled spaces, odd names) is refused
    here rather than published.
    """
    if len(data) > max_bytes:
        raise DescriptionError(f"description is {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DescriptionError(f"line {line}: not UTF-8 text (byte {e.start})") from None
    if not text:
        raise DescriptionError(f"line 1: empty description (expected the header {HEADER!r})")
    lines = text.split("\n")
    if lines[-1] != "":
        raise DescriptionError(f"line {len(lines)}: the last line does not end with a newline")
    lines.pop()
    if lines[0] != HEADER:
        raise DescriptionError(f"line 1: expected the header {HEADER!r}, got {_excerpt(lines[0])}")
    entries: list[FileEntry] = []
    first_seen: dict[str, int] = {}
    ca_line: int | None = None
    for number, line in enumerate(lines[1:], start=2):
        where = f"line {number}"
        if "\r" in line:
            raise DescriptionError(f"{where}: carriage return (lines end with \\n only)")
        if "\x00" in line:
            raise DescriptionError(f"{where}: NUL character")
        if not line:
            raise DescriptionError(f"{where}: blank line")
        fields = line.split(" ")
        if len(fields) != 3 or not all(fields):
            raise DescriptionError(f"{where}: expected '<algo>:<hexdigest> <kind> <name>' separated by "
                                   f"single spaces, got {_excerpt(line)}")
        spec, kind, name = fields
        algo, colon, digest = spec.partition(":")
        if not colon:
            raise DescriptionError(f"{where}: expected '<algo>:<hexdigest>', got {_excerpt(spec)}")
        if algo not in ALGORITHMS:
            raise DescriptionError(f"{where}: unknown hash algorithm {_excerpt(algo)} "
                                   f"(known: {', '.join(ALGORITHMS)})")
        if not _HEX.fullmatch(digest):
            raise DescriptionError(f"{where}: digest is not lowercase hexadecimal: {_excerpt(digest)}")
        if len(digest) != ALGORITHMS[algo]:
            raise DescriptionError(f"{where}: a {algo} digest has {ALGORITHMS[algo]} hex digits, "
                                   f"got {len(digest)}")
        if kind not in KINDS:
            raise DescriptionError(f"{where}: unknown kind {_excerpt(kind)} (known: {', '.join(KINDS)})")
        problem = _name_problem(name)
        if problem:
            raise DescriptionError(f"{where}: {problem}")
        if name in first_seen:
            raise DescriptionError(f"{where}: duplicate name {name!r} (first on line {first_seen[name]})")
        first_seen[name] = number
        if kind == "ca":
            # One bundle: the startd has one [pool] ca; two would leave the choice to chance.
            if ca_line is not None:
                raise DescriptionError(f"{where}: a second ca file (the first is on line {ca_line})")
            ca_line = number
        entries.append(FileEntry(algo=algo, digest=digest, kind=kind, name=name))
    return entries


def _store_file(store: Path, name: str, source: Path | bytes) -> str:
    """Copy ``source`` to ``store/files/<sha256>/<name>``; return the hex digest.

    Written to a temporary file and renamed, so a reader (the web server, a glidein) never sees a
    partial file under a hash name; a file already there is left alone (same hash, same bytes).
    """
    files = store / "files"
    files.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".publish-", dir=files)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            if isinstance(source, bytes):
                digest.update(source)
                out.write(source)
            else:
                with open(source, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        hexdigest = digest.hexdigest()
        target = files / hexdigest / name
        if target.exists():
            tmp.unlink()
            return hexdigest
        target.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the web server may run as another user
        os.replace(tmp, target)
        return hexdigest
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".publish-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def publish(store: Path, files: Sequence[tuple[str, str, Path | bytes]]) -> str:
    """Put ``(kind, name, source)`` files into ``store`` and write their description, in the
    order given (the order validation scripts run in); return the description's SHA-256.

    The same files in the same order give the same hash, so re-publishing an unchanged
    entry changes nothing a cache holds.
    """
    store = Path(store)
    seen: set[str] = set()
    for number, (kind, name, _source) in enumerate(files, start=1):
        if kind not in KINDS:
            raise DescriptionError(f"file {number}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        problem = _name_problem(name)
        if problem:
            raise DescriptionError(f"file {number}: {problem}")
        if name in seen:
            raise DescriptionError(f"file {number}: duplicate name {name!r}")
        seen.add(name)
    lines = [HEADER]
    for kind, name, source in files:
        lines.append(f"sha256:{_store_file(store, name, source)} {kind} {name}")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    parse_description(data)  # what we serve must be what a glidein accepts (one ca, ...)
    description_hash = hashlib.sha256(data).hexdigest()
    target = store / "descriptions" / description_hash
    if not target.exists():
        _write_atomically(target, data)
    return description_hash


def startup_script() -> Path:
    """The ``glidein_startup.sh`` shipped with this package."""
    return Path(__file__).resolve().with_name("glidein_startup.sh")


def stock_validation_scripts() -> list[Path]:
    """The stock validation scripts (``gwms/glidein/validate/*.sh``), sorted by name: the
    order they should run in."""
    return sorted((Path(__file__).resolve().parent / "validate").glob("*.sh"), key=lambda p: p.name)


class GlideinFilesResource(resource.Resource):
    """Serves GET and HEAD of ``descriptions/<sha256>`` and ``files/<hexdigest>/<name>`` from a
    store, and 404 for anything else.

    Only those two shapes are looked up, each path component is checked before it touches the
    file system, and every component is opened relative to the one before with O_NOFOLLOW: a
    ``..``, an encoded slash or a symbolic link planted in the store cannot reach a file outside
    it, and nothing lists a directory.
    """

    isLeaf = True

    def __init__(self, store: Path) -> None:
        super().__init__()
        self.store = Path(store)

    def render(self, request: server.Request) -> Any:
        # Answered here rather than by Resource.render, whose 405 page Twisted has deprecated.
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"method not allowed\n"
        return super().render(request)

    def _open(self, segments: list[bytes]) -> BinaryIO | None:
        try:
            parts = [s.decode("ascii") for s in segments]
        except UnicodeDecodeError:
            return None
        if len(parts) == 2 and parts[0] == "descriptions" and _SHA256.fullmatch(parts[1]):
            path = ["descriptions", parts[1]]
        elif (len(parts) == 3 and parts[0] == "files" and _HEX.fullmatch(parts[1])
              and len(parts[1]) in ALGORITHMS.values() and _name_problem(parts[2]) is None):
            path = ["files", parts[1], parts[2]]
        else:
            return None
        fds: list[int] = []
        try:
            # The store itself may be a symlink (the operator's choice); nothing below it may.
            fds.append(os.open(self.store, os.O_RDONLY | os.O_DIRECTORY))
            for directory in path[:-1]:
                fds.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
            # O_NONBLOCK: opening a FIFO someone left there must not hang the reactor.
            fd = os.open(path[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1])
        except OSError:
            return None
        finally:
            for d in fds:
                os.close(d)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def _start(self, request: server.Request) -> BinaryIO | None:
        f = self._open(list(request.postpath))
        if f is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return None
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Cache-Control", CACHE_CONTROL)
        request.setHeader(b"Content-Length", b"%d" % os.fstat(f.fileno()).st_size)
        return f

    def render_HEAD(self, request: server.Request) -> bytes:
        f = self._start(request)
        if f is not None:
            f.close()
        return b""

    def render_GET(self, request: server.Request) -> Any:
        f = self._start(request)
        if f is None:
            return b"not found\n"
        _FileProducer(f, request).start()
        return server.NOT_DONE_YET


@implementer(IPushProducer)
class _FileProducer:
    """Writes a file into a request as fast as the connection takes it.

    Wheels are megabytes, so the file is streamed rather than loaded. It is a push producer
    because twisted.web drives a pull producer (FileSender) with the global cooperator, which
    would tie this resource to the global reactor and keep it out of in-memory tests.
    """

    def __init__(self, f: BinaryIO, request: server.Request) -> None:
        self.file: BinaryIO | None = f
        self.request = request
        self.paused = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self._produce()

    def _produce(self) -> None:
        # request.write pauses us (synchronously) once the transport's buffer is full.
        while not self.paused and self.file is not None:
            chunk = self.file.read(_CHUNK)
            if not chunk:
                self._close()
                self.request.unregisterProducer()
                self.request.finish()
                return
            self.request.write(chunk)

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        self._close()  # the client went away
