"""A small certificate authority for a pool and for tests.

A one-host pool, a test and a site without a Grid CA all need host and user certificates that
the daemons' mutual TLS accepts. This CA makes them with the extensions OpenSSL checks (CA flag,
key usages, extended key usages, subject alternative names), so the same daemons and TLS code run
with these certificates and with those of a real Grid CA.

Layout of a CA directory: ``ca.pem``/``ca.key``, then ``host-<name>.pem``/``.key`` and
``user-<name>.pem``/``.key``; every key is mode 0600 and the directory 0700.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gwms.credentials.x509 import (
    Credential,
    CredentialError,
    load_credential,
    write_certificates,
    write_private_key,
    _signing_hash,
)

__all__ = ["init_ca", "issue_host", "issue_pilot", "issue_user", "CA_CERT", "CA_KEY"]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"

# RSA 2048 rather than EC P-256: users take these certificates to Grid tools (voms-proxy-init,
# Globus GSI, older HTCondor/gLExec builds) that have had gaps with EC end-entity keys, and the
# proxies gwms makes are RSA anyway. Generation costs ~50 ms per key, paid once per certificate.
KEY_BITS = 2048


def _check_name(name: str, what: str) -> None:
    """Refuse names that would escape the CA directory or corrupt a DN/file name."""
    if not name or not name.strip():
        raise CredentialError(f"{what} must not be empty")
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise CredentialError(f"{what} {name!r} must not contain '/', '\\' or '..' "
                              "or start with '.'")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise CredentialError(f"{what} {name!r} must not contain control characters")
    if len(name) > 64:
        raise CredentialError(f"{what} {name!r} is longer than 64 characters (the CN limit)")


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=not cert_sign,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False)


def init_ca(directory: Path, name: str = "gwms CA", days: int = 3650, *,
            force: bool = False) -> tuple[Path, Path]:
    """Create a self-signed CA in ``directory``; returns (certificate path, key path).

    Refuses to replace an existing CA unless ``force``: every certificate it issued would stop
    being trusted, which is not something to do by re-running a setup command.
    """
    _check_name(name, "CA name")
    if days <= 0:
        raise CredentialError(f"CA lifetime must be positive, not {days} days")
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not force and (cert_path.exists() or key_path.exists()):
        raise CredentialError(f"{directory} already holds a CA ({CA_CERT}/{CA_KEY}); "
                              "use force to replace it")
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    elif not directory.is_dir():
        raise CredentialError(f"{directory} is not a directory")

    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gwms"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, _signing_hash(key))
    )
    overwrite = force
    write_private_key(key_path, key, overwrite=overwrite)
    write_certificates(cert_path, [cert], overwrite=overwrite)
    return cert_path, key_path


def _load_ca(directory: Path) -> Credential:
    cert_path, key_path = Path(directory) / CA_CERT, Path(directory) / CA_KEY
    if not cert_path.exists():
        raise CredentialError(f"{directory} holds no CA ({CA_CERT} missing); create one with "
                              "'gwms ca init'")
    return load_credential(cert_path, key_path)


def _issue(directory: Path, prefix: str, name: str, days: int, ou: str,
           sans: Sequence[x509.GeneralName], ekus: Sequence[x509.ObjectIdentifier]
           ) -> tuple[Path, Path]:
    if days <= 0:
        raise CredentialError(f"certificate lifetime must be positive, not {days} days")
    directory = Path(directory)
    ca = _load_ca(directory)
    assert ca.key is not None
    key = _new_key()
    now = _now()
    # Never outlive the CA: a certificate past its issuer's end is dead weight that looks valid.
    not_after = min(now + _dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gwms"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # digitalSignature is also what lets the holder sign RFC 3820 proxies.
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(aki, critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    try:
        cert = builder.sign(ca.key, _signing_hash(ca.key))
    except ValueError as e:
        raise CredentialError(f"cannot issue a certificate for {name!r}: {e}") from None
    cert_path = directory / f"{prefix}-{name}.pem"
    key_path = directory / f"{prefix}-{name}.key"
    write_private_key(key_path, key)
    write_certificates(cert_path, [cert])
    return cert_path, key_path


def _general_name(name: str) -> x509.GeneralName:
    _check_name(name, "host name")
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        return x509.DNSName(name.encode("idna").decode("ascii"))
    except (UnicodeError, ValueError):
        raise CredentialError(f"host name {name!r} is neither an IP address nor a DNS name") \
            from None


def issue_host(directory: Path, hostname: str, days: int = 825,
               extra_names: Sequence[str] = ()) -> tuple[Path, Path]:
    """Issue a host certificate (server and client auth: daemons are both); returns paths.

    The SAN always holds ``hostname`` (as an IPAddress entry for IP literals, which is what
    service-identity checks), plus ``extra_names``; "localhost" also gets 127.0.0.1 and ::1 so
    a one-host pool can be reached by any of its loopback names.
    """
    _check_name(hostname, "host name")
    names = [hostname, *extra_names]
    if hostname == "localhost":
        names += ["127.0.0.1", "::1"]
    sans: list[x509.GeneralName] = []
    for n in names:
        gn = _general_name(n)
        if gn not in sans:
            sans.append(gn)
    return _issue(directory, "host", hostname, days, "Hosts", sans,
                  [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def issue_pilot(directory: Path, name: str = "glidein", hostname: str = "localhost",
                days: int = 30) -> tuple[Path, Path]:
    """Issue a pilot certificate (OU=Pilots): the credential a factory gives its glideins, whose
    startds present it both to the collector (as a client) and to schedds (as a server, so its
    SAN names the host the glideins run on: ``localhost`` for a one-host pool)."""
    _check_name(name, "pilot name")
    names = [hostname, "127.0.0.1", "::1"] if hostname == "localhost" else [hostname]
    return _issue(directory, "pilot", name, days, "Pilots", [_general_name(n) for n in names],
                  [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def issue_user(directory: Path, username: str, days: int = 365) -> tuple[Path, Path]:
    """Issue a user certificate (client auth; may sign proxies); returns paths."""
    _check_name(username, "user name")
    return _issue(directory, "user", username, days, "Users", [],
                  [ExtendedKeyUsageOID.CLIENT_AUTH])
