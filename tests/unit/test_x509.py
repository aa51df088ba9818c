"""Certificates and RFC 3820 proxies: creation, files, and every refusal of verify_chain."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from gwms.credentials import ca
from gwms.credentials.x509 import (
    PROXY_CERT_INFO_OID,
    ChainInfo,
    Credential,
    CredentialError,
    PrivateKey,
    chain_info_from_verified,
    create_proxy,
    dn_string,
    is_limited_proxy,
    is_proxy,
    load_certificates,
    load_credential,
    verify_chain,
    write_credential,
)

UTC = dt.timezone.utc
# DER of ProxyCertInfo ::= SEQUENCE { ProxyPolicy SEQUENCE { id-ppl-inheritAll } }, by hand.
INHERIT_ALL_DER = bytes.fromhex("300c300a06082b06010505071501")
# ... and with the Globus limited-proxy policy language 1.3.6.1.4.1.3536.1.1.1.9.
LIMITED_DER = bytes.fromhex("300f300d060b2b060104019b5001010109")


# --------------------------------------------------------------------------------------------
# helpers

def small_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def name(*rdns: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    """A Name from (OID, value) pairs, one RDN each."""
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in rdns])


def extend(base: x509.Name, cn: str) -> x509.Name:
    """``base`` plus one CN RDN: a proxy's subject."""
    return x509.Name(list(base.rdns) + [
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, cn)])])


def make_cert(subject: x509.Name, issuer: x509.Name, signer: PrivateKey,
              public_key: CertificatePublicKeyTypes,
              not_before: dt.datetime, not_after: dt.datetime, *,
              proxy_der: bytes | None = None, is_ca: bool | None = None) -> x509.Certificate:
    """Build a certificate by hand, so tests can make the ones create_proxy refuses to."""
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(public_key).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after))
    if proxy_der is not None:
        b = b.add_extension(x509.UnrecognizedExtension(
            x509.ObjectIdentifier(PROXY_CERT_INFO_OID), proxy_der), critical=True)
    if is_ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    return b.sign(signer, hashes.SHA256())


