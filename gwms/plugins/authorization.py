"""The stock authorizer: allow and deny lists per level, of identities and of networks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from zope.interface import implementer

from gwms.config import LEVELS, HostConfig, LevelPolicy
from gwms.interfaces import IAuthorizer
from gwms.security import GRANTING, AuthorizationRequest, Decision, peer_ip


@dataclass(frozen=True)
class _Lists:
    level: str
    allow: frozenset[str]
    allow_regex: tuple[re.Pattern[str], ...]
    deny: frozenset[str]
    deny_regex: tuple[re.Pattern[str], ...]
    allow_networks: tuple[Any, ...]
    deny_networks: tuple[Any, ...]


def _compile(level: str, patterns: tuple[str, ...], source: str) -> tuple[re.Pattern[str], ...]:
    from gwms.config import ConfigError

    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{source}: [security.{level}] bad regular expression {p!r}: {e}") from None
    return tuple(compiled)


@implementer(IAuthorizer)
class ListAuthorizer:
    """Deny wins; unlisted is denied.

    For a level, the peer's network must be in ``allow_networks`` and not in ``deny_networks``;
    the identity must not be in the level's deny lists, and must be in the allow lists of the
    level or of a level that implies it (ADMINISTRATOR implies WRITE implies READ; the daemon
    levels imply READ). As in HTCondor, an ADVERTISE_* level with no lists of its own uses
    DAEMON's. ``*`` in an allow list admits anyone, including anonymous clients. An entry
    matches the identity's name, or ``method:name`` to admit a name from one method only;
    regular expressions must match the whole name."""

    def __init__(self, levels: Mapping[str, LevelPolicy], source: str = "<config>") -> None:
        self._lists: dict[str, _Lists] = {}
        for level in LEVELS:
            policy = levels[level]
            names = policy
            if level.startswith("ADVERTISE_") and not policy.lists_configured:
                names = levels["DAEMON"]
            self._lists[level] = _Lists(
                level=level if names is policy else "DAEMON",
                allow=frozenset(names.allow), allow_regex=_compile(level, names.allow_regex, source),
                deny=frozenset(names.deny), deny_regex=_compile(level, names.deny_regex, source),
                allow_networks=policy.allow_networks, deny_networks=policy.deny_networks)

    @classmethod
    def from_config(cls, config: HostConfig) -> "ListAuthorizer":
        return cls(config.levels, config.source)

    def authorize(self, request: AuthorizationRequest) -> Decision:
        level = request.level
        lists = self._lists[level]
        ip = peer_ip(request.peer_host)
        if ip is not None:
            for net in lists.deny_networks:
                if ip.version == net.version and ip in net:
                    return Decision(False, f"deny_networks[{level}] {net}")
            if not any(ip.version == net.version and ip in net for net in lists.allow_networks):
                return Decision(False, f"allow_networks[{level}] does not include {ip}")
        identity = request.identity
        names = identity.names
        for name in names:
            if name in lists.deny:
                return Decision(False, f"deny[{lists.level}] {name!r}")
            for pattern in lists.deny_regex:
                if pattern.fullmatch(name):
                    return Decision(False, f"deny_regex[{lists.level}] {pattern.pattern!r}")
        for granting in sorted(GRANTING[level], key=lambda lv: lv != level):
            allow = self._lists[granting]
            if "*" in allow.allow:
                return Decision(True, f"allow[{allow.level}] '*'")
            for name in names:
                if name in allow.allow:
                    return Decision(True, f"allow[{allow.level}] {name!r}")
                for pattern in allow.allow_regex:
                    if pattern.fullmatch(name):
                        return Decision(True, f"allow_regex[{allow.level}] {pattern.pattern!r}")
        return Decision(False, f"{identity.name!r} is not listed for {level}")
