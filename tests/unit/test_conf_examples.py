"""The example configurations under conf/ load and pass the checks of the roles they are meant
for, and conf/fermilab's five hosts agree with each other.

Every TOML file under conf/ is found by glob, so a new example is covered without touching this
file. The roles a file is meant for are the ``twistd -n gwms-<role> --config .../<file>`` lines
in its own text or in the README.md next to it; every example must have at least one.

The files name credentials (CA bundles, host certificates, pilot proxies, SSH keys) that do not
exist here. ``load_config`` does not open them: it checks the schema and resolves paths. What
opens them is the roles' start-up (host credentials for TLS, the token signing key, the
frontend's own certificate for its identity). So each role's start-up checks run here on the
configuration with the [pool] credential paths removed. The fermilab identities come from real
certificates and a pilot proxy, made in a temporary directory with the project's own CA code and
read with the frontend's own ``own_identity``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from gwms.config import LEVELS, HostConfig, load_config, parse_address
from gwms.interfaces import IGridSubmitter
from gwms.plugins import GRID_SUBMITTERS, authorizer, load_auth_methods, load_plugin
from gwms.security import AuthorizationRequest, Identity

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
EXAMPLES = sorted(CONF.rglob("*.toml"))
FERMILAB = CONF / "fermilab"

TWISTD = re.compile(r"twistd -n gwms-([a-z]+) --config (\S+\.toml)")
ROLES = ("collector", "negotiator", "schedd", "startd", "factory", "frontend", "gcb", "pool")
# gwms-pool runs these roles in one process, from the one file.
POOL_ROLES = ("collector", "negotiator", "schedd", "factory", "frontend")
# The [pool] keys naming files that a role's start-up reads.
CREDENTIAL_KEYS = ("ca", "cert", "key", "proxy", "token", "token_signing_key")
WILDCARDS = ("0.0.0.0", "::", "")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def documented_roles(path: Path) -> set[str]:
    """The roles the example's own text, or the README.md next to it, says to run it with."""
    texts = [path.read_text(encoding="utf-8")]
    readme = path.parent / "README.md"
    if readme.exists():
        texts.append(readme.read_text(encoding="utf-8"))
    return {role for text in texts for role, config in TWISTD.findall(text) if Path(config).name == path.name}


def without_credentials(config: HostConfig) -> HostConfig:
    """The configuration as if no credential files were configured, so that start-up code that
    would open them can run here."""
    return dataclasses.replace(config, pool={**config.pool, **{k: None for k in CREDENTIAL_KEYS}})


