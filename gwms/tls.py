"""TLS contexts for the message layer, built directly from ``cryptography`` objects.

Facts from shared/TLS.md shape this module: proxy chains need ``ALLOW_PROXY_CERTS`` on the
server's store; the identity comes from ``get_verified_chain``; contexts are built directly
with pyOpenSSL from cryptography objects (Twisted's CertificateOptions warns about that route).
Hostname checking is done by service-identity after the handshake, for IP literals too, which is
what daemons on 127.0.0.1 and in pools addressed by IP need.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Sequence

from OpenSSL import SSL
from OpenSSL.crypto import X509StoreFlags
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from gwms.credentials.x509 import Credential


class TLSConfigError(Exception):
    """A host credential or CA file that cannot be used for TLS."""


# OpenSSL's X509_V_ERR_* codes that peers actually hit, so refusals can say why.
VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate (unknown CA)",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
    40: "proxy certificates not allowed",
    64: "proxy subject name violation",
}


def _verify_callback(connection: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
    if not ok and getattr(connection, "gwms_verify_error", None) is None:
        from gwms.credentials.x509 import dn_string

        try:
            who = dn_string(cert.to_cryptography().subject)
        except Exception:
            who = "?"
        reason = VERIFY_ERRORS.get(errno, f"verify error {errno}")
        connection.gwms_verify_error = f"{reason}: {who} (depth {depth})"
    return bool(ok)


def verify_error(connection: Any) -> str | None:
    """Why OpenSSL refused the peer's chain on this connection, if it did."""
    return getattr(connection, "gwms_verify_error", None)


def _base_context(method: int, ca_file: Path | None) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
    if ca_file is not None:
        try:
            ctx.load_verify_locations(str(ca_file))
        except SSL.Error as e:
            raise TLSConfigError(f"cannot load CA certificates from {ca_file}: {e}") from None
        # RFC 3820 proxies are refused by OpenSSL unless this flag is set on the store.
        ctx.get_cert_store().set_flags(X509StoreFlags.ALLOW_PROXY_CERTS)
    return ctx


def _use_credential(ctx: SSL.Context, credential: Credential) -> None:
    ctx.use_certificate(credential.cert)
    ctx.use_privatekey(credential.key)
    for extra in credential.chain:
        ctx.add_extra_chain_cert(extra)
    ctx.check_privatekey()


class ServerTLS:
    """The server side: two contexts, one that demands a client certificate (x509) and one that
    does not (tokens, or encryption alone), chosen per connection after negotiation."""

    def __init__(self, credential: Credential, ca_file: Path | None) -> None:
        self.with_client_cert = _base_context(SSL.TLS_SERVER_METHOD, ca_file)
        _use_credential(self.with_client_cert, credential)
        self.with_client_cert.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                                         _verify_callback)
        self.without_client_cert = _base_context(SSL.TLS_SERVER_METHOD, None)
        _use_credential(self.without_client_cert, credential)
        self.without_client_cert.set_verify(SSL.VERIFY_NONE, _verify_callback)
        # Set for a certificate the daemon made itself: clients must be told this to trust it.
        self.fingerprint: str | None = None

    def creator(self, client_certificate: bool) -> "ServerCreator":
        return ServerCreator(self.with_client_cert if client_certificate else self.without_client_cert)


@implementer(IOpenSSLServerConnectionCreator)
class ServerCreator:
    def __init__(self, ctx: SSL.Context) -> None:
        self._ctx = ctx

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        return conn


class ClientTLS:
    """The client side: verifies the server against the CA file and (after the handshake)
    against the host name or IP address it was asked to reach; presents a certificate or proxy
    chain when it has one."""

    def __init__(self, ca_file: Path | None, credential: Credential | None) -> None:
        self.ca_file = ca_file
        self.credential = credential
        self._plain = _base_context(SSL.TLS_CLIENT_METHOD, ca_file)
        self._plain.set_verify(SSL.VERIFY_PEER if ca_file else SSL.VERIFY_NONE, _verify_callback)
        self._with_cert = None
        self._pinned: dict[bool, SSL.Context] | None = None
        if credential is not None:
            self._with_cert = _base_context(SSL.TLS_CLIENT_METHOD, ca_file)
            self._with_cert.set_verify(SSL.VERIFY_PEER if ca_file else SSL.VERIFY_NONE,
                                       _verify_callback)
            _use_credential(self._with_cert, credential)

    def creator(self, hostname: str, present_certificate: bool, pinned: bool = False) -> "ClientCreator":
        """``pinned``: the server is known by the SHA-256 of its certificate (checked after the
        handshake, see ``fingerprint``), not by the CA and its name: a glidein's startd that
        holds only a token serves TLS with a certificate of its own making, whose fingerprint
        it advertised over an authenticated channel."""
        if present_certificate and self._with_cert is None:
            raise TLSConfigError("no certificate or proxy is configured to present")
        if pinned:
            if self._pinned is None:
                self._pinned = {}
            ctx = self._pinned.get(present_certificate)
            if ctx is None:
                ctx = self._pinned[present_certificate] = _base_context(SSL.TLS_CLIENT_METHOD, None)
                ctx.set_verify(SSL.VERIFY_NONE, _verify_callback)
                if present_certificate:
                    assert self.credential is not None
                    _use_credential(ctx, self.credential)
            return ClientCreator(ctx, hostname)
        if self.ca_file is None:
            raise TLSConfigError("no CA certificates are configured to check the server with "
                                 "(set [pool] ca, or GWMS_CA_FILE)")
        return ClientCreator(self._with_cert if present_certificate else self._plain, hostname)


@implementer(IOpenSSLClientConnectionCreator)
class ClientCreator:
    def __init__(self, ctx: SSL.Context, hostname: str) -> None:
        self._ctx = ctx
        self.hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        if not _is_ip(self.hostname):
            conn.set_tlsext_host_name(self.hostname.encode("idna"))
        conn.set_connect_state()
        return conn


def fingerprint(certificate: Any) -> str:
    """The SHA-256 of a certificate's DER, in hex: what a pinned server is known by."""
    from cryptography.hazmat.primitives import hashes, serialization

    digest = hashes.Hash(hashes.SHA256())
    digest.update(certificate.public_bytes(serialization.Encoding.DER))
    return digest.finalize().hex()


def ephemeral_credential(name: str = "gwms ephemeral server") -> Credential:
    """A key and a self-signed certificate made now, for a daemon that serves TLS but holds no
    certificate (a glidein with only a token): clients know it by its fingerprint."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    return Credential(cert=cert, key=key, chain=())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def verify_server_name(certificate: Any, hostname: str) -> None:
    """Raise VerificationError unless ``certificate`` names ``hostname`` (DNS name or IP)."""
    if _is_ip(hostname):
        verify_certificate_ip_address(certificate, hostname)
    else:
        verify_certificate_hostname(certificate, hostname)


def verified_chain(tls_connection: SSL.Connection) -> Sequence[Any] | None:
    """The peer's chain as OpenSSL verified it, leaf first, as cryptography certificates."""
    return tls_connection.get_verified_chain(as_cryptography=True)


__all__ = ["ServerTLS", "ClientTLS", "TLSConfigError", "verify_server_name", "verified_chain",
           "VerificationError", "fingerprint", "ephemeral_credential"]
