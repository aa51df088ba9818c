"""The factory's cycle in memory: requests, limits, submission rate, tracking, removal, restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from gwms import classads
from gwms.collector.service import Collector
from gwms.config import parse_config
from gwms.factory.grid import HELD, QUEUED, RUNNING
from gwms.factory.records import GlideinRecords
from gwms.factory.cycle import Factory
from gwms.protocols.client import Address, CollectorList, query_ads
from gwms.protocols.messages import Limits, MessageServerFactory
from gwms.security import Auditor
from gwms.testing.grid import FakeGridSubmitter
from gwms.testing.network import TEST_SECURITY, MemoryNetwork, memory_client_security, memory_security

COLLECTOR = "glidein-collector.memory:9620"

CONFIG = TEST_SECURITY + """
[pool]
collectors = ["glidein-collector.memory:9620"]
[security.READ]
allow = ["*"]
[security.ADVERTISE_FACTORY]
allow = ["factory"]
[security.ADVERTISE_FRONTEND]
allow = ["frontend1", "frontend2", "mallory"]
[factory]
name = "f1"
work_dir = "{work}"
token_signing_key = "{work}/../pool.key"
cycle_interval = 10
stale_after = 3600
[factory.entry.A]
grid = "fake"
attributes = {{GLIDEIN_Site = "SiteA", GLIDEIN_CPUS = 2}}
allowed_frontends = ["frontend1", "frontend2"]
max_idle = 8
max_glideins = 12
max_held = 3
submit_rate = 600
frontend_limits = {{frontend2 = {{max_idle = 2}}}}
[factory.entry.B]
grid = "fake"
attributes = {{GLIDEIN_Site = "SiteB"}}
allowed_frontends = ["frontend1"]
submit_rate = 60
enabled = {enabled_b}
[factory.entry.D]
grid = "fake"
allowed_frontends = ["frontend1"]
pilot_token = true
max_walltime = 7200
[factory.entry.C]
grid = "fake"
allowed_frontends = ["frontend1"]
submit_rate = 600
frontend_limits = {{frontend1 = {{submit_rate = 6}}}}
"""


class Env:
    def __init__(self, tmp_path: Path, enabled_b: bool = True) -> None:
        self.tmp_path = tmp_path
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        from gwms.credentials.tokens import generate_signing_key

        (tmp_path / "factory").mkdir(exist_ok=True)
        generate_signing_key(tmp_path / "pool.key")
        self.config = parse_config(CONFIG.format(work=tmp_path / "factory", enabled_b=str(enabled_b).lower()),
                                   "<test>", base=tmp_path)
        self.net = MemoryNetwork(self.clock)
        settings = parse_config(TEST_SECURITY).section("collector")
        self.collector = Collector(self.clock, settings, "glidein-collector")
        self.net.listen(COLLECTOR, MessageServerFactory(self.clock, memory_security(self.config),
                                                        self.collector.commands(), Limits()))
        self.grid = FakeGridSubmitter()
        self.audit_file = tmp_path / "audit.jsonl"
        self.records = GlideinRecords(tmp_path / "factory" / "factory.db")
        self.factory = self.make_factory()

    def collectors(self, identity: str) -> CollectorList:
        return CollectorList(self.clock, [Address(host="glidein-collector.memory", port=9620)],
                             memory_client_security(self.config, identity), connector=self.net.connector)

    def make_factory(self) -> Factory:
        from gwms.factory.service import factory_key

        self.private_key, self.public_key = factory_key(self.tmp_path / "factory" / "factory_key.pem")
        factory = Factory(self.clock, self.config, self.records, {"fake": self.grid}, self.collectors("factory"),
                          "http://factory.memory/", self.public_key, Auditor(self.audit_file), self.private_key)
        for entry in factory.entries.values():
            entry.description = "0" * 64
        return factory

    def run(self, d: defer.Deferred) -> object:
        out: list = []
        d.addBoth(out.append)
        for _ in range(50):
            if out:
                break
            self.net.flush()
            self.clock.advance(0)
        assert out, "the deferred never fired"
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    def request(self, identity: str, entry: str, idle: int, max_glideins: int = 100, remove: str = "NO",
                client: str | None = None, **extra: object) -> None:
        ad = classads.ClassAd()
        client = client or f"{identity}.main"
        ad["MyType"] = "glideclient"
        ad["Name"] = f"{entry}@f1@{client}"
        ad["ClientName"] = client
        ad["ReqFactory"] = "f1"
        ad["ReqEntry"] = entry
        ad["ReqName"] = f"{entry}@f1"
        ad["ReqIdleGlideins"] = idle
        ad["ReqMaxGlideins"] = max_glideins
        ad["ReqRemoveExcess"] = remove
        ad["GLIDEIN_Collector"] = "pool.memory:9618"
        ad["GLIDEIN_Trusted"] = ["/CN=schedd"]
        for key, value in extra.items():
            ad[key] = value
        self.run(self.collectors(identity).advertise(ad, "ADVERTISE_FRONTEND"))

    def cycle(self, advance: float = 10) -> None:
        self.clock.advance(advance)
        self.run(self.factory.cycle())

    def ads(self, ad_type: str) -> list[classads.ClassAd]:
        return self.run(query_ads(self.collectors("reader"), ad_type))  # type: ignore[return-value]

    def states(self, entry: str = "A") -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.records.of_entry(entry):
            out[g.state] = out.get(g.state, 0) + 1
        return out


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def test_the_factory_keeps_the_requested_idle_glideins_and_advertises_its_entries(env):
    env.request("frontend1", "A", idle=5)
    env.cycle()
    assert env.states() == {QUEUED: 5}
    [submitted] = [c for c in env.grid.calls if c[0] == "submit"]
    assert submitted == ("submit", "A", 5)
    args = list(next(iter(env.grid.submissions.values())).arguments)
    assert args[args.index("-collectors") + 1] == "pool.memory:9618"
    assert args[args.index("-trusted") + 1] == "/CN=schedd" and args[args.index("-client") + 1] == "frontend1.main"
    assert args[args.index("-credential_margin") + 1] == "300" and args[args.index("-lifetime") + 1] == "86400"
    env.cycle()  # still 5 idle: nothing more
    assert env.states() == {QUEUED: 5}
    env.grid.start(3)
    env.cycle()  # 3 started: 3 more to keep 5 idle
    assert env.states() == {QUEUED: 5, RUNNING: 3}
    entries = {ad["EntryName"]: ad for ad in env.ads("glidefactory")}
    assert sorted(entries) == ["A", "B", "C", "D"]
    assert entries["A"]["GLIDEIN_Site"] == "SiteA" and entries["A"]["GLIDEIN_CPUS"] == 2
    assert entries["A"]["PubKeyValue"].startswith("-----BEGIN PUBLIC KEY-----")
    assert entries["A"]["AuthenticatedIdentity"] == "factory"
    [monitor] = env.ads("glidefactoryclient")
    assert (monitor["ReqClientName"], monitor["GlideinMonitorRequestedIdle"], monitor["GlideinMonitorStatusIdle"],
            monitor["GlideinMonitorStatusRunning"]) == ("frontend1.main", 5, 5, 3)
    # one status query per entry per cycle, however many glideins
    assert [c for c in env.grid.calls if c[0] == "query" and c[1] == "A"] == [
        ("query", "A", 0), ("query", "A", 5), ("query", "A", 5)]


def test_a_request_from_a_frontend_not_allowed_for_the_entry_submits_nothing_and_is_audited(env):
    env.request("mallory", "A", idle=5)
    env.request("frontend2", "B", idle=5)  # frontend2 may use A only
    env.cycle()
    env.cycle()
    assert env.grid.submissions == {}
    events = [json.loads(line) for line in env.audit_file.read_text().splitlines()]
    assert sorted((e["identity"], e["entry"], e["reason"]) for e in events) == [
        ("frontend2", "B", "not in the entry's allowed_frontends"),
        ("mallory", "A", "not in the entry's allowed_frontends")]  # once each, not every cycle


def test_entry_and_frontend_limits_and_the_submit_rate_bound_submission(env):
    env.request("frontend1", "A", idle=50, max_glideins=100)
    env.request("frontend2", "A", idle=50)
    env.request("frontend1", "B", idle=80)
    env.cycle()
    by_client = {}
    for g in env.records.of_entry("A"):
        by_client[g.client] = by_client.get(g.client, 0) + 1
    assert by_client == {"frontend1.main": 6, "frontend2.main": 2}  # frontend2 max_idle 2; entry max_idle 8
    assert len(env.records.of_entry("B")) == 60  # B's rate: 60 a minute, a minute's worth at once
    env.grid.start()
    env.cycle()
    assert env.states()[QUEUED] + env.states()[RUNNING] == 12  # A's max_glideins
    assert len(env.records.of_entry("B")) == 70  # 10 s of 60 a minute later: 10 more
    env.cycle(advance=5)
    assert len(env.records.of_entry("B")) == 75


def test_a_frontends_own_submit_rate_at_an_entry_bounds_its_submissions(env):
    env.request("frontend1", "C", idle=50)
    env.cycle()
    assert len(env.records.of_entry("C")) == 6  # a minute's worth of its 6 a minute
    env.cycle(advance=10)
    assert len(env.records.of_entry("C")) == 7
    env.cycle(advance=120)  # the bucket holds at most a minute's worth
    assert len(env.records.of_entry("C")) == 13


def test_held_glideins_are_removed_and_too_many_held_stop_submission(env):
    env.request("frontend1", "A", idle=4)
    env.cycle()
    for grid_id in env.grid.in_state(QUEUED):
        env.grid.hold(grid_id)
    env.cycle()
    assert ("remove", "A", 4) in env.grid.calls  # held: removed at once
    env.cycle()
    assert HELD not in env.states()


def test_remove_excess_idle_removes_the_newest_idle_glideins_beyond_the_request(env):
    env.request("frontend1", "A", idle=6)
    env.cycle()
    env.grid.start(2)
    env.request("frontend1", "A", idle=1, remove="IDLE")
    env.cycle()
    assert ("remove", "A", 3) in env.grid.calls  # 4 idle, 1 wanted; running ones stay
    env.cycle()
    assert env.states() == {QUEUED: 1, RUNNING: 2}


def test_a_disabled_entry_submits_nothing_but_is_advertised(tmp_path):
    env = Env(tmp_path, enabled_b=False)
    env.request("frontend1", "B", idle=5)
    env.cycle()
    assert env.records.of_entry("B") == []
    [b] = [ad for ad in env.ads("glidefactory") if ad["EntryName"] == "B"]
    assert b["GlideinEnabled"] is False


def test_a_restarted_factory_finds_its_glideins_and_submits_no_duplicates(env):
    env.request("frontend1", "A", idle=5)
    env.cycle()
    env.records.close()
    env.records = GlideinRecords(env.tmp_path / "factory" / "factory.db")
    env.factory = env.make_factory()  # same grid, new factory process
    env.cycle()
    env.cycle()
    assert len(env.grid.submissions) == 5 and env.states() == {QUEUED: 5}


def test_a_glidein_recorded_but_never_handed_to_the_grid_counts_until_it_is_stale(env):
    env.grid.fail_submit = "the CE is down"
    env.request("frontend1", "A", idle=3)
    env.cycle()
    assert env.records.of_entry("A") == []  # the failed submission is not left recorded
    env.grid.fail_submit = None
    env.cycle()
    assert env.states() == {QUEUED: 3}


def test_finished_glideins_are_forgotten_and_replaced(env):
    env.request("frontend1", "A", idle=2)
    env.cycle()
    first = env.grid.in_state(QUEUED)
    env.grid.start()
    for grid_id in first:
        env.grid.finish(grid_id)
    env.cycle()
    assert all(g.grid_id not in first for g in env.records.of_entry("A"))
    assert env.states() == {QUEUED: 2}


@pytest.mark.parametrize("url, description, passed", [
    ("http://frontend.example:8080/", "a" * 64, True),
    ("http://frontend.example:8080/", "A" * 64, False),  # not a lowercase sha256
    ("http://frontend.example:8080/", "a" * 63, False),
    ("file:///etc/", "a" * 64, False),  # only http(s)
])
def test_a_frontends_own_files_reach_the_glideins_only_as_a_well_formed_url_and_hash(env, url, description, passed):
    env.request("frontend1", "A", idle=1, ClientWebURL=url, ClientDescription=description)
    env.cycle()
    args = list(next(iter(env.grid.submissions.values())).arguments)
    if passed:
        assert args[args.index("-client_web") + 1] == url and args[args.index("-client_descript") + 1] == description
    else:
        assert "-client_web" not in args and "-client_descript" not in args


def test_a_frontends_sealed_pilot_credential_goes_to_its_glideins(env):
    from gwms.credentials.sealed import seal

    sealed = seal(env.public_key, {"identity": "frontend1", "credential": "PILOT PROXY PEM\n"})
    env.request("frontend1", "A", idle=2, GlideinEncryptedCredential=sealed)
    env.cycle()
    [credential] = {g.credential for g in env.grid.submissions.values()}
    assert credential.read_text() == "PILOT PROXY PEM\n" and oct(credential.stat().st_mode & 0o777) == "0o600"


def test_a_sealed_credential_that_names_another_identity_is_refused_with_its_request(env):
    from gwms.credentials.sealed import seal

    # frontend2 seals a credential claiming to be frontend1 (or copied frontend1's sealed ad)
    forged = seal(env.public_key, {"identity": "frontend1", "credential": "SOMEONE ELSE'S PROXY\n"})
    env.request("frontend2", "A", idle=2, GlideinEncryptedCredential=forged)
    env.request("frontend1", "A", idle=1, client="frontend1.other", GlideinEncryptedCredential="garbage")
    env.cycle()
    assert env.grid.submissions == {}
    events = [json.loads(line) for line in env.audit_file.read_text().splitlines()]
    assert sorted((e["identity"], e["reason"]) for e in events) == [
        ("frontend1", "its sealed credential: cannot open the sealed credential (Error: it was not sealed for this "
                      "factory's key, or it was changed)"),
        ("frontend2", "its sealed credential names 'frontend1', not the frontend that advertised it")]
    assert not (env.tmp_path / "factory" / "credentials").exists()  # nothing of it was kept


def test_without_a_frontend_credential_glideins_get_the_factorys_or_x509_user_proxy(env, monkeypatch, tmp_path):
    monkeypatch.setenv("X509_USER_PROXY", str(tmp_path / "x509up_u0"))
    env.request("frontend1", "A", idle=1)
    env.cycle()
    [credential] = {g.credential for g in env.grid.submissions.values()}
    assert credential == tmp_path / "x509up_u0"


def test_with_pilot_token_each_glidein_gets_its_own_token_for_advertising_a_startd_only(env):
    from gwms.credentials.tokens import load_signing_key, verify_token

    env.request("frontend1", "D", idle=2)
    env.cycle()
    tokens = sorted({g.credential for g in env.grid.submissions.values()})
    assert len(tokens) == 2 and all(oct(t.stat().st_mode & 0o777) == "0o600" for t in tokens)
    key = load_signing_key(env.tmp_path / "pool.key")
    ids = {g.glidein_id for g in env.records.of_entry("D")}
    for token in tokens:
        claims = verify_token(token.read_text().strip(), {"POOL": key}, "gwms", now=env.clock.seconds())
        assert claims.scopes == frozenset({"ADVERTISE_STARTD"})
        assert claims.subject in {f"glidein-{i}@f1" for i in ids}
        assert claims.expires_at - claims.issued_at == 7200 + 3600  # its lifetime, plus its queue time
    for grid_id in env.grid.in_state(QUEUED):
        env.grid.finish(grid_id)
    env.request("frontend1", "D", idle=0)
    env.cycle()
    assert not any(t.exists() for t in tokens)  # forgotten with their glideins


def test_pilot_token_needs_the_pools_signing_key(tmp_path):
    from gwms.config import ConfigError

    text = CONFIG.format(work=tmp_path / "f", enabled_b="true")
    broken = parse_config(text.replace(f'token_signing_key = "{tmp_path / "f"}/../pool.key"\n', ""), "<test>")
    with pytest.raises(ConfigError) as e:
        Factory(MemoryReactorClock(), broken, GlideinRecords(tmp_path / "r.db"), {}, None, "http://x/", "K")
    assert "[factory.entry.D] pilot_token needs [factory] token_signing_key" in str(e.value)


def test_entry_attributes_and_brokers_reach_the_glideins_through_the_published_attrs_file(tmp_path):
    from gwms.factory.service import publish_entry_files
    from gwms.glidein.files import parse_description

    config = parse_config('[factory.entry.X]\nattributes = { GLIDEIN_Site = "SiteX", GLIDEIN_CPUS = 4 }\n'
                          'brokers = ["gcb.example.org:9630"]\nmax_walltime = 600\n', "<test>")
    store = tmp_path / "web"
    description = publish_entry_files(config, store)["X"]
    entries = parse_description((store / "descriptions" / description).read_bytes())
    [attrs] = [e for e in entries if e.kind == "attrs"]
    text = (store / "files" / attrs.digest / attrs.name).read_text()
    assert text.splitlines() == ["GLIDEIN_Brokers=gcb.example.org:9630", "GLIDEIN_CPUS=4",
                                 "GLIDEIN_Max_Walltime=600", "GLIDEIN_Site=SiteX"]
    assert [e.kind for e in entries].count("validate") == 3  # the stock scripts


def test_a_batch_system_that_does_not_answer_stops_only_its_entrys_cycle(env):
    from twisted.logger import formatEvent, globalLogPublisher

    from gwms.plugins.commands import CommandError

    env.request("frontend1", "A", idle=2)
    env.request("frontend1", "B", idle=2)
    real_query = env.grid.query
    down = {"A"}

    def query(entry, grid_ids):
        if entry["name"] in down:
            return defer.fail(CommandError(["squeue", "--noheader"], 1,
                                           "slurm_load_jobs error: Unable to contact slurm controller\n"))
        return real_query(entry, grid_ids)

    env.grid.query = query
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        env.cycle()
    finally:
        globalLogPublisher.removeObserver(events.append)
    # A submitted nothing (without its glideins' states it cannot count them); B went on.
    assert env.states("A") == {} and env.states("B") == {QUEUED: 2}
    [warning] = [formatEvent(e) for e in events if "stopped" in formatEvent(e)]
    assert warning == ("factory: the cycle of entry A stopped: squeue exited 1: slurm_load_jobs error: "
                       "Unable to contact slurm controller")
    down.clear()
    env.cycle()
    assert env.states("A") == {QUEUED: 2}


def test_an_entrys_http_proxy_reaches_its_glideins_and_must_be_an_http_url(tmp_path):
    from gwms.config import ConfigError

    env = Env(tmp_path)
    text = CONFIG.format(work=tmp_path / "factory", enabled_b="true").replace(
        '[factory.entry.B]\n', '[factory.entry.B]\nhttp_proxy = "http://squid.site.example:3128"\n')
    env.config = parse_config(text, "<test>", base=tmp_path)
    env.factory = env.make_factory()
    env.request("frontend1", "B", idle=1)
    env.request("frontend1", "A", idle=1)
    env.cycle()
    by_entry = {g.arguments[g.arguments.index("-entry") + 1]: list(g.arguments) for g in env.grid.submissions.values()}
    assert by_entry["B"][by_entry["B"].index("-http_proxy") + 1] == "http://squid.site.example:3128"
    assert "-http_proxy" not in by_entry["A"]
    for bad in ("https://squid:3128", "squid:3128", "http://", "http://squid:3128 -x"):
        env.config = parse_config(text.replace("http://squid.site.example:3128", bad), "<test>", base=tmp_path)
        with pytest.raises(ConfigError, match=r"\[factory.entry.B\] http_proxy must be an http:// URL"):
            env.make_factory()


def test_an_enabled_entry_without_allowed_frontends_is_warned_about_at_start(tmp_path):
    from twisted.logger import formatEvent, globalLogPublisher

    env = Env(tmp_path)
    text = CONFIG.format(work=tmp_path / "factory", enabled_b="true").replace(
        '[factory.entry.C]\ngrid = "fake"\nallowed_frontends = ["frontend1"]\n', '[factory.entry.C]\ngrid = "fake"\n')
    env.config = parse_config(text, "<test>", base=tmp_path)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        env.make_factory()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [formatEvent(e) for e in events if "allowed_frontends" in formatEvent(e)] == [
        "factory: entry C has no allowed_frontends: no request will count, nothing will be submitted there"]