def hand_proxy(issuer: Credential, *, der: bytes = INHERIT_ALL_DER,
               subject: x509.Name | None = None,
               issuer_name: x509.Name | None = None, signer: PrivateKey | None = None,
               hours: float = 1.0,
               start: dt.datetime | None = None) -> Credential:
    key = small_key()
    start = start or dt.datetime.now(UTC) - dt.timedelta(minutes=1)
    cert = make_cert(subject or extend(issuer.cert.subject, "4242"),
                     issuer_name or issuer.cert.subject, signer or issuer.key, key.public_key(),
                     start, start + dt.timedelta(hours=hours), proxy_der=der)
    return Credential(cert=cert, key=key, chain=(issuer.cert,) + issuer.chain)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CA, a user (the EEC) and a second, untrusted CA with a user of its own."""
    root = tmp_path_factory.mktemp("pki")
    ca.init_ca(root / "ca")
    user = load_credential(*ca.issue_user(root / "ca", "alice"))
    ca.init_ca(root / "other", name="other CA")
    stranger = load_credential(*ca.issue_user(root / "other", "mallory"))
    ca.init_ca(root / "samename")  # same DN as the trusted CA, different key
    impostor = load_credential(*ca.issue_user(root / "samename", "alice"))
    ca_cred = load_credential(root / "ca" / "ca.pem", root / "ca" / "ca.key")
    return {
        "root": root,
        "ca": ca_cred,
        "trusted": load_certificates(root / "ca" / "ca.pem"),
        "user": user,
        "stranger": stranger,
        "impostor": impostor,
    }


def chain_of(cred: Credential) -> list[x509.Certificate]:
    return [cred.cert, *cred.chain]


# --------------------------------------------------------------------------------------------
# names and extensions

def test_dn_string_keeps_rdn_order_and_uses_short_names() -> None:
    n = name((NameOID.DOMAIN_COMPONENT, "org"), (NameOID.DOMAIN_COMPONENT, "example"),
             (NameOID.COUNTRY_NAME, "CH"), (NameOID.STATE_OR_PROVINCE_NAME, "GE"),
             (NameOID.LOCALITY_NAME, "Geneva"), (NameOID.ORGANIZATION_NAME, "gwms"),
             (NameOID.ORGANIZATIONAL_UNIT_NAME, "Users"), (NameOID.COMMON_NAME, "alice"),
             (NameOID.EMAIL_ADDRESS, "a@example.org"), (NameOID.SERIAL_NUMBER, "7"))
    assert dn_string(n) == ("/DC=org/DC=example/C=CH/ST=GE/L=Geneva/O=gwms/OU=Users/CN=alice"
                            "/emailAddress=a@example.org/2.5.4.5=7")


def test_proxy_cert_info_is_encoded_as_rfc3820_der(pki: dict) -> None:
    full = create_proxy(pki["user"], 1, key_bits=1024)
    limited = create_proxy(pki["user"], 1, limited=True, key_bits=1024)
    ext = full.cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(PROXY_CERT_INFO_OID))
    assert ext.critical and ext.value.value == INHERIT_ALL_DER
    ext = limited.cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(PROXY_CERT_INFO_OID))
    assert ext.value.value == LIMITED_DER
    assert is_proxy(full.cert) and not is_limited_proxy(full.cert)
    assert is_proxy(limited.cert) and is_limited_proxy(limited.cert)
    assert not is_proxy(pki["user"].cert) and not is_limited_proxy(pki["user"].cert)


@pytest.mark.parametrize("der", [
    b"",                                              # nothing
    bytes.fromhex("300c300a06082b0601050507150100"),  # trailing byte inside
    bytes.fromhex("300c300a06082b06010505071501") + b"\x00",  # trailing byte outside
    bytes.fromhex("3080300a06082b060105050715010000"),  # indefinite length
    bytes.fromhex("30810c300a06082b06010505071501"),  # non-minimal length
    bytes.fromhex("300f0201ff300a06082b06010505071501"),  # negative path length
    bytes.fromhex("300c300a04082b06010505071501"),    # OCTET STRING where the OID belongs
    bytes.fromhex("300c300a06082b060105050715"),      # truncated
])
def test_malformed_proxy_cert_info_is_a_credential_error(pki: dict, der: bytes) -> None:
    proxy = hand_proxy(pki["user"], der=der)
    with pytest.raises(CredentialError, match="malformed ProxyCertInfo"):
        is_limited_proxy(proxy.cert)
    with pytest.raises(CredentialError, match="malformed ProxyCertInfo"):
        verify_chain(chain_of(proxy), pki["trusted"])


_FUZZ_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)


@settings(max_examples=150, deadline=None)
@given(st.one_of(
    st.binary(max_size=40),
    # mutations of a valid encoding reach deeper into the parser than random bytes
    st.tuples(st.sampled_from([INHERIT_ALL_DER, LIMITED_DER]), st.integers(0, 16),
              st.integers(0, 255)).map(lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]),
))
def test_arbitrary_proxy_cert_info_gives_a_bool_or_credential_error(der: bytes) -> None:
    now = dt.datetime.now(UTC)
    cert = make_cert(name((NameOID.COMMON_NAME, "p")), name((NameOID.COMMON_NAME, "i")),
                     _FUZZ_KEY, _FUZZ_KEY.public_key(), now, now + dt.timedelta(hours=1),
                     proxy_der=der)
    try:
        assert isinstance(is_limited_proxy(cert), bool)
    except CredentialError as e:
        assert "ProxyCertInfo" in str(e) and "/CN=p" in str(e)


def test_path_length_constraint_is_read_and_enforced(pki: dict) -> None:
    # pCPathLenConstraint 0: no proxy may be issued below this one.
    no_children = hand_proxy(pki["user"], der=bytes.fromhex("300f020100300a06082b06010505071501"))
    assert verify_chain(chain_of(no_children), pki["trusted"]).proxy_depth == 1
    child = create_proxy(no_children, 0.5, key_bits=1024)
    with pytest.raises(CredentialError, match="allows 0 proxies below it"):
        verify_chain(chain_of(child), pki["trusted"])


# --------------------------------------------------------------------------------------------
# creating, writing and loading proxies

def test_proxy_round_trip_identity_is_the_eec(pki: dict, tmp_path: Path) -> None:
    proxy = create_proxy(pki["user"], 12, key_bits=1024)
    path = tmp_path / "x509up"
    write_credential(path, proxy)
    loaded = load_credential(path)
    assert loaded.cert == proxy.cert and loaded.chain == (pki["user"].cert,)
    assert loaded.key is not None
    info = verify_chain(chain_of(loaded), pki["trusted"])
    assert info.identity == "/O=gwms/OU=Users/CN=alice"
    assert info.subject == dn_string(proxy.cert.subject)
    assert info.subject.startswith("/O=gwms/OU=Users/CN=alice/CN=")
    assert info.limited is False and info.proxy_depth == 1
    # the proxy's CN is its serial number, as Globus names proxies
    assert proxy.cert.subject.rdns[-1].get_attributes_for_oid(NameOID.COMMON_NAME)[0].value \
        == str(proxy.cert.serial_number)
    assert proxy.cert.issuer == pki["user"].cert.subject


def test_limited_proxy_round_trip_sets_limited(pki: dict, tmp_path: Path) -> None:
    proxy = create_proxy(pki["user"], 1, limited=True, key_bits=1024)
    write_credential(tmp_path / "p", proxy)
    info = verify_chain(chain_of(load_credential(tmp_path / "p")), pki["trusted"])
    assert info.limited is True and info.identity == "/O=gwms/OU=Users/CN=alice"


def test_proxy_of_a_proxy_verifies_with_depth_two(pki: dict, tmp_path: Path) -> None:
    first = create_proxy(pki["user"], 2, key_bits=1024)
    second = create_proxy(first, 1, limited=True, key_bits=1024)
    assert second.chain == (first.cert, pki["user"].cert)
    write_credential(tmp_path / "p2", second)
    loaded = load_credential(tmp_path / "p2")
    info = verify_chain(chain_of(loaded), pki["trusted"])
    assert info.proxy_depth == 2 and info.limited
    assert info.identity == "/O=gwms/OU=Users/CN=alice"
    assert second.cert.issuer == first.cert.subject


def test_proxy_lifetime_is_clipped_to_its_issuer(pki: dict) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    first = create_proxy(pki["user"], 1, key_bits=1024, now=now)
    second = create_proxy(first, 100, key_bits=1024, now=now)
    assert first.cert.not_valid_after_utc == now + dt.timedelta(hours=1)
    assert second.cert.not_valid_after_utc == first.cert.not_valid_after_utc
    assert second.cert.not_valid_before_utc == now - dt.timedelta(minutes=5)
    eec_end = pki["user"].cert.not_valid_after_utc
    long = create_proxy(pki["user"], 24 * 10000, key_bits=1024)
    assert long.cert.not_valid_after_utc == eec_end
    assert verify_chain(chain_of(second), pki["trusted"], now=now).not_after == \
        first.cert.not_valid_after_utc


def test_full_proxy_from_limited_proxy_is_refused(pki: dict) -> None:
    limited = create_proxy(pki["user"], 1, limited=True, key_bits=1024)
    with pytest.raises(CredentialError, match="a limited proxy cannot issue a full proxy"):
        create_proxy(limited, 1, key_bits=1024)
    assert is_limited_proxy(create_proxy(limited, 1, limited=True, key_bits=1024).cert)


def test_create_proxy_refuses_an_expired_issuer_and_a_missing_key(pki: dict) -> None:
    later = pki["user"].cert.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(CredentialError, match="CN=alice expired at"):
        create_proxy(pki["user"], 1, key_bits=1024, now=later)
    with pytest.raises(CredentialError, match="no private key"):
        create_proxy(Credential(pki["user"].cert, None, ()), 1, key_bits=1024)


def test_written_credential_is_0600_and_leaves_no_temp_file(pki: dict, tmp_path: Path) -> None:
    path = tmp_path / "x509up"
    old_umask = os.umask(0)
    try:
        write_credential(path, create_proxy(pki["user"], 1, key_bits=1024))
        write_credential(path, create_proxy(pki["user"], 1, key_bits=1024))  # replaces
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["x509up"]
    text = path.read_text()
    # Globus order: proxy certificate, its key, then the chain
    assert text.index("BEGIN CERTIFICATE") < text.index("BEGIN PRIVATE KEY") \
        < text.rindex("BEGIN CERTIFICATE")


def test_load_credential_accepts_any_order_and_a_separate_key(pki: dict, tmp_path: Path) -> None:
    proxy = create_proxy(pki["user"], 1, key_bits=1024)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    key_pem = proxy.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())
    (tmp_path / "mixed.pem").write_bytes(pem(pki["ca"].cert) + pem(pki["user"].cert) + key_pem
                                         + pem(proxy.cert))
    loaded = load_credential(tmp_path / "mixed.pem")
    assert loaded.cert == proxy.cert
    assert loaded.chain == (pki["user"].cert, pki["ca"].cert)
    (tmp_path / "cert.pem").write_bytes(pem(proxy.cert))
    (tmp_path / "key.pem").write_bytes(key_pem)
    split = load_credential(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert split.cert == proxy.cert and split.chain == ()
    assert load_credential(tmp_path / "cert.pem").key is None


def test_load_credential_missing_file(pki: dict, tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match=r"certificate file .*nope\.pem does not exist"):
        load_credential(tmp_path / "nope.pem")
    with pytest.raises(CredentialError, match=r"key file .*nokey\.pem does not exist"):
        load_credential(pki["root"] / "ca" / "user-alice.pem", tmp_path / "nokey.pem")


@pytest.mark.parametrize("content, message", [
    (b"", "holds no PEM certificate"),
    (b"\x00\xff garbage \x01", "holds no PEM certificate"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "cannot be parsed"),
    (b"-----BEGIN CERTIFICATE-----\nMIIB", "truncated or malformed PEM block"),
    (b"-----BEGIN PRIVATE KEY-----\nZm9v\n-----END PRIVATE KEY-----\n", "cannot be parsed"),
])
def test_load_credential_garbage(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.pem").write_bytes(content)
    with pytest.raises(CredentialError, match=message):
        load_credential(tmp_path / "bad.pem")


def test_write_into_a_missing_directory_says_so(pki: dict, tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match=r"cannot write .*/nodir/p: directory .* does not"):
        write_credential(tmp_path / "nodir" / "p", pki["user"])


def test_load_credential_mismatched_key(pki: dict, tmp_path: Path) -> None:
    cert_path = pki["root"] / "ca" / "user-alice.pem"
    other_key = pki["root"] / "other" / "user-mallory.key"
    with pytest.raises(CredentialError,
                       match="does not belong to certificate /O=gwms/OU=Users/CN=alice"):
        load_credential(cert_path, other_key)


def test_load_credential_encrypted_key_needs_a_pass_phrase(pki: dict, tmp_path: Path) -> None:
    from gwms.credentials.x509 import EncryptedKeyError

    key = small_key()
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    cert = make_cert(name((NameOID.COMMON_NAME, "k")), name((NameOID.COMMON_NAME, "k")), key,
                     key.public_key(), dt.datetime.now(UTC), dt.datetime.now(UTC)
                     + dt.timedelta(hours=1))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(EncryptedKeyError, match="encrypted"):
        load_credential(tmp_path / "c.pem", tmp_path / "k.pem")
    with pytest.raises(EncryptedKeyError, match="wrong pass phrase"):
        load_credential(tmp_path / "c.pem", tmp_path / "k.pem", password=b"nope")
    assert load_credential(tmp_path / "c.pem", tmp_path / "k.pem", password=b"secret").key


def test_load_certificates_reads_a_bundle(pki: dict, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((pki["root"] / "ca" / "ca.pem").read_bytes()
                       + (pki["root"] / "other" / "ca.pem").read_bytes())
    assert [dn_string(c.subject) for c in load_certificates(bundle)] == \
        ["/O=gwms/CN=gwms CA", "/O=gwms/CN=other CA"]


# --------------------------------------------------------------------------------------------
# verify_chain: each refusal with its message

def test_verify_chain_accepts_the_root_at_the_end(pki: dict) -> None:
    proxy = create_proxy(pki["user"], 1, key_bits=1024)
    with_root = verify_chain(chain_of(proxy) + [pki["ca"].cert], pki["trusted"])
    without = verify_chain(chain_of(proxy), pki["trusted"])
    assert with_root.identity == without.identity == "/O=gwms/OU=Users/CN=alice"
    assert with_root.proxy_depth == without.proxy_depth == 1
    assert verify_chain([pki["user"].cert], pki["trusted"]).proxy_depth == 0


def test_verify_chain_refuses_an_expired_proxy(pki: dict) -> None:
    start = dt.datetime.now(UTC) - dt.timedelta(hours=3)
    proxy = create_proxy(pki["user"], 1, key_bits=1024, now=start)
    with pytest.raises(CredentialError, match=r"certificate /O=gwms/OU=Users/CN=alice/CN=\d+ "
                                              r"expired at \d{4}-\d\d-\d\d"):
        verify_chain(chain_of(proxy), pki["trusted"])


def test_verify_chain_refuses_an_expired_eec(pki: dict) -> None:
    ca_cred = pki["ca"]
    key = small_key()
    past = dt.datetime.now(UTC) - dt.timedelta(days=10)
    eec_cert = make_cert(name((NameOID.ORGANIZATION_NAME, "gwms"), (NameOID.COMMON_NAME, "old")),
                         ca_cred.cert.subject, ca_cred.key, key.public_key(), past,
                         past + dt.timedelta(days=1), is_ca=False)
    eec = Credential(eec_cert, key, ())
    proxy = hand_proxy(eec)  # valid now, signed by the expired EEC
    with pytest.raises(CredentialError, match="certificate /O=gwms/CN=old expired at"):
        verify_chain(chain_of(proxy), pki["trusted"])


def test_verify_chain_refuses_a_not_yet_valid_proxy(pki: dict) -> None:
    proxy = hand_proxy(pki["user"], start=dt.datetime.now(UTC) + dt.timedelta(hours=1))
    with pytest.raises(CredentialError, match=r"CN=4242 is not yet valid: valid from"):
        verify_chain(chain_of(proxy), pki["trusted"])


def test_verify_chain_refuses_a_proxy_signed_by_another_key(pki: dict) -> None:
    proxy = hand_proxy(pki["user"], signer=small_key())
    with pytest.raises(CredentialError, match=r"CN=alice/CN=4242 was not issued by "
                                              r"/O=gwms/OU=Users/CN=alice: the signature"):
        verify_chain(chain_of(proxy), pki["trusted"])


def test_verify_chain_refuses_a_wrong_issuer_name(pki: dict) -> None:
    wrong = name((NameOID.ORGANIZATION_NAME, "gwms"), (NameOID.COMMON_NAME, "bob"))
    proxy = hand_proxy(pki["user"], issuer_name=wrong)
    with pytest.raises(CredentialError, match=r"proxy .*CN=4242 was not issued by "
                                              r"/O=gwms/OU=Users/CN=alice: its issuer name is "
                                              r"/O=gwms/CN=bob"):
        verify_chain(chain_of(proxy), pki["trusted"])


@pytest.mark.parametrize("subject", [
    name((NameOID.ORGANIZATION_NAME, "gwms"), (NameOID.COMMON_NAME, "root")),  # unrelated
    name((NameOID.ORGANIZATION_NAME, "gwms"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "Users"),
         (NameOID.COMMON_NAME, "alice"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "x")),  # not a CN
    name((NameOID.ORGANIZATION_NAME, "gwms"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "Users"),
         (NameOID.COMMON_NAME, "alice"), (NameOID.COMMON_NAME, "1"),
         (NameOID.COMMON_NAME, "2")),  # two RDNs more
], ids=["unrelated", "not-a-cn", "two-more"])
def test_verify_chain_refuses_a_subject_that_does_not_extend_the_issuer(
        pki: dict, subject: x509.Name) -> None:
    proxy = hand_proxy(pki["user"], subject=subject)
    with pytest.raises(CredentialError, match="subject does not extend its issuer's"):
        verify_chain(chain_of(proxy), pki["trusted"])


def test_verify_chain_refuses_a_limited_proxy_issuing_a_full_one(pki: dict) -> None:
    limited = create_proxy(pki["user"], 1, limited=True, key_bits=1024)
    full = hand_proxy(limited, der=INHERIT_ALL_DER)
    with pytest.raises(CredentialError, match="a limited proxy cannot issue a full proxy"):
        verify_chain(chain_of(full), pki["trusted"])


def test_verify_chain_refuses_an_untrusted_ca(pki: dict) -> None:
    proxy = create_proxy(pki["stranger"], 1, key_bits=1024)
    with pytest.raises(CredentialError, match=r"CN=mallory was not issued by a trusted CA: no "
                                              r"trusted CA certificate is named /O=gwms/CN=other"):
        verify_chain(chain_of(proxy), pki["trusted"])
    # same CA name, different key: found by name, refused by signature
    impostor = create_proxy(pki["impostor"], 1, key_bits=1024)
    with pytest.raises(CredentialError, match="not issued by the trusted CA /O=gwms/CN=gwms CA: "
                                              "the signature does not verify"):
        verify_chain(chain_of(impostor), pki["trusted"])


def test_verify_chain_refuses_a_non_ca_issuer_of_an_eec(pki: dict) -> None:
    key = small_key()
    now = dt.datetime.now(UTC)
    user = pki["user"]
    sub = make_cert(name((NameOID.COMMON_NAME, "sub")), user.cert.subject, user.key,
                    key.public_key(), now - dt.timedelta(minutes=1), now + dt.timedelta(hours=1))
    with pytest.raises(CredentialError, match=r"certificate /O=gwms/OU=Users/CN=alice issued "
                                              r"/CN=sub but is not a CA"):
        verify_chain([sub, user.cert], pki["trusted"])


def test_verify_chain_refuses_a_proxy_issuing_an_eec(pki: dict) -> None:
    proxy = create_proxy(pki["user"], 1, key_bits=1024)
    key = small_key()
    now = dt.datetime.now(UTC)
    eec = make_cert(name((NameOID.COMMON_NAME, "x")), proxy.cert.subject, proxy.key,
                    key.public_key(), now - dt.timedelta(minutes=1), now + dt.timedelta(hours=1))
    with pytest.raises(CredentialError, match="is not a proxy but was issued by the proxy"):
        verify_chain([eec, *chain_of(proxy)], pki["trusted"])


def test_verify_chain_refuses_a_trusted_root_that_is_not_a_ca(pki: dict) -> None:
    key = small_key()
    now = dt.datetime.now(UTC)
    subject = name((NameOID.COMMON_NAME, "self"))
    self_signed = make_cert(subject, subject, key, key.public_key(),
                            now - dt.timedelta(minutes=1), now + dt.timedelta(hours=1))
    eec = make_cert(name((NameOID.COMMON_NAME, "e")), subject, key, small_key().public_key(),
                    now - dt.timedelta(minutes=1), now + dt.timedelta(hours=1))
    with pytest.raises(CredentialError, match="trusted certificate /CN=self is not a CA"):
        verify_chain([eec], [self_signed])


def test_verify_chain_refuses_an_expired_trusted_ca(pki: dict) -> None:
    proxy = create_proxy(pki["user"], 1, key_bits=1024)
    later = pki["ca"].cert.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(CredentialError, match="expired at"):
        verify_chain(chain_of(proxy), pki["trusted"], now=later)


def test_verify_chain_refuses_an_empty_chain(pki: dict) -> None:
    with pytest.raises(CredentialError, match="empty"):
        verify_chain([], pki["trusted"])


# --------------------------------------------------------------------------------------------
# chain_info_from_verified (the chain a TLS handshake returns)

def test_chain_info_from_verified_on_proxy_eec_ca(pki: dict) -> None:
    proxy = create_proxy(pki["user"], 1, limited=True, key_bits=1024)
    info = chain_info_from_verified([proxy.cert, pki["user"].cert, pki["ca"].cert])
    assert info == ChainInfo(identity="/O=gwms/OU=Users/CN=alice",
                             subject=dn_string(proxy.cert.subject), limited=True,
                             not_after=proxy.cert.not_valid_after_utc, proxy_depth=1)
    plain = chain_info_from_verified([pki["user"].cert, pki["ca"].cert])
    assert plain.identity == plain.subject == "/O=gwms/OU=Users/CN=alice"
    assert plain.proxy_depth == 0 and not plain.limited


def test_chain_info_from_verified_refuses_limited_issuing_full(pki: dict) -> None:
    limited = create_proxy(pki["user"], 1, limited=True, key_bits=1024)
    full = hand_proxy(limited, der=INHERIT_ALL_DER)
    with pytest.raises(CredentialError, match="a limited proxy cannot issue a full proxy"):
        chain_info_from_verified([full.cert, limited.cert, pki["user"].cert, pki["ca"].cert])


def test_chain_info_from_verified_matches_openssl(pki: dict) -> None:
    """The proxies we make are accepted by OpenSSL with ALLOW_PROXY_CERTS (as in TLS)."""
    from OpenSSL import crypto

    first = create_proxy(pki["user"], 1, key_bits=1024)
    second = create_proxy(first, 1, limited=True, key_bits=1024)
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(pki["ca"].cert))
    store.set_flags(crypto.X509StoreFlags.ALLOW_PROXY_CERTS)
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(second.cert),
                                  [crypto.X509.from_cryptography(c) for c in second.chain])
    verified = [c.to_cryptography() for c in ctx.get_verified_chain()]
    info = chain_info_from_verified(verified)
    assert info == verify_chain(chain_of(second), pki["trusted"])
    assert info.proxy_depth == 2 and info.limited
