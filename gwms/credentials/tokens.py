"""Pool-signed bearer tokens, in the shape of HTCondor IDTOKENS.

A glidein or a daemon without an X.509 certificate authenticates with a token the pool signed:
an HS256 JWT with ``sub``, ``iss``, ``iat``, ``exp``, ``scope`` (``condor:/READ ...``) and ``jti``,
keyed by ``kid`` (``POOL`` by default, as in HTCondor). Tokens are only ever presented over
server-authenticated TLS; this module makes and checks them.

JWT is done by hand (a few lines of stdlib) on purpose: a general JWT library accepts many
algorithms and header tricks that we would then have to switch off; here only HS256 exists, the
signature is checked in constant time before the claims are even parsed, and no error message
ever contains the token or the key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from gwms.credentials.x509 import CredentialError, read_credential_file, write_private_file

__all__ = [
    "TokenError",
    "TokenClaims",
    "MAX_TOKEN_LENGTH",
    "MIN_KEY_BYTES",
    "SCOPE_PREFIX",
    "generate_signing_key",
    "load_signing_key",
    "create_token",
    "verify_token",
    "decode_token_unverified",
]

MAX_TOKEN_LENGTH = 8192
MIN_KEY_BYTES = 32
SCOPE_PREFIX = "condor:/"
_LEVEL = re.compile(r"[A-Z][A-Z0-9_]*\Z")
_B64URL = re.compile(r"[A-Za-z0-9_-]*\Z")
_MAX_TIME = 2**40  # year ~36800: anything above is garbage, and keeps datetime conversion safe


class TokenError(Exception):
    """A token (or signing key) that is refused; the message says why, never what it held."""


@dataclass(frozen=True)
class TokenClaims:
    """The verified claims of a token.

    A token without a ``scope`` claim allows nothing here (HTCondor would treat it as
    unrestricted): a bearer secret that grants everything should be impossible to make by
    omission.
    """

    subject: str
    issuer: str
    issued_at: float
    expires_at: float
    scopes: frozenset[str]
    token_id: str

    def allows(self, level: str) -> bool:
        """True if the token's scope includes authorization level ``level`` (e.g. "READ")."""
        return level in self.scopes


# --------------------------------------------------------------------------------------------
# Signing keys

