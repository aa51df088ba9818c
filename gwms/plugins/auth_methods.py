"""The stock authentication methods: x509, token, fs and anonymous."""

from __future__ import annotations

import pwd
from typing import Any, Mapping

from zope.interface import implementer

from gwms.config import HostConfig
from gwms.interfaces import IAuthMethod
from gwms.security import AuthenticationFailed, ChannelFacts, Identity


@implementer(IAuthMethod)
class X509Method:
    """TLS client certificates, RFC 3820 proxy chains included (the seed's GSI).

    OpenSSL verifies the chain during the handshake (with proxies allowed); what it does not
    check, the proxy rules (a limited proxy may not issue a full one), is checked here. The
    identity is the end-entity DN; a limited proxy is marked on the identity."""

    name = "x509"
    requires_tls = True
    wants_client_certificate = True
    read_only = False
    local_only = False

    @classmethod
    def from_config(cls, config: HostConfig) -> "X509Method":
        return cls()

    def client_can_use(self, credentials: Any, local: bool) -> bool:
        return credentials.x509 is not None and not local

    def client_proof(self, credentials: Any) -> Mapping[str, Any]:
        return {}

    def authenticate(self, channel: ChannelFacts, proof: Mapping[str, Any]) -> Identity:
        from gwms.credentials.x509 import CredentialError, chain_info_from_verified

        if not channel.verified_chain:
            raise AuthenticationFailed("no verified client certificate")
        try:
            info = chain_info_from_verified(channel.verified_chain)
        except CredentialError as e:
            raise AuthenticationFailed(str(e)) from None
        return Identity(method=self.name, name=info.identity, limited=info.limited)


@implementer(IAuthMethod)
class TokenMethod:
    """Pool-signed bearer tokens (HTCondor IDTOKENS-like), sent once server-authenticated TLS
    protects them. The identity is the token's subject; its scopes bound the levels it may use."""

    name = "token"
    requires_tls = True
    wants_client_certificate = False
    read_only = False
    local_only = False

    def __init__(self, keys: Mapping[str, bytes], issuer: str) -> None:
        self.keys = keys
        self.issuer = issuer

    @classmethod
    def from_config(cls, config: HostConfig) -> "TokenMethod":
        from gwms.credentials.tokens import TokenError, load_signing_key

        keys = {}
        path = config.pool["token_signing_key"]
        if path is not None:
            try:
                keys["POOL"] = load_signing_key(path)
            except TokenError as e:
                from gwms.config import ConfigError

                raise ConfigError(f"{config.source}: [pool] token_signing_key: {e}") from None
        return cls(keys, config.pool["name"])

    def client_can_use(self, credentials: Any, local: bool) -> bool:
        return credentials.token is not None

    def client_proof(self, credentials: Any) -> Mapping[str, Any]:
        return {"Token": credentials.token}

    def authenticate(self, channel: ChannelFacts, proof: Mapping[str, Any]) -> Identity:
        from gwms.credentials.tokens import TokenError, verify_token

        if not self.keys:
            raise AuthenticationFailed("this daemon has no token signing key to check tokens with")
        token = proof.get("Token")
        if not isinstance(token, str):
            raise AuthenticationFailed("no token presented")
        try:
            claims = verify_token(token, self.keys, self.issuer)
        except TokenError as e:
            raise AuthenticationFailed(f"token refused: {e}") from None
        return Identity(method=self.name, name=claims.subject, scopes=claims.scopes)


@implementer(IAuthMethod)
class FSMethod:
    """Local submission: the kernel tells the peer's uid on a UNIX socket (SO_PEERCRED); the
    identity is that uid's account name."""

    name = "fs"
    requires_tls = False
    wants_client_certificate = False
    read_only = False
    local_only = True

    @classmethod
    def from_config(cls, config: HostConfig) -> "FSMethod":
        return cls()

    def client_can_use(self, credentials: Any, local: bool) -> bool:
        return local

    def client_proof(self, credentials: Any) -> Mapping[str, Any]:
        return {}

    def authenticate(self, channel: ChannelFacts, proof: Mapping[str, Any]) -> Identity:
        if not channel.local or channel.peer_uid is None:
            raise AuthenticationFailed("fs authentication needs the local socket")
        try:
            user = pwd.getpwuid(channel.peer_uid).pw_name
        except KeyError:
            raise AuthenticationFailed(f"uid {channel.peer_uid} has no account on this host") from None
        return Identity(method=self.name, name=user)


@implementer(IAuthMethod)
class AnonymousMethod:
    """No proof at all; the identity 'anonymous' may only READ, whatever the lists say."""

    name = "anonymous"
    requires_tls = False
    wants_client_certificate = False
    read_only = True
    local_only = False

    @classmethod
    def from_config(cls, config: HostConfig) -> "AnonymousMethod":
        return cls()

    def client_can_use(self, credentials: Any, local: bool) -> bool:
        return True

    def client_proof(self, credentials: Any) -> Mapping[str, Any]:
        return {}

    def authenticate(self, channel: ChannelFacts, proof: Mapping[str, Any]) -> Identity:
        return Identity(method=self.name, name="anonymous", read_only=True)
