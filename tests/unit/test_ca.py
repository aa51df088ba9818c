"""The small CA: files and modes, extensions that TLS checks, and name validation."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gwms.credentials import ca
from gwms.credentials.x509 import (
    CredentialError,
    dn_string,
    load_certificates,
    load_credential,
    verify_chain,
)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pool") / "ca"
    ca.init_ca(directory, name="Test CA")
    return directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ext(cert: x509.Certificate, cls: type) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(cls).value


def test_init_ca_creates_files_with_private_modes(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "ca"
    cert_path, key_path = ca.init_ca(directory, name="Pool CA", days=10)
    assert (cert_path, key_path) == (directory / "ca.pem", directory / "ca.key")
    assert mode(directory) == 0o700
    assert mode(key_path) == 0o600
    cred = load_credential(cert_path, key_path)
    cert = cred.cert
    assert dn_string(cert.subject) == dn_string(cert.issuer) == "/O=gwms/CN=Pool CA"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.key_cert_sign and ku.crl_sign
    assert ext(cert, x509.SubjectKeyIdentifier).digest == \
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    cert.verify_directly_issued_by(cert)  # self-signed
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=9) < lifetime <= dt.timedelta(days=10)


def test_init_ca_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    ca.init_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(CredentialError, match="already holds a CA"):
        ca.init_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    ca.init_ca(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before
    assert mode(tmp_path / "ca.key") == 0o600


def test_host_certificate_sans_and_ekus(ca_dir: Path) -> None:
    cert_path, key_path = ca.issue_host(ca_dir, "node1.example.org",
                                        extra_names=["node1", "10.0.0.7", "fd00::7"])
    assert cert_path == ca_dir / "host-node1.example.org.pem"
    assert mode(key_path) == 0o600
    cred = load_credential(cert_path, key_path)
    cert = cred.cert
    assert dn_string(cert.subject) == "/O=gwms/OU=Hosts/CN=node1.example.org"
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["node1.example.org", "node1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"),
                                                        ipaddress.ip_address("fd00::7")]
    assert set(ext(cert, x509.ExtendedKeyUsage)) == {ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ext(cert, x509.BasicConstraints).ca is False
    ca_cert = load_certificates(ca_dir / "ca.pem")[0]
    assert ext(cert, x509.AuthorityKeyIdentifier).key_identifier == \
        ext(ca_cert, x509.SubjectKeyIdentifier).digest
    assert verify_chain([cert], [ca_cert]).identity == "/O=gwms/OU=Hosts/CN=node1.example.org"


def test_localhost_certificate_also_names_the_loopback_addresses(ca_dir: Path) -> None:
    cert = load_credential(*ca.issue_host(ca_dir, "localhost")).cert
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}


def test_ip_literal_hostname_is_an_ip_san(ca_dir: Path) -> None:
    cert = load_credential(*ca.issue_host(ca_dir, "192.0.2.1")).cert
    san = ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.1")]
    assert san.get_values_for_type(x509.DNSName) == []


def test_user_certificate_is_client_only_and_not_a_ca(ca_dir: Path) -> None:
    cert_path, key_path = ca.issue_user(ca_dir, "alice", days=30)
    assert (cert_path.name, key_path.name) == ("user-alice.pem", "user-alice.key")
    assert mode(key_path) == 0o600
    cert = load_credential(cert_path, key_path).cert
    assert dn_string(cert.subject) == "/O=gwms/OU=Users/CN=alice"
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext(cert, x509.BasicConstraints).ca is False
    assert ext(cert, x509.KeyUsage).digital_signature  # needed to sign proxies
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_issued_certificates_never_outlive_the_ca(tmp_path: Path) -> None:
    ca.init_ca(tmp_path, days=5)
    ca_end = load_certificates(tmp_path / "ca.pem")[0].not_valid_after_utc
    host = load_credential(*ca.issue_host(tmp_path, "h", days=825)).cert
    assert host.not_valid_after_utc == ca_end


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", "", "bell\x07", "new\nline", ".hidden"])
def test_names_are_validated(ca_dir: Path, bad: str) -> None:
    with pytest.raises(CredentialError, match="must not"):
        ca.issue_user(ca_dir, bad)
    with pytest.raises(CredentialError, match="must not"):
        ca.issue_host(ca_dir, bad)
    assert not (ca_dir.parent / "evil.pem").exists()


def test_bad_extra_name_is_refused(ca_dir: Path) -> None:
    with pytest.raises(CredentialError, match="must not"):
        ca.issue_host(ca_dir, "ok", extra_names=["x/../y"])


def test_issue_without_a_ca_says_so(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="holds no CA"):
        ca.issue_user(tmp_path, "bob")
