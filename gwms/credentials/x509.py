"""X.509 certificates and RFC 3820 proxy certificates.

This module is the one place gwms reads, makes and checks certificate chains that contain
proxies (the "GSI" of the seed system). OpenSSL checks signatures, validity and the proxy naming
rule during a TLS handshake once ``ALLOW_PROXY_CERTS`` is set, but it knows nothing of proxy
*policy* (limited proxies); :func:`chain_info_from_verified` applies those rules to a chain the
handshake already verified, and :func:`verify_chain` does the whole job for chains that arrive
outside TLS (a delegated proxy, a proxy file given to ``gwms proxy info``).

Every refusal is a :class:`CredentialError` whose message names the certificate (by DN) and what
was wrong with it, because the person reading it is usually an operator looking at a log line.
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any, Sequence, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "CredentialError",
    "EncryptedKeyError",
    "PrivateKey",
    "Credential",
    "ChainInfo",
    "PROXY_CERT_INFO_OID",
    "INHERIT_ALL_OID",
    "LIMITED_PROXY_OID",
    "INDEPENDENT_OID",
    "dn_string",
    "load_credential",
    "load_certificates",
    "is_proxy",
    "is_limited_proxy",
    "proxy_policy",
    "create_proxy",
    "sign_delegation",
    "make_delegation_request",
    "new_delegation_key",
    "read_delegation_request",
    "accept_delegation",
    "parse_certificates",
    "credential_from_pem",
    "credential_pem",
    "certificates_pem",
    "inspect_chain",
    "write_credential",
    "write_private_key",
    "write_certificates",
    "write_private_file",
    "verify_chain",
    "chain_info_from_verified",
]

PROXY_CERT_INFO_OID = "1.3.6.1.5.5.7.1.14"
INHERIT_ALL_OID = "1.3.6.1.5.5.7.21.1"
LIMITED_PROXY_OID = "1.3.6.1.4.1.3536.1.1.1.9"
INDEPENDENT_OID = "1.3.6.1.5.5.7.21.2"

# Policy languages whose meaning gwms implements. A proxy in any other language (an independent
# proxy, a site-specific policy) is refused: mapping it to the end-entity identity would grant
# rights its issuer did not delegate, so failing closed is the only safe reading.
_KNOWN_POLICIES = frozenset({INHERIT_ALL_OID, LIMITED_PROXY_OID})

# Tolerated difference between our clock and the relying party's, applied to a new proxy's
# notBefore (the value grid-proxy-init uses).
CLOCK_SKEW = _dt.timedelta(minutes=5)

PrivateKey = Union[
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
]
_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class CredentialError(Exception):
    """A certificate, key or chain that gwms refuses, with the reason and the certificate's DN."""


class EncryptedKeyError(CredentialError):
    """The private key is encrypted and no (or a wrong) pass phrase was given.

    A separate class so that an interactive tool can ask for the pass phrase and retry, while
    everything else treats it as any other refusal.
    """


# --------------------------------------------------------------------------------------------
# Distinguished names

_SHORT_NAMES = {
    NameOID.DOMAIN_COMPONENT.dotted_string: "DC",
    NameOID.COUNTRY_NAME.dotted_string: "C",
    NameOID.STATE_OR_PROVINCE_NAME.dotted_string: "ST",
    NameOID.LOCALITY_NAME.dotted_string: "L",
    NameOID.ORGANIZATION_NAME.dotted_string: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME.dotted_string: "OU",
    NameOID.COMMON_NAME.dotted_string: "CN",
    NameOID.EMAIL_ADDRESS.dotted_string: "emailAddress",
}


def dn_string(name: x509.Name) -> str:
    """Render a Name in the OpenSSL/Globus one-line form (``/DC=org/O=gwms/CN=alice``).

    This is the form grid operators write in grid-mapfiles and authorization lists, and the form
    gwms uses for X.509 identities, so DN-based allow/deny rules carry over unchanged. RDNs are
    kept in certificate order (not reversed as RFC 4514 does); a multi-valued RDN is joined with
    ``+``.
    """
    parts = []
    for rdn in name.rdns:
        items = []
        for attr in rdn:
            label = _SHORT_NAMES.get(attr.oid.dotted_string, attr.oid.dotted_string)
            value = attr.value if isinstance(attr.value, str) else attr.value.hex()
            items.append(f"{label}={value}")
        parts.append("/" + "+".join(items))
    return "".join(parts)


def _dn(cert: x509.Certificate) -> str:
    return dn_string(cert.subject)


