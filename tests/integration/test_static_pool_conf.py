"""conf/static-pool.toml works when its credentials are made with the commands its header names, and
a second collector instance serves as the glideinWMS collector with its own configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from gwms import classads
from gwms.config import load_config
from gwms.protocols.client import Address, ClientSecurity, CollectorList, query_ads

ROOT = Path(__file__).resolve().parents[2]


def onehost_in(tmp_path: Path, gwms_cli) -> Path:
    """conf/static-pool.toml copied to tmp_path, its header's commands run there, on a free port."""
    text = (ROOT / "conf" / "static-pool.toml").read_text()
    commands = re.findall(r"^#\s+gwms ((?:ca|token) .+)$", text, flags=re.M)
    assert len(commands) == 4, commands
    for command in commands:
        args = command.replace("conf/creds", str(tmp_path / "creds")).replace("$USER", "alice")
        args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args)]
        result = gwms_cli(*args)
        assert result.returncode == 0, (command, result.stderr)
    text = text.replace('listen = "127.0.0.1:9618"', 'listen = "127.0.0.1:0"\naddress_file = "collector.address"')
    config = tmp_path / "static-pool.toml"
    config.write_text(text)
    return config


@pytest_twisted.inlineCallbacks
def test_onehost_example_runs_with_the_credentials_its_header_makes(tmp_path, start_daemon, gwms_cli):
    config = onehost_in(tmp_path, gwms_cli)
    collector = start_daemon("collector", config, tmp_path)
    security = ClientSecurity.from_config(load_config(config))
    collectors = CollectorList(reactor, [Address.parse(collector.address)], security)
    slot = classads.parse_new('[MyType = "Machine"; Name = "slot1@localhost"; Cpus = 1]')
    [reply] = yield collectors.advertise(slot, "ADVERTISE_STARTD")
    assert reply["Accepted"]
    status = gwms_cli("status", "--config", str(config), "--pool", collector.address)
    assert "slot1@localhost" in status.stdout, status.stderr
    collectors.close()


GLIDEIN_COLLECTOR = """
[pool]
name = "glideins"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
token_signing_key = "{signing_key}"

[security.READ]
allow = ["*"]

[security.ADVERTISE_FACTORY]
allow = ["token:factory@example.org"]

[security.ADVERTISE_FRONTEND]
allow = ["token:frontend@example.org"]

[collector]
listen = "127.0.0.1:0"
address_file = "collector.address"
"""


@pytest_twisted.inlineCallbacks
def test_a_second_instance_is_the_glidein_collector(creds, tmp_path, start_daemon):
    workdir = tmp_path / "glidein-collector"
    workdir.mkdir()
    config = workdir / "collector.toml"
    config.write_text(GLIDEIN_COLLECTOR.format(ca=creds.ca, cert=creds.host_cert, key=creds.host_key,
                                               signing_key=creds.signing_key))
    collector = start_daemon("collector", config, workdir)

    def as_token(subject: str, scopes: list[str]) -> CollectorList:
        token = tokens_dir / subject
        token.write_text(creds.token(subject, scopes, issuer="glideins"))
        cfg = tokens_dir / f"{subject}.toml"
        cfg.write_text(f'[pool]\nname = "glideins"\nca = "{creds.ca}"\ntoken = "{token}"\n')
        return CollectorList(reactor, [Address.parse(collector.address)], ClientSecurity.from_config(load_config(cfg)))

    tokens_dir = tmp_path / "tokens"
    tokens_dir.mkdir()
    factory = as_token("factory@example.org", ["ADVERTISE_FACTORY"])
    frontend = as_token("frontend@example.org", ["ADVERTISE_FRONTEND"])
    entry = classads.parse_new('[MyType = "glidefactory"; Name = "entry_A@gfactory"; GLIDEIN_Site = "A"]')
    request = classads.parse_new('[MyType = "glideclient"; Name = "entry_A@gfactory@fe"; ReqIdleGlideins = 5]')
    [r1] = yield factory.advertise(entry, "ADVERTISE_FACTORY")
    [r2] = yield frontend.advertise(request, "ADVERTISE_FRONTEND")
    [r3] = yield frontend.advertise(entry, "ADVERTISE_FACTORY")  # a frontend may not pose as a factory
    assert r1["Accepted"] and r2["Accepted"]
    assert "PERMISSION_DENIED" in r3.getErrorMessage()
    [got] = yield query_ads(factory, "glideclient")
    assert got["ReqIdleGlideins"] == 5 and got["AuthenticatedIdentity"] == "frontend@example.org"
    factory.close()
    frontend.close()