def raw_sections(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


# -- every example ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES, ids=rel)
def test_example_loads_and_passes_the_checks_of_its_roles(path):
    config = load_config(path)
    roles = documented_roles(path)
    assert roles, f"{rel(path)}: no 'twistd -n gwms-<role> --config {path.name}' line in it or its README.md"
    assert roles <= set(ROLES), roles
    # What every daemon builds at start-up from [security]: the authorizer (its regular
    # expressions compiled) and the authentication methods.
    authorizer(config)
    load_auth_methods(without_credentials(config))
    raw = raw_sections(path)
    for role in roles:
        for checked in (POOL_ROLES if role == "pool" else (role,)):
            ROLE_CHECKS[checked](path, config, raw, required=role != "pool" or checked in ("factory", "frontend"))


def check_collector(path: Path, config: HostConfig, raw: dict[str, Any], required: bool) -> None:
    from gwms.collector.service import Collector

    assert not required or "collector" in raw, f"{rel(path)}: gwms-collector but no [collector]"
    Collector(Clock(), config.section("collector"), "example")


def _advertised_listen(path: Path, config: HostConfig, raw: dict[str, Any], role: str, required: bool) -> None:
    """A role that advertises the address it listens on must listen on an address others can
    reach, not a wildcard (unless it is reached only through brokers)."""
    assert not required or role in raw, f"{rel(path)}: gwms-{role} but no [{role}]"
    host, _port = config.section(role)["listen"]
    if not (config.pool["brokers"] and config.pool["broker_only"]):
        assert host not in WILDCARDS, f"{rel(path)}: [{role}] listen {host!r} would be advertised as it is"


def check_negotiator(path, config, raw, required):
    _advertised_listen(path, config, raw, "negotiator", required)


def check_schedd(path, config, raw, required):
    _advertised_listen(path, config, raw, "schedd", required)


def check_startd(path, config, raw, required):
    _advertised_listen(path, config, raw, "startd", required)


def check_factory(path: Path, config: HostConfig, raw: dict[str, Any], required: bool) -> None:
    from gwms.factory.cycle import Factory

    assert not required or "factory" in raw, f"{rel(path)}: gwms-factory but no [factory]"
    entries = config.section("factory")["entry"]
    assert entries, f"{rel(path)}: a factory without entries submits nothing"
    # The factory's own start-up checks (pilot_token needs a signing key; http_proxy is a URL);
    # each grid plugin checks its entries in test_factory_loads_the_grid_plugins_of_the_example.
    Factory(None, without_credentials(config), None, {}, None, "http://factory.invalid/", "")
    for name, entry in entries.items():
        where = f"{rel(path)} [factory.entry.{name}]"
        assert entry["grid"] in GRID_SUBMITTERS or ":" in entry["grid"], f"{where}: unknown grid {entry['grid']!r}"
        # A request counts only if its frontend is listed: an entry that lists none never submits.
        assert entry["allowed_frontends"], f"{where}: no allowed_frontends"


def check_frontend(path: Path, config: HostConfig, raw: dict[str, Any], required: bool) -> None:
    from gwms.frontend.service import Frontend

    assert not required or "frontend" in raw, f"{rel(path)}: gwms-frontend but no [frontend]"
    assert config.section("frontend")["group"], f"{rel(path)}: a frontend without groups asks for nothing"
    # The frontend's own start-up checks (trusted must name the schedds), minus its certificate.
    Frontend(None, without_credentials(config), None, None, None)


def check_gcb(path: Path, config: HostConfig, raw: dict[str, Any], required: bool) -> None:
    assert not required or "gcb" in raw, f"{rel(path)}: gwms-gcb but no [gcb]"
    level = config.section("gcb")["registration_level"]
    assert level in LEVELS, f"{rel(path)}: [gcb] registration_level {level!r} is no authorization level"


ROLE_CHECKS = {"collector": check_collector, "negotiator": check_negotiator, "schedd": check_schedd,
               "startd": check_startd, "factory": check_factory, "frontend": check_frontend, "gcb": check_gcb}


def grid_plugins() -> list[Any]:
    out = []
    for path in EXAMPLES:
        raw = raw_sections(path)
        kinds = {e.get("grid", "local") for e in raw.get("factory", {}).get("entry", {}).values()}
        out += [pytest.param(path, kind, id=f"{rel(path)}-{kind}") for kind in sorted(kinds)]
    return out


@pytest.mark.parametrize("path, kind", grid_plugins())
def test_factory_loads_the_grid_plugins_of_the_example(path, kind):
    """What gwms-factory does at start-up for each grid its entries use: load the plugin, which
    checks the entries it serves."""
    target = GRID_SUBMITTERS.get(kind, kind)
    module = target.partition(":")[0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the {kind!r} grid plugin ({module}) is not in this tree")
    config = without_credentials(load_config(path))
    plugin = load_plugin("grid submitter", kind, GRID_SUBMITTERS, IGridSubmitter, config, MemoryReactorClock())
    assert plugin is not None


# -- conf/fermilab: five hosts that must agree -------------------------------------------------

FERMILAB_ROLES = {
    "factory.toml": {"collector", "factory"},
    "pool.toml": {"collector", "negotiator", "frontend", "gcb"},
    "schedd1.toml": {"schedd"},
    "schedd2.toml": {"schedd"},
    "schedd3.toml": {"schedd"},
}
SCHEDDS = ("schedd1.toml", "schedd2.toml", "schedd3.toml")
README = FERMILAB / "README.md"


@pytest.fixture(scope="module")
def fermilab() -> dict[str, HostConfig]:
    return {name: load_config(FERMILAB / name) for name in FERMILAB_ROLES}


def test_fermilab_readme_runs_every_file_with_the_seeds_roles():
    assert sorted(p.name for p in FERMILAB.glob("*.toml")) == sorted(FERMILAB_ROLES)
    for name, roles in FERMILAB_ROLES.items():
        assert documented_roles(FERMILAB / name) == roles, name


def host_of(config: HostConfig, role: str) -> str:
    return config.section(role)["listen"][0]


def test_fermilab_addresses_agree(fermilab):
    factory, pool = fermilab["factory.toml"], fermilab["pool.toml"]
    frontend = pool.section("frontend")
    schedds = [fermilab[name] for name in SCHEDDS]

    # The glidein collector runs on the factory host; the factory and the frontend use it.
    glidein_collector = factory.section("collector")["listen"]
    assert host_of(factory, "collector") == "factory.example.org"
    assert factory.section("factory")["collectors"] == [glidein_collector]
    assert frontend["glidein_collectors"] == [glidein_collector]
    # The pool collector runs on the pool host; the frontend, the glideins (through the
    # frontend's requests) and every schedd use it.
    pool_collector = pool.section("collector")["listen"]
    assert host_of(pool, "collector") == "pool.example.org"
    assert pool.pool["collectors"] == [pool_collector]
    assert frontend["pool_collectors"] == [pool_collector]
    for schedd in schedds:
        assert schedd.pool["collectors"] == [pool_collector], schedd.source
        assert schedd.section("schedd")["negotiator"] == pool.section("negotiator")["listen"], schedd.source
    # Three schedds, each its own name and address, all of which the frontend reads.
    names = [s.section("schedd")["name"] for s in schedds]
    listens = [s.section("schedd")["listen"] for s in schedds]
    assert len(set(names)) == len(set(listens)) == 3, (names, listens)
    for name, schedd in zip(SCHEDDS, schedds):
        assert host_of(schedd, "schedd") == f"{Path(name).stem}.example.org"
    assert sorted(parse_address(a) for a in frontend["schedds"]) == sorted(listens)
    # The glideins fetch their files from the factory host and register with the pool host's broker.
    assert factory.section("factory")["web_url"].startswith("http://factory.example.org:")
    gcb = pool.section("gcb")
    for name, entry in factory.section("factory")["entry"].items():
        assert [parse_address(b) for b in entry["brokers"]] == [gcb["listen"]], name
    assert gcb["public_host"] == host_of(pool, "gcb")


@pytest.fixture(scope="module")
def identities(fermilab, tmp_path_factory) -> dict[str, str]:
    """Who each host is (its host certificate, as the README's commands make it) and who the
    glideins are (a proxy of the pilot certificate), read as the frontend reads its own."""
    from gwms.credentials.ca import init_ca, issue_host, issue_pilot
    from gwms.credentials.x509 import create_proxy, load_credential, write_credential
    from gwms.frontend.service import own_identity

    readme = README.read_text(encoding="utf-8")
    hosts = {"factory.toml": host_of(fermilab["factory.toml"], "collector"),
             "pool.toml": host_of(fermilab["pool.toml"], "collector"),
             **{name: host_of(fermilab[name], "schedd") for name in SCHEDDS}}
    assert sorted(re.findall(r"gwms ca issue ca --host (\S+)", readme)) == sorted(hosts.values())
    [pilot_name] = re.findall(r'gwms ca issue ca --pilot (\S+)', readme)

    ca = tmp_path_factory.mktemp("fermilab-ca")
    init_ca(ca, name="FNAL CMS gwms CA")
    out = {}
    for name, host in hosts.items():
        cert, key = issue_host(ca, host)
        config = fermilab[name]
        out[name] = own_identity(dataclasses.replace(config, pool={**config.pool, "proxy": None, "cert": cert,
                                                                     "key": key}))
    cert, key = issue_pilot(ca, pilot_name)
    proxy = ca / "pilot-proxy.pem"
    write_credential(proxy, create_proxy(load_credential(cert, key), hours=12))
    pool = fermilab["pool.toml"]
    out["pilot"] = own_identity(dataclasses.replace(pool, pool={**pool.pool, "proxy": proxy}))
    return out


def allowed(config: HostConfig, level: str, identity: str, method: str = "x509") -> bool:
    request = AuthorizationRequest(Identity(method=method, name=identity), "192.0.2.99", "TEST", level)
    return authorizer(config).authorize(request).allowed


def test_fermilab_identities_agree(fermilab, identities):
    factory, pool = fermilab["factory.toml"], fermilab["pool.toml"]
    frontend_id, factory_id, pilot = identities["pool.toml"], identities["factory.toml"], identities["pilot"]
    schedd_ids = [identities[name] for name in SCHEDDS]
    assert len({frontend_id, factory_id, pilot, *schedd_ids}) == 6, identities

    # Every entry counts the frontend's requests.
    for name, entry in factory.section("factory")["entry"].items():
        assert frontend_id in entry["allowed_frontends"], name
    # The glidein collector: the factory advertises entries, the frontend requests, and neither
    # (nor a glidein, which holds the pilot proxy) can pose as the other.
    assert allowed(factory, "ADVERTISE_FACTORY", factory_id)
    assert allowed(factory, "ADVERTISE_FRONTEND", frontend_id)
    assert not allowed(factory, "ADVERTISE_FACTORY", frontend_id)
    assert not allowed(factory, "ADVERTISE_FRONTEND", factory_id)
    for level in ("ADVERTISE_FACTORY", "ADVERTISE_FRONTEND", "DAEMON", "ADMINISTRATOR"):
        assert not allowed(factory, level, pilot), level
    # The pool: schedds advertise themselves and ask for cycles, the negotiator reads private
    # attributes, glideins advertise slots and register with the broker, and nothing else.
    for schedd_id in schedd_ids:
        for level in ("ADVERTISE_SCHEDD", "WRITE", "DAEMON"):
            assert allowed(pool, level, schedd_id), (level, schedd_id)
        assert not allowed(pool, "ADVERTISE_STARTD", schedd_id)
    assert allowed(pool, "NEGOTIATOR", frontend_id)  # the pool host's certificate: negotiator and frontend
    assert allowed(pool, "ADVERTISE_STARTD", pilot)
    assert allowed(pool, pool.section("gcb")["registration_level"], pilot)
    for level in ("ADVERTISE_SCHEDD", "NEGOTIATOR", "DAEMON", "WRITE", "ADVERTISE_FACTORY", "ADVERTISE_FRONTEND",
                  "ADVERTISE_MASTER"):
        assert not allowed(pool, level, pilot), level
    # The glideins' startds accept claims from the schedds, as the frontend tells them.
    assert sorted(pool.section("frontend")["trusted"]) == sorted(schedd_ids)
    # Every schedd: the negotiator may match, local users submit, nobody else writes.
    for name in SCHEDDS:
        schedd = fermilab[name]
        assert allowed(schedd, "NEGOTIATOR", frontend_id), name
        assert not allowed(schedd, "NEGOTIATOR", pilot), name
        assert allowed(schedd, "WRITE", "alice", method="fs"), name
        assert not allowed(schedd, "WRITE", "root", method="fs"), name
        assert not allowed(schedd, "WRITE", pilot), name
        assert allowed(schedd, "READ", "anonymous", method="anonymous"), name
