"""Credentials sealed for a factory's key: only it opens them, and tampering is caught."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gwms.credentials.sealed import MAX_SEALED, SealError, seal, unseal


@pytest.fixture(scope="module")
def keys():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def test_a_sealed_payload_opens_with_the_private_key_only(keys):
    private, public = keys
    payload = {"identity": "/O=gwms/OU=Hosts/CN=frontend", "credential": "-----BEGIN CERTIFICATE-----\n..."}
    sealed = seal(public, payload)
    assert "frontend" not in base64.b64decode(sealed).decode()  # nothing readable on the way
    assert unseal(private, sealed) == payload
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(SealError) as e:
        unseal(other, sealed)
    assert "it was not sealed for this factory's key, or it was changed" in str(e.value)


def test_a_changed_byte_anywhere_is_refused(keys):
    private, public = keys
    envelope = json.loads(base64.b64decode(seal(public, {"identity": "x", "credential": "y"})))
    body = bytearray(base64.b64decode(envelope["body"]))
    body[0] ^= 1
    envelope["body"] = base64.b64encode(bytes(body)).decode()
    with pytest.raises(SealError) as e:
        unseal(private, base64.b64encode(json.dumps(envelope).encode()).decode())
    assert "cannot open the sealed credential (InvalidTag" in str(e.value)


@pytest.mark.parametrize("sealed, message", [
    (42, "a sealed credential is text, not int"),
    ("x" * (MAX_SEALED + 1), f"more than {MAX_SEALED}"),
    ("not base64!", "cannot open the sealed credential"),
    (base64.b64encode(b'{"v": "other"}').decode(), "not a gwms-sealed-1 envelope"),
    (base64.b64encode(b"[1, 2]").decode(), "not a gwms-sealed-1 envelope"),
])
def test_malformed_sealed_credentials_say_what_is_wrong(keys, sealed, message):
    with pytest.raises(SealError) as e:
        unseal(keys[0], sealed)
    assert message in str(e.value)


def test_sealing_needs_an_rsa_public_key():
    with pytest.raises(SealError) as e:
        seal("not a key", {})
    assert "not a PEM public key" in str(e.value)
