"""Pool-signed HS256 tokens: round trip, every refusal, and no crash on arbitrary input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwms.credentials.tokens import (
    MAX_TOKEN_LENGTH,
    TokenClaims,
    TokenError,
    create_token,
    decode_token_unverified,
    generate_signing_key,
    load_signing_key,
    verify_token,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
KEYS = {"POOL": KEY}
NOW = 1_700_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, key: bytes = KEY) -> str:
    """A token built by hand, to present headers and claims create_token would never write."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


def good_claims(**over: object) -> dict:
    claims = {"sub": "alice@pool", "iss": "gwms", "iat": int(NOW), "exp": int(NOW) + 3600,
              "scope": "condor:/READ", "jti": "abc"}
    claims.update(over)
    return claims


HEADER = {"alg": "HS256", "typ": "JWT", "kid": "POOL"}


def test_round_trip() -> None:
    token = create_token(KEY, "alice@pool", "gwms", ["READ", "ADVERTISE_STARTD"], 3600, now=NOW)
    header, claims = decode_token_unverified(token)
    assert header == {"alg": "HS256", "typ": "JWT", "kid": "POOL"}
    assert claims["scope"] == "condor:/READ condor:/ADVERTISE_STARTD"
    verified = verify_token(token, KEYS, "gwms", now=NOW + 10)
    assert verified == TokenClaims(subject="alice@pool", issuer="gwms", issued_at=NOW,
                                   expires_at=NOW + 3600,
                                   scopes=frozenset({"READ", "ADVERTISE_STARTD"}),
                                   token_id=claims["jti"])
    assert len(verified.token_id) == 32
    other = create_token(KEY, "alice@pool", "gwms", ["READ"], 3600, now=NOW)
    assert decode_token_unverified(other)[1]["jti"] != claims["jti"]  # random per token


def test_scope_allows_only_listed_levels() -> None:
    claims = verify_token(create_token(KEY, "s", "gwms", ["READ", "ADVERTISE_STARTD"], 60,
                                       now=NOW), KEYS, "gwms", now=NOW)
    assert claims.allows("READ") and claims.allows("ADVERTISE_STARTD")
    assert not claims.allows("WRITE") and not claims.allows("ADMINISTRATOR")
    assert not claims.allows("read")


def test_token_without_scope_allows_nothing() -> None:
    claims = good_claims()
    del claims["scope"]
    verified = verify_token(forge(HEADER, claims), KEYS, "gwms", now=NOW)
    assert verified.scopes == frozenset() and not verified.allows("READ")


def test_foreign_scope_items_are_ignored() -> None:
    token = forge(HEADER, good_claims(scope="compute.read condor:/WRITE condor:/bad-level"))
    assert verify_token(token, KEYS, "gwms", now=NOW).scopes == frozenset({"WRITE"})


def test_expired() -> None:
    token = create_token(KEY, "s", "gwms", ["READ"], 60, now=NOW)
    with pytest.raises(TokenError, match=r"token expired at 2023-11-14 22:14:20 UTC"):
        verify_token(token, KEYS, "gwms", now=NOW + 60)
    verify_token(token, KEYS, "gwms", now=NOW + 59)


def test_not_yet_valid_beyond_leeway_only() -> None:
    token = create_token(KEY, "s", "gwms", ["READ"], 3600, now=NOW)
    verify_token(token, KEYS, "gwms", now=NOW - 59)  # within the 60 s leeway
    with pytest.raises(TokenError, match="token not yet valid"):
        verify_token(token, KEYS, "gwms", now=NOW - 61)
    with pytest.raises(TokenError, match="token not yet valid"):
        verify_token(token, KEYS, "gwms", now=NOW - 5, leeway_s=0)


def test_bad_signature() -> None:
    token = create_token(OTHER_KEY, "s", "gwms", ["READ"], 60, now=NOW)
    with pytest.raises(TokenError, match="^bad signature$"):
        verify_token(token, KEYS, "gwms", now=NOW)


def test_tampered_payload_is_a_bad_signature() -> None:
    token = create_token(KEY, "alice", "gwms", ["READ"], 60, now=NOW)
    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scope"] = "condor:/ADMINISTRATOR"
    tampered = ".".join([header, b64(json.dumps(claims).encode()), sig])
    with pytest.raises(TokenError, match="^bad signature$"):
        verify_token(tampered, KEYS, "gwms", now=NOW)


@pytest.mark.parametrize("alg", ["none", "None", "HS512", "RS256", "hs256", None])
def test_other_algorithms_are_refused(alg: object) -> None:
    header = {"alg": alg, "typ": "JWT", "kid": "POOL"}
    token = forge(header, good_claims())
    with pytest.raises(TokenError, match="^unsupported algorithm$"):
        verify_token(token, KEYS, "gwms", now=NOW)
    unsigned = token.rsplit(".", 1)[0] + "."  # the classic alg=none shape: empty signature
    with pytest.raises(TokenError, match="^unsupported algorithm$"):
        verify_token(unsigned, KEYS, "gwms", now=NOW)


def test_wrong_issuer() -> None:
    token = create_token(KEY, "s", "other-pool", ["READ"], 60, now=NOW)
    with pytest.raises(TokenError, match="^issuer 'other-pool' is not 'gwms'$"):
        verify_token(token, KEYS, "gwms", now=NOW)