# --------------------------------------------------------------------------------------------
# Minimal strict DER for ProxyCertInfo (RFC 3820 section 3.8)
#
#   ProxyCertInfo ::= SEQUENCE { pCPathLenConstraint INTEGER (0..MAX) OPTIONAL,
#                                proxyPolicy ProxyPolicy }
#   ProxyPolicy   ::= SEQUENCE { policyLanguage OBJECT IDENTIFIER,
#                                policy OCTET STRING OPTIONAL }
#
# cryptography does not know this extension, so it hands us the raw bytes. Only DER (definite,
# minimal lengths, no trailing bytes) is accepted: a certificate is signed over exactly these
# bytes, and a lenient parser is where two implementations start to disagree.

_SEQUENCE, _INTEGER, _OCTET_STRING, _OID = 0x30, 0x02, 0x04, 0x06


@dataclass(frozen=True)
class _ProxyCertInfo:
    path_len: int | None
    language: str
    policy: bytes | None


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(value)) + value


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"invalid OID {dotted}")
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _der_tlv(_OID, bytes(out))


def _encode_proxy_cert_info(language: str, path_len: int | None = None,
                            policy: bytes | None = None) -> bytes:
    inner = _der_oid(language)
    if policy is not None:
        inner += _der_tlv(_OCTET_STRING, policy)
    body = b""
    if path_len is not None:
        body += _der_tlv(_INTEGER, path_len.to_bytes(path_len.bit_length() // 8 + 1, "big"))
    body += _der_tlv(_SEQUENCE, inner)
    return _der_tlv(_SEQUENCE, body)


class _DERError(ValueError):
    pass


def _der_read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """Read one TLV at ``pos``; return (tag, value, next position)."""
    if pos + 2 > len(data):
        raise _DERError("truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise _DERError("multi-byte tags are not used here")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise _DERError("indefinite length is not DER")
    else:
        count = first & 0x7F
        if count > 4 or pos + count > len(data):
            raise _DERError("bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        if data[pos] == 0 or length < 0x80:
            raise _DERError("length not minimally encoded")
        pos += count
    if pos + length > len(data):
        raise _DERError("truncated")
    return tag, data[pos:pos + length], pos + length


def _der_read_oid(value: bytes) -> str:
    if not value or value[-1] & 0x80:
        raise _DERError("bad OID")
    arcs: list[int] = []
    acc = 0
    start = True
    for byte in value:
        if start and byte == 0x80:
            raise _DERError("OID arc not minimally encoded")
        acc = (acc << 7) | (byte & 0x7F)
        start = not byte & 0x80
        if start:
            arcs.append(acc)
            acc = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _decode_proxy_cert_info(data: bytes) -> _ProxyCertInfo:
    tag, body, end = _der_read(data, 0)
    if tag != _SEQUENCE or end != len(data):
        raise _DERError("ProxyCertInfo is not one SEQUENCE")
    pos = 0
    path_len = None
    tag, value, pos = _der_read(body, pos)
    if tag == _INTEGER:
        if not value or value[0] & 0x80:
            raise _DERError("pCPathLenConstraint must be a non-negative INTEGER")
        if len(value) > 1 and value[0] == 0 and not value[1] & 0x80:
            raise _DERError("INTEGER not minimally encoded")
        path_len = int.from_bytes(value, "big")
        tag, value, pos = _der_read(body, pos)
    if tag != _SEQUENCE or pos != len(body):
        raise _DERError("proxyPolicy must be the last element, a SEQUENCE")
    tag, oid_value, ppos = _der_read(value, 0)
    if tag != _OID:
        raise _DERError("policyLanguage is not an OBJECT IDENTIFIER")
    language = _der_read_oid(oid_value)
    policy = None
    if ppos != len(value):
        tag, policy, ppos = _der_read(value, ppos)
        if tag != _OCTET_STRING or ppos != len(value):
            raise _DERError("policy is not a single OCTET STRING")
    return _ProxyCertInfo(path_len, language, policy)


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    """The certificate's extensions; a duplicate or undecodable one is a CredentialError."""
    try:
        return cert.extensions
    except ValueError as e:
        raise CredentialError(f"certificate {_dn(cert)}: unreadable extensions ({e})") from None


def _proxy_ext(cert: x509.Certificate) -> x509.Extension | None:
    for ext in _extensions(cert):
        if ext.oid.dotted_string == PROXY_CERT_INFO_OID:
            return ext
    return None


def _proxy_info(cert: x509.Certificate) -> _ProxyCertInfo | None:
    ext = _proxy_ext(cert)
    if ext is None:
        return None
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else None
    if raw is None:
        raise CredentialError(f"certificate {_dn(cert)}: cannot read its ProxyCertInfo extension")
    try:
        return _decode_proxy_cert_info(raw)
    except _DERError as e:
        raise CredentialError(
            f"certificate {_dn(cert)}: malformed ProxyCertInfo extension ({e})") from None


def is_proxy(cert: x509.Certificate) -> bool:
    """True if the certificate carries the RFC 3820 ProxyCertInfo extension.

    Presence of the extension, not the shape of the subject, is what makes a proxy: that is the
    rule OpenSSL applies and the one the identity mapping relies on.
    """
    return _proxy_ext(cert) is not None


def proxy_policy(cert: x509.Certificate) -> str | None:
    """The proxy's policy language OID, or None for a non-proxy (CredentialError if malformed)."""
    info = _proxy_info(cert)
    return None if info is None else info.language


def is_limited_proxy(cert: x509.Certificate) -> bool:
    """True for a Globus limited proxy (policy language 1.3.6.1.4.1.3536.1.1.1.9).

    A limited proxy may authenticate but must not be used to start jobs; gwms enforces that at
    authorization time, so it has to know.
    """
    return proxy_policy(cert) == LIMITED_PROXY_OID


# --------------------------------------------------------------------------------------------
# Reading credentials

@dataclass(frozen=True)
class Credential:
    """A certificate, its private key if we hold it, and the issuing certificates after it."""

    cert: x509.Certificate
    key: PrivateKey | None
    chain: tuple[x509.Certificate, ...]


_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"DSA PRIVATE KEY",
               b"ENCRYPTED PRIVATE KEY"}


def read_credential_file(path: str | os.PathLike[str], what: str,
                         error: type[Exception] = CredentialError, max_bytes: int = -1) -> bytes:
    """Read a credential file, turning every OS error into ``error`` with a message that names
    the file and what it was supposed to be."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read(max_bytes)
    except FileNotFoundError:
        raise error(f"{what} file {name} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} file {name} is a directory") from None
    except PermissionError:
        raise error(f"{what} file {name}: permission denied") from None
    except OSError as e:
        raise error(f"{what} file {name}: {e.strerror or e}") from None


def _parse_pem(data: bytes, path: str | os.PathLike[str],
               password: bytes | None) -> tuple[list[x509.Certificate], list[PrivateKey]]:
    name = os.fspath(path)
    blocks = list(_PEM_BLOCK.finditer(data))
    if data.count(b"-----BEGIN ") != len(blocks):
        raise CredentialError(f"{name} holds a truncated or malformed PEM block")
    certs: list[x509.Certificate] = []
    keys: list[PrivateKey] = []
    for n, m in enumerate(blocks, 1):
        label = m.group(1)
        pem = m.group(0)
        if label in (b"CERTIFICATE", b"X509 CERTIFICATE"):
            try:
                certs.append(x509.load_pem_x509_certificate(
                    pem.replace(b"X509 CERTIFICATE", b"CERTIFICATE")))
            except ValueError as e:
                raise CredentialError(
                    f"{name}: PEM block {n} (CERTIFICATE) cannot be parsed: {e}") from None
        elif label in _KEY_LABELS:
            try:
                key = serialization.load_pem_private_key(pem, password=password)
            except TypeError:
                if password is None:
                    raise EncryptedKeyError(
                        f"{name}: the private key is encrypted and no pass phrase was given"
                    ) from None
                raise CredentialError(f"{name}: the private key is not encrypted but a pass "
                                      "phrase was given") from None
            except ValueError as e:
                if password is not None:
                    raise EncryptedKeyError(
                        f"{name}: cannot decrypt the private key (wrong pass phrase?)") from None
                raise CredentialError(
                    f"{name}: PEM block {n} ({label.decode()}) cannot be parsed: {e}") from None
            except UnsupportedAlgorithm as e:
                raise CredentialError(f"{name}: unsupported private key: {e}") from None
            if not isinstance(key, _KEY_TYPES):
                raise CredentialError(f"{name}: a {type(key).__name__} cannot sign certificates")
            keys.append(key)
        # Other blocks (EC PARAMETERS, X509 CRL, ...) carry nothing we use: ignore them.
    return certs, keys


def _spki(obj: x509.Certificate | PrivateKey) -> bytes:
    public = obj.public_key()
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def load_credential(cert_path: str | os.PathLike[str],
                    key_path: str | os.PathLike[str] | None = None,
                    *, password: bytes | None = None) -> Credential:
    """Load a certificate, its key and chain from PEM file(s).

    The cert file may hold certificate, key and chain in any order (the Globus proxy file holds
    proxy, key, then the issuing chain). The leaf is the certificate that matches the key (or
    the first certificate when there is no key); the chain is then ordered by following issuer
    names, so a file written in another order still yields ``leaf, issuer, issuer's issuer``.
    Checking that the key belongs to the certificate here turns a confusing TLS failure later
    into a clear message now. ``password`` decrypts an encrypted key (``EncryptedKeyError``
    when it is needed and missing).
    """
    certs, keys = _parse_pem(read_credential_file(cert_path, "certificate"), cert_path, password)
    if key_path is not None:
        _, keys = _parse_pem(read_credential_file(key_path, "key"), key_path, password)
        if not keys:
            raise CredentialError(f"key file {os.fspath(key_path)} holds no private key")
    return _assemble(certs, keys, os.fspath(cert_path), os.fspath(key_path or cert_path))


def credential_from_pem(data: bytes, name: str, *, password: bytes | None = None,
                        need_key: bool = False) -> Credential:
    """:func:`load_credential` for PEM data read by someone else (a user's proxy file that
    the schedd read with the user's rights); ``name`` stands for the file in messages."""
    certs, keys = _parse_pem(data, name, password)
    if need_key and not keys and certs:
        raise CredentialError(f"{name} holds no private key")
    return _assemble(certs, keys, name, name)


def _assemble(certs: list[x509.Certificate], keys: list[PrivateKey], cert_name: str,
              key_name: str) -> Credential:
    if not certs:
        raise CredentialError(f"{cert_name} holds no PEM certificate")
    if len(keys) > 1:
        raise CredentialError(f"{key_name} holds more than one private key")
    key = keys[0] if keys else None
    leaf = certs[0]
    if key is not None:
        key_spki = _spki(key)
        matching = [c for c in certs if _spki(c) == key_spki]
        if not matching:
            raise CredentialError(
                f"the private key in {key_name} does not belong to certificate {_dn(certs[0])}")
        leaf = matching[0]
    rest = [c for c in certs if c is not leaf]
    chain: list[x509.Certificate] = []
    current = leaf
    while rest:
        nxt = next((c for c in rest if c.subject == current.issuer), None)
        if nxt is None or current.subject == current.issuer:
            break
        chain.append(nxt)
        rest.remove(nxt)
        current = nxt
    chain.extend(rest)  # unrelated certificates: keep them, verification will name them
    return Credential(cert=leaf, key=key, chain=tuple(chain))


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """All certificates of a PEM file, in file order (a CA bundle); at least one."""
    certs, _ = _parse_pem(read_credential_file(path, "certificate"), path, None)
    if not certs:
        raise CredentialError(f"{os.fspath(path)} holds no PEM certificate")
    return certs


# --------------------------------------------------------------------------------------------
# Writing credentials

def write_private_file(path: str | os.PathLike[str], data: bytes, *,
                       overwrite: bool = True, owner: tuple[int, int] | None = None) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 from the moment the file exists.

    The temporary file is created 0600 by ``os.open`` (never chmod-ed afterwards, so a secret is
    never briefly world-readable), fsync-ed, then renamed over the target so that a reader sees
    the old or the new credential, never half of one. With ``overwrite=False`` the final step is
    a hard link, which fails if the target exists, so two writers cannot both "create" it.
    ``owner`` (uid, gid): the temporary file is given to them before it takes the name (root
    writing a job's credential), so the file is never someone else's under its name.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd = -1
    tmp = ""
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                         0o600)
            break
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise CredentialError(f"cannot write {path}: directory {directory} does not exist") \
                from None
        except PermissionError:
            raise CredentialError(f"cannot write {path}: permission denied in {directory}") \
                from None
    if fd < 0:
        raise OSError(f"cannot create a temporary file in {directory}")
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits; make it exactly 0600
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise CredentialError(f"{path} already exists; not overwriting it") from None
            except OSError as e:
                # File systems without hard links: check, then rename (a narrow race only).
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                if os.path.lexists(path):
                    raise CredentialError(f"{path} already exists; not overwriting it") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
        tmp = ""
        try:
            dfd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def certificates_pem(certs: Sequence[x509.Certificate]) -> bytes:
    """Certificates as PEM, in the given order (a chain to send)."""
    return _certs_pem(certs)


def credential_pem(cred: Credential) -> bytes:
    """A credential in the Globus proxy-file order: cert, key (PKCS8), chain."""
    data = _certs_pem([cred.cert])
    if cred.key is not None:
        data += _key_pem(cred.key)
    return data + _certs_pem(cred.chain)


def write_credential(path: str | os.PathLike[str], cred: Credential, *,
                     owner: tuple[int, int] | None = None) -> None:
    """Write a credential in the Globus proxy-file order: cert, key (PKCS8), chain; mode 0600
    (atomically; ``owner`` as for :func:`write_private_file`)."""
    write_private_file(path, credential_pem(cred), owner=owner)


def write_private_key(path: str | os.PathLike[str], key: PrivateKey, *,
                      overwrite: bool = True) -> None:
    """Write an unencrypted PKCS8 PEM key with mode 0600 (atomically)."""
    write_private_file(path, _key_pem(key), overwrite=overwrite)


def write_certificates(path: str | os.PathLike[str], certs: Sequence[x509.Certificate], *,
                       overwrite: bool = True) -> None:
    """Write certificates as PEM, atomically.

    Mode 0600 as well: certificates are public, but a single rule for everything this module
    writes is easier to audit than a list of exceptions, and owners can relax it.
    """
    write_private_file(path, _certs_pem(certs), overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Making proxies

def _utcnow(now: _dt.datetime | None) -> _dt.datetime:
    if now is None:
        return _dt.datetime.now(_dt.timezone.utc)
    if now.tzinfo is None:  # a naive time is taken as UTC, like cryptography's naive fields
        return now.replace(tzinfo=_dt.timezone.utc)
    return now


def _signing_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return _extensions(cert).get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    bc = _basic_constraints(cert)
    return bc is not None and bc.ca


def _proxy_issue_checks(issuer: Credential, hours: float | None, limited: bool,
                        now: _dt.datetime | None) -> tuple[_dt.datetime, _dt.datetime]:
    """The checks every new proxy passes, whoever holds its key; returns (now, notAfter).

    ``hours`` None means the issuer's whole remaining lifetime."""
    if issuer.key is None:
        raise CredentialError(f"certificate {_dn(issuer.cert)}: no private key to sign a proxy")
    if hours is not None and not hours > 0:
        raise CredentialError(f"proxy lifetime must be positive, not {hours} hours")
    if _is_ca(issuer.cert):
        raise CredentialError(f"certificate {_dn(issuer.cert)} is a CA certificate; proxies are "
                              "issued by end-entity certificates or proxies")
    issuer_info = _proxy_info(issuer.cert)
    if issuer_info is not None and issuer_info.language not in _KNOWN_POLICIES:
        raise CredentialError(f"proxy {_dn(issuer.cert)} has policy language "
                              f"{issuer_info.language}, which gwms cannot delegate")
    if issuer_info is not None and issuer_info.language == LIMITED_PROXY_OID and not limited:
        raise CredentialError(f"proxy {_dn(issuer.cert)} is a limited proxy; a limited proxy "
                              "cannot issue a full proxy")
    if _spki(issuer.key) != _spki(issuer.cert):
        raise CredentialError(f"the private key does not belong to certificate {_dn(issuer.cert)}")
    now = _utcnow(now)
    # A proxy never outlives any certificate above it (its issuer's notAfter is not enough:
    # a proxy of a proxy must stop with the shortest-lived link of the chain).
    issuer_end = min(c.not_valid_after_utc for c in (issuer.cert, *issuer.chain))
    if issuer_end <= now:
        expired = min((issuer.cert, *issuer.chain), key=lambda c: c.not_valid_after_utc)
        raise CredentialError(f"certificate {_dn(expired)} expired at "
                              f"{issuer_end:%Y-%m-%d %H:%M:%S} UTC; cannot sign a proxy")
    if hours is None:
        return now, issuer_end
    try:
        wanted = now + _dt.timedelta(hours=hours)
    except OverflowError:
        wanted = issuer_end
    return now, min(wanted, issuer_end)


def _build_proxy(issuer: Credential, public_key: Any, limited: bool, now: _dt.datetime,
                 not_after: _dt.datetime) -> x509.Certificate:
    """Sign an RFC 3820 impersonation proxy for ``public_key`` with ``issuer``'s key (checked
    by :func:`_proxy_issue_checks`)."""
    assert issuer.key is not None
    # Globus names a proxy by its serial number: unique per issuer, and readable in a DN.
    serial = secrets.randbelow(2**63 - 1) + 1
    subject = x509.Name(list(issuer.cert.subject.rdns) + [
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, str(serial))])])
    language = LIMITED_PROXY_OID if limited else INHERIT_ALL_OID
    pci = x509.UnrecognizedExtension(x509.ObjectIdentifier(PROXY_CERT_INFO_OID),
                                     _encode_proxy_cert_info(language))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(pci, critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
    )
    return builder.sign(issuer.key, _signing_hash(issuer.key))


def create_proxy(issuer: Credential, hours: float, limited: bool = False, key_bits: int = 2048,
                 now: _dt.datetime | None = None) -> Credential:
    """Sign a new RFC 3820 impersonation proxy with ``issuer``'s key.

    The proxy gets its own RSA key, so that it can be handed to a job or delegated without the
    long-lived key. Its lifetime is clipped to its issuer's (a proxy never outlives its issuer)
    and starts 5 minutes in the past to tolerate clock skew. A full proxy cannot be made from a
    limited one: that would undo the limitation.
    """
    if not 1024 <= key_bits <= 16384:
        raise CredentialError(f"proxy key size must be between 1024 and 16384 bits, not {key_bits}")
    if hours is None:
        raise CredentialError("proxy lifetime must be positive, not None hours")
    now, not_after = _proxy_issue_checks(issuer, hours, limited, now)
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    cert = _build_proxy(issuer, key.public_key(), limited, now, not_after)
    return Credential(cert=cert, key=key, chain=(issuer.cert,) + tuple(issuer.chain))


# --------------------------------------------------------------------------------------------
# Delegation, the GSI way: the receiver makes a key pair and a request, the sender signs a new
# proxy for the request's public key with its own proxy. Only public keys and certificates
# travel; the receiver's key never leaves it, the sender's never leaves the sender.

# Smallest RSA key gwms signs a delegated proxy for.
MIN_DELEGATION_RSA_BITS = 2048


def _check_delegation_key(public_key: Any) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if not MIN_DELEGATION_RSA_BITS <= public_key.key_size <= 16384:
            raise CredentialError(f"a delegation request's RSA key must have between "
                                  f"{MIN_DELEGATION_RSA_BITS} and 16384 bits, not "
                                  f"{public_key.key_size}")
    elif not isinstance(public_key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                                     ed448.Ed448PublicKey)):
        raise CredentialError(f"a delegation request's key must be RSA, EC or EdDSA, not "
                              f"{type(public_key).__name__}")


def sign_delegation(issuer: Credential, public_key: Any, hours: float | None,
                    limited: bool = False, now: _dt.datetime | None = None
                    ) -> list[x509.Certificate]:
    """Sign a new RFC 3820 proxy for someone else's ``public_key`` with ``issuer`` (the user's
    proxy): the delegating side of GSI delegation. Returns the chain to send back, leaf first
    (the new proxy, the issuer, the issuer's chain).

    The same checks and the same certificate as :func:`create_proxy`: lifetime clipped to the
    issuer chain's, ``limited`` gives a limited proxy (required if the issuer is limited),
    an expired issuer is refused. ``hours`` None: the issuer's whole remaining lifetime.
    """
    _check_delegation_key(public_key)
    now, not_after = _proxy_issue_checks(issuer, hours, limited, now)
    cert = _build_proxy(issuer, public_key, limited, now, not_after)
    return [cert, issuer.cert, *issuer.chain]


def new_delegation_key(key_bits: int = 2048) -> PrivateKey:
    """A new RSA key for a delegated proxy (tens of milliseconds: daemons make it in a thread;
    cryptography releases the GIL meanwhile)."""
    if not MIN_DELEGATION_RSA_BITS <= key_bits <= 16384:
        raise CredentialError(f"delegation key size must be between {MIN_DELEGATION_RSA_BITS} "
                              f"and 16384 bits, not {key_bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=key_bits)


def make_delegation_request(key: PrivateKey | None = None,
                            key_bits: int = 2048) -> tuple[PrivateKey, bytes]:
    """The receiving side's first step: a key pair (``key``, or a new RSA one) and a PEM
    certificate request for it (signed with it, so the signer can check the requester holds
    the key). The subject is a placeholder: only the public key is used."""
    if key is None:
        key = new_delegation_key(key_bits)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gwms delegation")]))
           .sign(key, _signing_hash(key)))
    return key, csr.public_bytes(serialization.Encoding.PEM)


def read_delegation_request(pem: bytes | str) -> Any:
    """The public key of a PEM certificate request, once its self-signature verifies (the
    requester holds the key) and the key is one gwms signs proxies for."""
    data = pem.encode() if isinstance(pem, str) else pem
    if not isinstance(data, bytes):
        raise CredentialError("a delegation request must be a PEM certificate request")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CredentialError(f"the delegation request is not a PEM certificate request: {e}") from None
    try:
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CredentialError(f"the delegation request cannot be read: {e}") from None
    if not valid:
        raise CredentialError("the delegation request's signature does not verify with its key")
    _check_delegation_key(public_key)
    return public_key


def parse_certificates(pem: bytes | str, name: str = "the certificate chain") -> list[x509.Certificate]:
    """Certificates of a PEM text (a delegated chain), in order; a private key in it is refused
    (a chain that travelled must not carry one)."""
    data = pem.encode() if isinstance(pem, str) else pem
    if not isinstance(data, bytes):
        raise CredentialError(f"{name} must be PEM text")
    certs, keys = _parse_pem(data, name, None)
    if keys:
        raise CredentialError(f"{name} holds a private key")
    if not certs:
        raise CredentialError(f"{name} holds no PEM certificate")
    return certs


def accept_delegation(key: PrivateKey, chain_pem: bytes | str,
                      now: _dt.datetime | None = None) -> tuple[Credential, ChainInfo]:
    """The receiving side's last step: the chain the delegator sent for our request's ``key``.
    Its leaf must be for our key and the chain must hold together (:func:`inspect_chain`, valid
    now); trusting its CA is for whoever the proxy is presented to."""
    certs = parse_certificates(chain_pem, "the delegated chain")
    if _spki(certs[0]) != _spki(key):
        raise CredentialError(f"the delegated proxy {_dn(certs[0])} is not for the key of our "
                              "request")
    info = inspect_chain(certs, now=_utcnow(now))
    if info.proxy_depth == 0:
        raise CredentialError(f"the delegated certificate {_dn(certs[0])} is not a proxy")
    return Credential(cert=certs[0], key=key, chain=tuple(certs[1:])), info


# --------------------------------------------------------------------------------------------
# Verifying chains

@dataclass(frozen=True)
class ChainInfo:
    """What a verified chain says about its holder.

    ``identity`` is the end-entity DN (what authorization lists name), ``subject`` the leaf's DN,
    ``not_after`` the earliest notAfter along the chain (when the chain as a whole stops being
    valid), ``proxy_depth`` the number of proxies above the end-entity certificate.
    """

    identity: str
    subject: str
    limited: bool
    not_after: _dt.datetime
    proxy_depth: int


def _time(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return _extensions(cert).get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _proxy_rules(chain: Sequence[x509.Certificate]) -> ChainInfo:
    """The RFC 3820 / Globus proxy rules, shared by both verification entry points.

    Only structure and policy: no signatures, no clocks. OpenSSL enforces the naming rules and
    path length already in a TLS handshake; repeating them on its verified chain costs nothing
    and means there is exactly one definition of a valid proxy chain in gwms.
    """
    infos = [_proxy_info(c) for c in chain]
    identity_index = next((i for i, info in enumerate(infos) if info is None), None)
    if identity_index is None:
        raise CredentialError(f"proxy {_dn(chain[-1])} has no end-entity certificate above it in "
                              "the chain; a proxy must be issued by an end-entity certificate "
                              "or another proxy")
    for i in range(identity_index + 1, len(chain)):
        if infos[i] is not None:
            raise CredentialError(
                f"certificate {_dn(chain[i - 1])} is not a proxy but was issued by the proxy "
                f"{_dn(chain[i])}; a proxy can only issue proxies")
    for i in range(identity_index):
        cert, issuer, info = chain[i], chain[i + 1], infos[i]
        assert info is not None
        if info.language not in _KNOWN_POLICIES:
            raise CredentialError(f"proxy {_dn(cert)} has policy language {info.language}, which "
                                  "gwms does not accept (only inheritAll and limited)")
        if cert.issuer != issuer.subject:
            raise CredentialError(f"proxy {_dn(cert)}: its issuer name {dn_string(cert.issuer)} "
                                  f"is not the subject of the next certificate {_dn(issuer)}")
        rdns = list(cert.subject.rdns)
        last = rdns[-1] if rdns else None
        if (len(rdns) != len(issuer.subject.rdns) + 1
                or x509.Name(rdns[:-1]) != issuer.subject
                or last is None or len(last) != 1
                or next(iter(last)).oid != NameOID.COMMON_NAME):
            raise CredentialError(f"proxy {_dn(cert)}: subject does not extend its issuer's "
                                  f"({_dn(issuer)}) by exactly one CN")
        ku = _key_usage(issuer)
        if ku is not None and not ku.digital_signature:
            raise CredentialError(f"certificate {_dn(issuer)} issued proxy {_dn(cert)} but its "
                                  "key usage does not include digitalSignature")
        issuer_info = infos[i + 1]
        if (issuer_info is not None and issuer_info.language == LIMITED_PROXY_OID
                and info.language != LIMITED_PROXY_OID):
            raise CredentialError(f"proxy {_dn(cert)} is a full proxy signed by the limited proxy "
                                  f"{_dn(issuer)}: a limited proxy cannot issue a full proxy")
        # pCPathLenConstraint: how many proxies may appear below this one (i of them do).
        if info.path_len is not None and i > info.path_len:
            raise CredentialError(f"proxy {_dn(cert)} allows {info.path_len} proxies below it, "
                                  f"but the chain has {i}")
    return ChainInfo(
        identity=_dn(chain[identity_index]),
        subject=_dn(chain[0]),
        limited=any(info is not None and info.language == LIMITED_PROXY_OID for info in infos),
        not_after=min(c.not_valid_after_utc for c in chain),
        proxy_depth=identity_index,
    )


def _check_validity(cert: x509.Certificate, now: _dt.datetime, what: str = "certificate") -> None:
    if now < cert.not_valid_before_utc:
        raise CredentialError(f"{what} {_dn(cert)} is not yet valid: valid from "
                              f"{_time(cert.not_valid_before_utc)}")
    if now > cert.not_valid_after_utc:
        raise CredentialError(f"{what} {_dn(cert)} expired at {_time(cert.not_valid_after_utc)}")


def _check_signature(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        raise CredentialError(f"certificate {_dn(cert)} was not issued by {_dn(issuer)}: "
                              "the signature does not verify with its key") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CredentialError(f"certificate {_dn(cert)} was not issued by {_dn(issuer)}: "
                              f"{e}") from None


def _check_links(chain: Sequence[x509.Certificate]) -> None:
    """Each certificate names the next as its issuer and carries its signature."""
    for cert, issuer in zip(chain, chain[1:]):
        if cert.issuer != issuer.subject:
            what = "proxy" if is_proxy(cert) else "certificate"
            raise CredentialError(f"{what} {_dn(cert)} was not issued by {_dn(issuer)}: its "
                                  f"issuer name is {dn_string(cert.issuer)}")
        _check_signature(cert, issuer)


def verify_chain(chain: Sequence[x509.Certificate], trusted: Sequence[x509.Certificate],
                 now: _dt.datetime | None = None) -> ChainInfo:
    """Verify a leaf-first chain up to one of the ``trusted`` CA certificates.

    For chains that did not come through a TLS handshake (delegated or file-based proxies):
    validity periods, each signature, the anchor (a valid CA among ``trusted``), CA flags on
    intermediates, then the proxy rules shared with :func:`chain_info_from_verified`. The chain
    may end with the trusted root or stop below it.
    """
    chain = list(chain)
    if not chain:
        raise CredentialError("empty certificate chain")
    now = _utcnow(now)
    trusted_der = {c.public_bytes(serialization.Encoding.DER) for c in trusted}

    anchor: x509.Certificate | None = None
    if len(chain) > 1 and chain[-1].public_bytes(serialization.Encoding.DER) in trusted_der:
        anchor = chain.pop()

    for cert in chain:
        _check_validity(cert, now)
    _check_links(chain)

    top = chain[-1]
    if anchor is None:
        candidates = [c for c in trusted if c.subject == top.issuer]
        if not candidates:
            raise CredentialError(f"certificate {_dn(top)} was not issued by a trusted CA: no "
                                  f"trusted CA certificate is named {dn_string(top.issuer)}")
        for candidate in candidates:
            try:
                top.verify_directly_issued_by(candidate)
            except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
                continue
            anchor = candidate
            break
        if anchor is None:
            raise CredentialError(f"certificate {_dn(top)} was not issued by the trusted CA "
                                  f"{dn_string(top.issuer)}: the signature does not verify")
    else:
        _check_signature(top, anchor)
    _check_validity(anchor, now, "trusted CA certificate")
    if not _is_ca(anchor):
        raise CredentialError(f"trusted certificate {_dn(anchor)} is not a CA "
                              "(BasicConstraints ca=True missing)")

    full = chain + [anchor]
    for below, cert in zip(full, full[1:]):
        if not is_proxy(below) and not is_proxy(cert) and not _is_ca(cert):
            raise CredentialError(f"certificate {_dn(cert)} issued {_dn(below)} but is not a CA "
                                  "(BasicConstraints ca=True missing)")
    return _proxy_rules(full)


def inspect_chain(chain: Sequence[x509.Certificate], now: _dt.datetime | None = None) -> ChainInfo:
    """What can be checked of a leaf-first chain without trust anchors: each certificate signed
    by the next one, the proxy rules, and (with ``now``) every validity period.

    For a user's own proxy file and for a delegated chain, whose CA the checking daemon need
    not trust (the services the proxy is presented to do that): this says the file is a
    coherent proxy chain, whose identity and lifetime can be believed as far as its holder is
    concerned, not that anyone should accept it."""
    chain = list(chain)
    if not chain:
        raise CredentialError("empty certificate chain")
    if now is not None:
        now = _utcnow(now)
        for cert in chain:
            _check_validity(cert, now)
    _check_links(chain)
    return _proxy_rules(chain)


def chain_info_from_verified(chain: Sequence[x509.Certificate]) -> ChainInfo:
    """Identity and proxy policy for a chain OpenSSL already verified (``[leaf, ..., EEC, CA]``).

    OpenSSL has checked signatures, dates and proxy naming but knows nothing of limited proxies,
    so this applies the shared proxy rules and returns the identity to authorize.
    """
    chain = list(chain)
    if not chain:
        raise CredentialError("empty certificate chain")
    return _proxy_rules(chain)