def generate_signing_key(path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write 32 random bytes, hex-encoded, to ``path`` with mode 0600 (atomically).

    Refuses to replace an existing key unless ``overwrite``: a new pool key silently invalidates
    every token already handed out.
    """
    try:
        write_private_file(path, secrets.token_bytes(MIN_KEY_BYTES).hex().encode() + b"\n",
                           overwrite=overwrite)
    except CredentialError as e:
        raise TokenError(str(e)) from None


def load_signing_key(path: str | os.PathLike[str]) -> bytes:
    """Read a hex-encoded signing key; clear errors for missing, short or garbage files."""
    name = os.fspath(path)
    raw = read_credential_file(path, "signing key", TokenError, max_bytes=4096)
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise TokenError(f"signing key file {name} does not hold a hex-encoded key") from None
    if len(key) < MIN_KEY_BYTES:
        raise TokenError(f"signing key in {name} is {len(key)} bytes; "
                         f"at least {MIN_KEY_BYTES} are needed")
    return key


# --------------------------------------------------------------------------------------------
# Encoding

def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise TokenError("malformed token")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed token") from None
    if _b64encode(data) != text:  # non-canonical trailing bits: one token, one encoding
        raise TokenError("malformed token")
    return data


def _reject_constant(_: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for k, v in pairs:
        if k in result:
            raise ValueError("duplicate key")
        result[k] = v
    return result


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant,
                           object_pairs_hook=_unique_object)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TokenError("malformed token") from None
    if not isinstance(value, dict):
        raise TokenError("malformed token")
    return value


def _split(token: str) -> tuple[str, str, str, dict[str, Any]]:
    """Bound, split and decode the header; returns (header b64, payload b64, sig b64, header)."""
    if not isinstance(token, str):
        raise TokenError("malformed token")
    token = token.strip()
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError(f"malformed token: longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise TokenError("malformed token")
    return parts[0], parts[1], parts[2], _json_object(_b64decode(parts[0]))


def _sign(key: bytes, signing_input: str) -> bytes:
    return hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()


def _check_level(level: str) -> str:
    if not isinstance(level, str) or not _LEVEL.match(level):
        raise TokenError(f"scope {level!r} is not an authorization level name "
                         "(upper-case letters, digits and '_', e.g. READ)")
    return level


def create_token(key: bytes, subject: str, issuer: str, scopes: Sequence[str],
                 lifetime_s: float, now: float | None = None, kid: str = "POOL") -> str:
    """Sign a token for ``subject`` allowing the authorization levels ``scopes``.

    Every token carries an explicit scope and expiry: a bearer secret should grant only what it
    was made for, and only for a while.
    """
    if len(key) < MIN_KEY_BYTES:
        raise TokenError(f"signing key is {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    if not isinstance(subject, str) or not subject or not isinstance(issuer, str) or not issuer:
        raise TokenError("token subject and issuer must be non-empty strings")
    if isinstance(scopes, str):
        raise TokenError("scopes must be a list of level names, not one string")
    levels = [_check_level(s) for s in scopes]
    if not levels:
        raise TokenError("a token needs at least one scope")
    if not (isinstance(lifetime_s, (int, float)) and math.isfinite(lifetime_s)
            and lifetime_s > 0):
        raise TokenError(f"token lifetime must be a positive number of seconds, not {lifetime_s}")
    if not kid or not isinstance(kid, str):
        raise TokenError("key id must be a non-empty string")
    iat = int(time.time() if now is None else now)
    exp = int(math.ceil(iat + lifetime_s))
    if exp >= _MAX_TIME:
        raise TokenError("token lifetime is too long")
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    claims = {
        "sub": subject,
        "iss": issuer,
        "iat": iat,
        "exp": exp,
        "scope": " ".join(SCOPE_PREFIX + level for level in dict.fromkeys(levels)),
        "jti": secrets.token_hex(16),
    }
    signing_input = (_b64encode(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64encode(json.dumps(claims, separators=(",", ":")).encode()))
    token = signing_input + "." + _b64encode(_sign(key, signing_input))
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError(f"token would be longer than {MAX_TOKEN_LENGTH} characters")
    return token


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenError(f"malformed token: claim {name} is missing or not a number")
    if not 0 <= value < _MAX_TIME:
        raise TokenError(f"malformed token: claim {name} is out of range")
    return float(value)


def _string(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise TokenError(f"malformed token: claim {name} is missing or not a string")
    return value


def _claims(payload: Mapping[str, Any]) -> TokenClaims:
    scope = payload.get("scope", "")
    if not isinstance(scope, str):
        raise TokenError("malformed token: claim scope is not a string")
    levels = frozenset(item[len(SCOPE_PREFIX):] for item in scope.split()
                       if item.startswith(SCOPE_PREFIX) and _LEVEL.match(item[len(SCOPE_PREFIX):]))
    jti = payload.get("jti", "")
    if not isinstance(jti, str):
        raise TokenError("malformed token: claim jti is not a string")
    return TokenClaims(
        subject=_string(payload, "sub"),
        issuer=_string(payload, "iss"),
        issued_at=_number(payload, "iat"),
        expires_at=_number(payload, "exp"),
        scopes=levels,
        token_id=jti,
    )


def _show(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 66 else text[:63] + "...'"


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def verify_token(token: str, keys: Mapping[str, bytes], issuer: str, now: float | None = None,
                 leeway_s: float = 60.0) -> TokenClaims:
    """Check a token's signature, issuer and lifetime; return its claims or raise TokenError.

    Order matters: size bound first (no unbounded decoding), then the header (HS256 only; the
    "none" and RSA/HMAC confusion tricks are refused by name), then the signature in constant
    time, and only then the claims. ``leeway_s`` tolerates a token issued by a host whose clock
    is a little ahead; expiry gets no leeway, so a token's lifetime is never extended.
    """
    header_b64, payload_b64, sig_b64, header = _split(token)
    if header.get("alg") != "HS256":
        raise TokenError("unsupported algorithm")
    kid = header.get("kid", "POOL")  # HTCondor's default key name when the header has none
    if not isinstance(kid, str):
        raise TokenError("malformed token: kid is not a string")
    key = keys.get(kid)
    if key is None:
        raise TokenError(f"unknown key id {_show(kid)}")
    signature = _b64decode(sig_b64)
    expected = _sign(key, header_b64 + "." + payload_b64)
    if not hmac.compare_digest(signature, expected):
        raise TokenError("bad signature")
    claims = _claims(_json_object(_b64decode(payload_b64)))
    now = time.time() if now is None else now
    if now >= claims.expires_at:
        raise TokenError(f"token expired at {_iso(claims.expires_at)}")
    if claims.issued_at > now + leeway_s:
        raise TokenError(f"token not yet valid (issued at {_iso(claims.issued_at)})")
    if claims.issuer != issuer:
        raise TokenError(f"issuer {_show(claims.issuer)} is not {_show(issuer)}")
    return claims


def decode_token_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode (header, claims) WITHOUT checking anything: for display only, never for trust."""
    _, payload_b64, _, header = _split(token)
    return header, _json_object(_b64decode(payload_b64))