def test_unknown_kid() -> None:
    token = create_token(KEY, "s", "gwms", ["READ"], 60, now=NOW, kid="SITE2")
    with pytest.raises(TokenError, match="^unknown key id 'SITE2'$"):
        verify_token(token, KEYS, "gwms", now=NOW)
    assert verify_token(token, {"SITE2": KEY}, "gwms", now=NOW).subject == "s"


def test_missing_kid_means_pool_as_in_htcondor() -> None:
    token = forge({"alg": "HS256", "typ": "JWT"}, good_claims())
    assert verify_token(token, KEYS, "gwms", now=NOW).subject == "alice@pool"


def test_oversized_token_is_refused_before_decoding() -> None:
    token = forge(HEADER, good_claims(pad="x" * MAX_TOKEN_LENGTH))
    with pytest.raises(TokenError, match="longer than 8192"):
        verify_token(token, KEYS, "gwms", now=NOW)


@pytest.mark.parametrize("token", [
    "", "a", "a.b", "a.b.c.d", "..", "!!.??.**", "W10.e30.x",
    b64(b'{"alg":"HS256","alg":"none"}') + ".e30.x",    # duplicate header key
    b64(b'{"alg":"HS256", "kid": 7}') + ".e30.x",      # kid not a string
    "eyJhbGciOiJIUzI1NiJ9" + "\u00e9" + ".e30.x",       # non-ASCII
])
def test_malformed_tokens(token: str) -> None:
    with pytest.raises(TokenError, match="malformed token"):
        verify_token(token, KEYS, "gwms", now=NOW)


@pytest.mark.parametrize("claims, what", [
    (good_claims(exp="soon"), "exp"),
    (good_claims(iat=True), "iat"),
    (good_claims(exp=10**30), "exp"),
    (good_claims(sub=""), "sub"),
    (good_claims(iss=["gwms"]), "iss"),
    (good_claims(scope=["condor:/READ"]), "scope"),
])
def test_signed_but_malformed_claims(claims: dict, what: str) -> None:
    with pytest.raises(TokenError, match=f"malformed token: claim {what}"):
        verify_token(forge(HEADER, claims), KEYS, "gwms", now=NOW)


def test_errors_never_echo_the_token_or_key() -> None:
    token = create_token(OTHER_KEY, "secret-subject", "gwms", ["READ"], 60, now=NOW)
    for keys, now in ((KEYS, NOW), ({"POOL": OTHER_KEY}, NOW + 3600), ({}, NOW)):
        with pytest.raises(TokenError) as info:
            verify_token(token, keys, "gwms", now=now)
        message = str(info.value)
        for secret in (token, *token.split("."), KEY.hex(), OTHER_KEY.hex(), "secret-subject"):
            assert secret not in message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_token_error(text: str) -> None:
    with pytest.raises(TokenError):
        verify_token(text, KEYS, "gwms", now=NOW)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(alphabet="ABCDEFabcdef0123456789-_=+/", max_size=40),
                          st.binary(max_size=60).map(b64),
                          st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                       lambda c: st.lists(c) | st.dictionaries(st.text(), c),
                                       max_leaves=8).map(lambda v: b64(json.dumps(v).encode()))),
                min_size=1, max_size=4))
def test_structured_garbage_raises_only_token_error(parts: list[str]) -> None:
    with pytest.raises(TokenError):
        verify_token(".".join(parts), KEYS, "gwms", now=NOW)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["sub", "iss", "iat", "exp", "scope", "jti", "x"]),
                       st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                       | st.text(max_size=20) | st.lists(st.integers(), max_size=2)))
def test_signed_arbitrary_claims_give_claims_or_token_error(claims: dict) -> None:
    token = forge(HEADER, claims)
    try:
        result = verify_token(token, KEYS, "gwms", now=NOW)
    except TokenError:
        return
    assert isinstance(result, TokenClaims) and result.issuer == "gwms"


@pytest.mark.parametrize("scopes", [["read"], ["condor:/READ"], ["READ WRITE"], [""], [],
                                    "READ", ["1READ"]])
def test_create_token_validates_scopes(scopes: object) -> None:
    with pytest.raises(TokenError):
        create_token(KEY, "s", "gwms", scopes, 60, now=NOW)  # type: ignore[arg-type]


def test_create_token_validates_key_and_lifetime() -> None:
    with pytest.raises(TokenError, match="at least 32"):
        create_token(b"short", "s", "gwms", ["READ"], 60)
    for lifetime in (0, -1, float("inf"), float("nan")):
        with pytest.raises(TokenError, match="lifetime"):
            create_token(KEY, "s", "gwms", ["READ"], lifetime)


def test_signing_key_file_round_trip_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "pool.key"
    generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_signing_key(path)
    assert len(key) == 32
    with pytest.raises(TokenError, match="already exists"):
        generate_signing_key(path)
    assert load_signing_key(path) == key
    generate_signing_key(path, overwrite=True)
    assert load_signing_key(path) != key


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"zz-not-hex\n", "does not hold a hex-encoded key"),
    (b"\xff\xfe\x00", "does not hold a hex-encoded key"),
    (b"00ff\n", "is 2 bytes; at least 32"),
    (b"", "is 0 bytes"),
])
def test_load_signing_key_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "k"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenError, match=message):
        load_signing_key(path)
