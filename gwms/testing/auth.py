from __future__ import annotations

from typing import Any, Mapping

from zope.interface import implementer

from gwms.interfaces import IAuthMethod
from gwms.security import AuthenticationFailed, ChannelFacts, Identity


@implementer(IAuthMethod)
class FakeAuthMethod:
    """Test-only: the client names its identity in the proof (``FakeIdentity``)."""

    name = "fake"
    requires_tls = False
    wants_client_certificate = False
    read_only = False
    local_only = False

    @classmethod
    def from_config(cls, config: Any) -> "FakeAuthMethod":
        return cls()

    def client_can_use(self, credentials: Any, local: bool) -> bool:
        return getattr(credentials, "fake_identity", None) is not None

    def client_proof(self, credentials: Any) -> Mapping[str, Any]:
        return {"FakeIdentity": credentials.fake_identity}

    def authenticate(self, channel: ChannelFacts, proof: Mapping[str, Any]) -> Identity:
        name = proof.get("FakeIdentity")
        if not isinstance(name, str) or not name:
            raise AuthenticationFailed("no FakeIdentity in the proof")
        return Identity(method=self.name, name=name)
