"""The glidein file store: publishing, the description format, and the web resource (in memory)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq

from gwms.glidein.files import (
    CACHE_CONTROL,
    DescriptionError,
    FileEntry,
    GlideinFilesResource,
    parse_description,
    publish,
    startup_script,
    stock_validation_scripts,
)

HEADER = b"# gwms glidein description 1\n"
A64 = "a" * 64
B40 = "b" * 40


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------
# publish


def test_publish_stores_every_file_under_its_hash_and_returns_the_description_hash(tmp_path: Path) -> None:
    script = tmp_path / "check.sh"
    script.write_bytes(b"exit 0\n")
    store = tmp_path / "store"
    check, attrs = sha256(b"exit 0\n"), sha256(b"GLIDEIN_Site=X\n")

    descript = publish(store, [("validate", "check.sh", script), ("attrs", "entry.attrs", b"GLIDEIN_Site=X\n")])

    description = (store / "descriptions" / descript).read_bytes()
    assert sha256(description) == descript
    assert description == HEADER + f"sha256:{check} validate check.sh\nsha256:{attrs} attrs entry.attrs\n".encode()
    assert (store / "files" / check / "check.sh").read_bytes() == b"exit 0\n"
    assert (store / "files" / attrs / "entry.attrs").read_bytes() == b"GLIDEIN_Site=X\n"
    # Readable by a web server running as another user; no temporary files left behind.
    assert stat.S_IMODE((store / "files" / check / "check.sh").stat().st_mode) == 0o644
    assert sorted(p.name for p in (store / "files").iterdir()) == sorted([check, attrs])
    assert parse_description(description) == [
        FileEntry("sha256", check, "validate", "check.sh"),
        FileEntry("sha256", attrs, "attrs", "entry.attrs"),
    ]


def test_publish_is_deterministic_and_leaves_existing_files_alone(tmp_path: Path) -> None:
    store = tmp_path / "store"
    files = [("file", "a.txt", b"A"), ("validate", "v.sh", b"exit 0\n")]
    first = publish(store, files)
    stored = store / "files" / sha256(b"A") / "a.txt"
    before = stored.stat()

    assert publish(store, files) == first
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # Order is part of the description (validation scripts run in it): another order, another hash.
    assert publish(store, list(reversed(files))) != first
    assert len(list((store / "descriptions").iterdir())) == 2


def test_publish_refuses_what_a_description_cannot_hold(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(DescriptionError) as e:
        publish(store, [("file", "ok", b""), ("binary", "x", b"")])
    assert str(e.value) == "file 2: unknown kind 'binary' (known: validate, wheel, ca, attrs, file)"
    with pytest.raises(DescriptionError) as e:
        publish(store, [("file", "../etc/passwd", b"")])
    assert str(e.value) == ("file 1: bad name '../etc/passwd' (letters, digits, '.', '_', '+' and '-' only; "
                            "no '/', not starting with '.')")
    with pytest.raises(DescriptionError) as e:
        publish(store, [("file", "a", b"1"), ("validate", "a", b"2")])
    assert str(e.value) == "file 2: duplicate name 'a'"
    with pytest.raises(DescriptionError) as e:
        publish(store, [("ca", "ca1.pem", b"1"), ("ca", "ca2.pem", b"2")])
    assert str(e.value) == "line 3: a second ca file (the first is on line 2)"
    assert not (store / "descriptions").exists()


def test_the_package_ships_the_startup_script_and_the_stock_validation_scripts() -> None:
    assert startup_script().name == "glidein_startup.sh"
    assert startup_script().read_text().startswith("#!/bin/sh\n")
    assert [p.name for p in stock_validation_scripts()] == ["10-disk.sh", "20-cpu-memory.sh", "30-python.sh"]
    assert all(p.read_text().startswith("#!/bin/sh\n") for p in stock_validation_scripts())


# ------------------------------------------------------------------------------------------
# parse_description


def test_a_description_with_both_algorithms_parses_in_order() -> None:
    data = HEADER + f"sha256:{A64} wheel gwms-0.1.0-py3-none-any.whl\nsha1:{B40} file x+y_z-1.tar.gz\n".encode()
    assert parse_description(data) == [
        FileEntry("sha256", A64, "wheel", "gwms-0.1.0-py3-none-any.whl"),
        FileEntry("sha1", B40, "file", "x+y_z-1.tar.gz"),
    ]
    assert parse_description(HEADER) == []


@pytest.mark.parametrize("data, message", [
    (b"", "line 1: empty description (expected the header '# gwms glidein description 1')"),
    (b"# gwms glidein description 2\n", ("line 1: expected the header '# gwms glidein description 1', "
                                        "got '# gwms glidein description 2'")),
    (HEADER + f"sha256:{A64} file a".encode(), "line 2: the last line does not end with a newline"),
    (HEADER + f"sha256:{A64} file a\r\n".encode(), "line 2: carriage return (lines end with \\n only)"),
    (b"# gwms glidein description 1\r\n", ("line 1: expected the header '# gwms glidein description 1', "
                                          "got '# gwms glidein description 1\\r'")),
    (HEADER + f"sha256:{A64} file a\x00b\n".encode(), "line 2: NUL character"),
    (HEADER + b"\n", "line 2: blank line"),
    (HEADER + f"sha256:{A64} file a\n".encode() + b"sha256:\xff\xfe file b\n", "line 3: not UTF-8 text (byte 115)"),
    (HEADER + f"sha256:{A64}  file a\n".encode(), ("line 2: expected '<algo>:<hexdigest> <kind> <name>' separated "
                                                  f"by single spaces, got 'sha256:{A64}  file a'")),
    (HEADER + f"sha256:{A64}\tfile a\n".encode(), ("line 2: expected '<algo>:<hexdigest> <kind> <name>' separated "
                                                  f"by single spaces, got 'sha256:{A64}\\tfile a'")),
    (HEADER + f"sha256:{A64} file a \n".encode(), ("line 2: expected '<algo>:<hexdigest> <kind> <name>' separated "
                                                  f"by single spaces, got 'sha256:{A64} file a '")),
    (HEADER + f"{A64} file a\n".encode(), f"line 2: expected '<algo>:<hexdigest>', got '{A64}'"),
    (HEADER + f"md5:{A64[:32]} file a\n".encode(), "line 2: unknown hash algorithm 'md5' (known: sha256, sha1)"),
    (HEADER + f"sha256:{A64[:63]} file a\n".encode(), "line 2: a sha256 digest has 64 hex digits, got 63"),
    (HEADER + f"sha1:{A64} file a\n".encode(), "line 2: a sha1 digest has 40 hex digits, got 64"),
    (HEADER + f"sha256:{'g' * 64} file a\n".encode(), f"line 2: digest is not lowercase hexadecimal: '{'g' * 64}'"),
    (HEADER + f"sha256:{'A' * 64} file a\n".encode(), f"line 2: digest is not lowercase hexadecimal: '{'A' * 64}'"),
    (HEADER + f"sha256:{A64} binary a\n".encode(), ("line 2: unknown kind 'binary' "
                                                   "(known: validate, wheel, ca, attrs, file)")),
    (HEADER + f"sha256:{A64} file ../x\n".encode(), ("line 2: bad name '../x' (letters, digits, '.', '_', '+' and '-' "
                                                    "only; no '/', not starting with '.')")),
    (HEADER + f"sha256:{A64} file a/b\n".encode(), ("line 2: bad name 'a/b' (letters, digits, '.', '_', '+' and '-' "
                                                   "only; no '/', not starting with '.')")),
    (HEADER + f"sha256:{A64} file /etc/passwd\n".encode(), ("line 2: bad name '/etc/passwd' (letters, digits, '.', "
                                                           "'_', '+' and '-' only; no '/', not starting with '.')")),
    (HEADER + f"sha256:{A64} file ..\n".encode(), ("line 2: bad name '..' (letters, digits, '.', '_', '+' and '-' "
                                                  "only; no '/', not starting with '.')")),
    (HEADER + f"sha256:{A64} file .bashrc\n".encode(), ("line 2: bad name '.bashrc' (letters, digits, '.', '_', '+' "
                                                       "and '-' only; no '/', not starting with '.')")),
    (HEADER + f"sha256:{A64} file $(reboot)\n".encode(), ("line 2: bad name '$(reboot)' (letters, digits, '.', '_', "
                                                         "'+' and '-' only; no '/', not starting with '.')")),
    (HEADER + f"sha256:{A64} file caf\u00e9\n".encode(), ("line 2: bad name 'caf\u00e9' (letters, digits, '.', '_', "
                                                         "'+' and '-' only; no '/', not starting with '.')")),
    (HEADER + f"sha256:{A64} file {'n' * 201}\n".encode(), "line 2: name is 201 characters long (at most 200)"),
    (HEADER + f"sha256:{A64} file a\nsha1:{B40} validate a\n".encode(), "line 3: duplicate name 'a' (first on line 2)"),
    (HEADER + f"sha256:{A64} ca a\nsha1:{B40} ca b\n".encode(), "line 3: a second ca file (the first is on line 2)"),
])
def test_malformed_descriptions_are_refused_naming_the_line(data: bytes, message: str) -> None:
    with pytest.raises(DescriptionError) as e:
        parse_description(data)
    assert str(e.value) == message


def test_a_name_of_200_characters_is_the_longest_allowed() -> None:
    assert parse_description(HEADER + f"sha256:{A64} file {'n' * 200}\n".encode())[0].name == "n" * 200


def test_an_oversized_description_is_refused_before_it_is_read() -> None:
    line = f"sha256:{A64} file a\n".encode()
    with pytest.raises(DescriptionError) as e:
        parse_description(HEADER + line * 40_000)
    assert str(e.value) == f"description is {len(HEADER) + len(line) * 40_000} bytes, more than the limit of 1048576"
    with pytest.raises(DescriptionError) as e:
        parse_description(HEADER + line, max_bytes=len(HEADER))
    assert str(e.value) == f"description is {len(HEADER) + len(line)} bytes, more than the limit of {len(HEADER)}"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_entries_or_a_description_error(data: bytes) -> None:
    try:
        entries = parse_description(HEADER + data)
    except DescriptionError as e:
        assert str(e).startswith(("line ", "description is "))
    else:
        assert all("/" not in e.name and not e.name.startswith(".") for e in entries)


_names = st.from_regex(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,30}", fullmatch=True)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["validate", "wheel", "attrs", "file"]), _names, st.binary(max_size=64)),
                max_size=6, unique_by=lambda f: f[1]))
def test_what_publish_writes_parses_back(tmp_path_factory: pytest.TempPathFactory,
                                         files: list[tuple[str, str, bytes]]) -> None:
    store = tmp_path_factory.mktemp("store")
    descript = publish(store, files)
    entries = parse_description((store / "descriptions" / descript).read_bytes())
    assert [(e.kind, e.name, e.digest) for e in entries] == [(k, n, sha256(d)) for k, n, d in files]
    assert all((store / "files" / e.digest / e.name).read_bytes() == d for e, (_, _, d) in zip(entries, files))


# ------------------------------------------------------------------------------------------
# GlideinFilesResource


class Web:
    """A StubTreq over a store: requests answered in memory."""

    def __init__(self, store: Path) -> None:
        self.treq = StubTreq(GlideinFilesResource(store))

    def request(self, method: str, path: str) -> tuple[int, Any, bytes]:
        code, headers, body, _ = self.request_with_length(method, path)
        return code, headers, body

    def request_with_length(self, method: str, path: str) -> tuple[int, Any, bytes, Any]:
        """Also the response's announced length (twisted's client takes Content-Length out of
        the headers)."""
        responses: list[Any] = []
        self.treq.request(method, "http://factory.example/" + path).addBoth(responses.append)
        self.treq.flush()
        (response,) = responses
        bodies: list[Any] = []
        self.treq.content(response).addBoth(bodies.append)
        self.treq.flush()
        (body,) = bodies
        assert isinstance(body, bytes), body
        return response.code, response.headers, body, response.length


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, str, bytes, str]:
    store = tmp_path / "store"
    big = os.urandom(300_000)  # more than one chunk of the producer
    descript = publish(store, [("wheel", "big.whl", big), ("file", "small.txt", b"small\n")])
    return store, descript, big, sha256(big)


def test_get_serves_descriptions_and_files_as_immutable_octet_streams(published: tuple[Path, str, bytes, str]) -> None:
    store, descript, big, digest = published
    web = Web(store)

    code, headers, body = web.request("GET", f"descriptions/{descript}")
    assert (code, body) == (200, (store / "descriptions" / descript).read_bytes())
    assert headers.getRawHeaders("Cache-Control") == [CACHE_CONTROL.decode()]
    assert headers.getRawHeaders("Content-Type") == ["application/octet-stream"]

    code, headers, body, length = web.request_with_length("GET", f"files/{digest}/big.whl")
    assert (code, body, length) == (200, big, len(big))  # a Content-Length, not chunks: curl can tell a cut
    assert headers.getRawHeaders("Cache-Control") == ["public, max-age=31536000, immutable"]
    assert headers.getRawHeaders("Content-Type") == ["application/octet-stream"]


def test_head_gives_the_headers_and_length_without_a_body(published: tuple[Path, str, bytes, str]) -> None:
    store, _, big, digest = published
    code, headers, body = Web(store).request("HEAD", f"files/{digest}/big.whl")
    assert (code, body) == (200, b"")
    assert headers.getRawHeaders("Content-Length") == [str(len(big))]
    assert headers.getRawHeaders("Cache-Control") == [CACHE_CONTROL.decode()]
    code, _, body = Web(store).request("HEAD", f"files/{digest}/missing.whl")
    assert (code, body) == (404, b"")


def test_a_sha1_path_is_served_too(tmp_path: Path) -> None:
    digest = hashlib.sha1(b"old\n").hexdigest()
    (tmp_path / "files" / digest).mkdir(parents=True)
    (tmp_path / "files" / digest / "old.txt").write_bytes(b"old\n")
    assert Web(tmp_path).request("GET", f"files/{digest}/old.txt")[::2] == (200, b"old\n")


def test_anything_but_the_two_shapes_is_not_found(published: tuple[Path, str, bytes, str]) -> None:
    store, descript, _, digest = published
    web = Web(store)
    for path in ["", "descriptions", "descriptions/", "files", "files/", f"files/{digest}", f"files/{digest}/",
                 f"descriptions/{descript[:-1]}", f"descriptions/{descript.upper()}", f"descriptions/{descript}/x",
                 f"descriptions/{'0' * 64}", f"files/{digest}/missing.whl", f"files/{digest}/big.whl/x",
                 f"files/{digest[:-1]}/big.whl", f"files/{digest.upper()}/big.whl", f"other/{digest}/big.whl",
                 f"files/{digest}/.", f"files/{digest}/..", f"files/{digest}/../{digest}/big.whl",
                 f"files/{digest}/%2e%2e%2f%2e%2e%2fdescriptions%2f{descript}",
                 f"files%2F{digest}%2Fbig.whl", f"files/{digest}%2Fbig.whl", f"descriptions%2F{descript}",
                 f"files/{digest}/big.whl%00", f"files/{digest}/%ff"]:
        code, headers, body = web.request("GET", path)
        assert (path, code, body) == (path, 404, b"not found\n")
        assert headers.getRawHeaders("Cache-Control") is None  # a 404 must not be cached for a year


def test_symlinks_fifos_and_directories_in_the_store_are_not_followed(published: tuple[Path, str, bytes, str],
                                                                      tmp_path: Path) -> None:
    store, _, _, digest = published
    secret = tmp_path / "secret"
    secret.write_bytes(b"private key\n")
    (store / "files" / digest / "link.whl").symlink_to(secret)
    outside = tmp_path / "outside"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "a.whl").write_bytes(b"outside\n")
    (store / "files" / ("c" * 64)).symlink_to(outside / "x")
    (store / "files" / ("d" * 64)).mkdir()
    (store / "files" / ("d" * 64) / "dir.whl").mkdir()
    os.mkfifo(store / "files" / digest / "fifo.whl")
    (store / "files" / digest / "dirlink.whl").symlink_to(store / "files" / digest)
    web = Web(store)
    for path in [f"files/{digest}/link.whl", f"files/{'c' * 64}/a.whl", f"files/{'d' * 64}/dir.whl",
                 f"files/{digest}/fifo.whl", f"files/{digest}/dirlink.whl"]:
        assert web.request("GET", path)[::2] == (404, b"not found\n"), path


def test_a_store_that_is_itself_a_symlink_is_served(published: tuple[Path, str, bytes, str], tmp_path: Path) -> None:
    store, descript, _, _ = published
    (tmp_path / "current").symlink_to(store)  # how an operator switches stores
    assert Web(tmp_path / "current").request("GET", f"descriptions/{descript}")[0] == 200


def test_other_methods_are_not_allowed(published: tuple[Path, str, bytes, str]) -> None:
    store, descript, _, _ = published
    for method in ("POST", "PUT", "DELETE"):
        code, headers, body = Web(store).request(method, f"descriptions/{descript}")
        assert (code, body) == (405, b"method not allowed\n")
        assert headers.getRawHeaders("Allow") == ["GET, HEAD"]
