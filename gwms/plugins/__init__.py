"""The implementations sites choose between, selected by name in configuration.

A stock name ("x509", "lists", ...) or ``package.module:Class`` for a site's own plugin. Each
plugin class has ``from_config(config: HostConfig)`` and provides its interface (checked with
``verifyObject`` when loaded, so a broken site plugin fails at start-up with its name).
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from gwms.config import ConfigError, HostConfig
from gwms.interfaces import IAuthMethod, IAuthorizer

AUTH_METHODS: Mapping[str, str] = {
    "x509": "gwms.plugins.auth_methods:X509Method",
    "token": "gwms.plugins.auth_methods:TokenMethod",
    "fs": "gwms.plugins.auth_methods:FSMethod",
    "anonymous": "gwms.plugins.auth_methods:AnonymousMethod",
}
IDENTITY_SWITCHES: Mapping[str, str] = {
    "none": "gwms.plugins.identity:NoIdentitySwitch",
    "setuid": "gwms.plugins.identity:SetuidIdentitySwitch",
    "glexec": "gwms.plugins.identity:GlexecIdentitySwitch",
}
GRID_SUBMITTERS: Mapping[str, str] = {
    "local": "gwms.plugins.grid_local:LocalGridSubmitter",
    "slurm": "gwms.plugins.grid_slurm:SlurmGridSubmitter",
    "ssh": "gwms.plugins.grid_ssh:SSHGridSubmitter",
}
AUTHORIZERS: Mapping[str, str] = {
    "lists": "gwms.plugins.authorization:ListAuthorizer",
}


class UnknownPlugin(ConfigError):
    """A configuration names a plugin that does not exist or cannot be loaded."""


def load_plugin(kind: str, name: str, stock: Mapping[str, str], interface: Any, config: HostConfig,
                *args: Any) -> Any:
    """The plugin ``name`` (stock, or package.module:Class), made with ``from_config(config,
    *args)`` (grid submitters also get the reactor) and checked against ``interface``."""
    from zope.interface.exceptions import Invalid
    from zope.interface.verify import verifyObject

    target = stock.get(name, name)
    if ":" not in target:
        raise UnknownPlugin(f"{config.source}: no {kind} named {name!r} (stock ones: "
                            f"{', '.join(stock)}; a site plugin is named package.module:Class)")
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise UnknownPlugin(f"{config.source}: cannot load {kind} {name!r}: {e}") from None
    plugin = cls.from_config(config, *args)
    try:
        verifyObject(interface, plugin)
    except Invalid as e:
        raise UnknownPlugin(f"{config.source}: {kind} {name!r} does not provide "
                            f"{interface.__name__}: {e}") from None
    return plugin


def load_auth_methods(config: HostConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load every authentication method the configuration names (in [security] or any level).

    Returns the methods by their own ``name`` and the level policies with each method written
    as that name, so that ``gwms.testing:FakeAuthMethod`` in a file and ``fake`` on the wire
    and in identities are one thing."""
    import dataclasses

    names: list[str] = list(config.security["methods"])
    for policy in config.levels.values():
        names.extend(m for m in policy.methods if m not in names)
    by_config_name = {name: load_plugin("authentication method", name, AUTH_METHODS, IAuthMethod, config)
                      for name in names}
    methods = {m.name: m for m in by_config_name.values()}
    levels = {level: dataclasses.replace(policy, methods=tuple(by_config_name[m].name for m in policy.methods))
              for level, policy in config.levels.items()}
    return methods, levels


def authorizer(config: HostConfig) -> Any:
    return load_plugin("authorizer", config.security["authorizer"], AUTHORIZERS, IAuthorizer, config)
