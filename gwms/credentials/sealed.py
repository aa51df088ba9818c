"""Credentials sealed for one recipient: how a frontend hands its pilot credential to a factory.

The frontend encrypts for the public key the factory advertises in its entry ads (hybrid:
RSA-OAEP with SHA-256 wraps a fresh AES-256-GCM key; the GCM tag authenticates the content),
and puts the result in its request ad. The collector and anyone reading ads see only
ciphertext; only the factory can open it. The payload names the identity of the frontend that
sealed it, and the factory uses the credential only if that identity is the one the collector
authenticated for the request ad: a credential copied into somebody else's request is refused.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = "gwms-sealed-1"
MAX_SEALED = 256 * 1024  # a proxy chain or a token is a few KiB; refuse anything huge before decoding

_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class SealError(ValueError):
    """A sealed credential that cannot be opened or is malformed; the message says which."""


def seal(public_key_pem: str, payload: dict[str, Any]) -> str:
    """``payload`` (JSON-able) encrypted for the holder of ``public_key_pem``; ASCII text."""
    try:
        public = serialization.load_pem_public_key(public_key_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise SealError(f"not a PEM public key: {e}") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise SealError("the recipient's key is not an RSA key")
    key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    body = AESGCM(key).encrypt(nonce, json.dumps(payload, sort_keys=True).encode("utf-8"), VERSION.encode())
    envelope = {"v": VERSION, "key": _b64(public.encrypt(key, _OAEP)), "nonce": _b64(nonce), "body": _b64(body)}
    return base64.b64encode(json.dumps(envelope, sort_keys=True).encode("ascii")).decode("ascii")


def unseal(private_key: rsa.RSAPrivateKey, sealed: object) -> dict[str, Any]:
    """The payload of ``sealed``; SealError says what is wrong (nothing else is raised)."""
    if not isinstance(sealed, str):
        raise SealError(f"a sealed credential is text, not {type(sealed).__name__}")
    if len(sealed) > MAX_SEALED:
        raise SealError(f"sealed credential of {len(sealed)} bytes, more than {MAX_SEALED}")
    try:
        envelope = json.loads(base64.b64decode(sealed, validate=True))
        if not isinstance(envelope, dict) or envelope.get("v") != VERSION:
            raise SealError(f"not a {VERSION} envelope")
        key = private_key.decrypt(base64.b64decode(envelope["key"], validate=True), _OAEP)
        plain = AESGCM(key).decrypt(base64.b64decode(envelope["nonce"], validate=True),
                                    base64.b64decode(envelope["body"], validate=True), VERSION.encode())
        payload = json.loads(plain)
    except SealError:
        raise
    except Exception as e:  # bad base64, JSON, padding, a tag that does not verify: all the same to the caller
        raise SealError(f"cannot open the sealed credential ({type(e).__name__}: it was not sealed for this "
                        "factory's key, or it was changed)") from None
    if not isinstance(payload, dict):
        raise SealError("the sealed payload is not an object")
    return payload


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
