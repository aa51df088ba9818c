"""The frontend daemon's cycle around the pressure logic: what it reads, what it advertises."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from gwms import classads
from gwms.config import ConfigError, parse_config
from gwms.frontend.service import Frontend
from gwms.protocols.messages import ConnectionFailed

CONFIG = """
[pool]
collectors = ["pool.example:9618"]
[frontend]
name = "fe"
trusted = ["/CN=schedd"]
schedds = ["schedd.example:9615"]
[frontend.group.main]
match = "true"
"""


def ad(**values):
    a = classads.ClassAd()
    for k, v in values.items():
        a[k] = v
    return a


class StubCollectors:
    def __init__(self, ads=None):
        self.ads = ads or {}
        self.down = False
        self.advertised = []

    def query(self, command, query, level="READ"):
        if self.down:
            return defer.fail(ConnectionFailed("no collector answered"))
        found = self.ads.get(query["TargetType"], [])
        return defer.succeed((ad(Count=len(found)), [classads.encode(a) for a in found]))

    def advertise(self, the_ad, level, command="UPDATE"):
        self.advertised.append((command, level, the_ad))
        return defer.succeed([])


class StubSchedd:
    def __init__(self, jobs):
        self.jobs = jobs

    def query(self, constraint):
        assert constraint == "JobStatus == 1"
        return defer.succeed([j for j in self.jobs if j.get("JobStatus") == 1])


def run(d):
    out = []
    d.addBoth(out.append)
    assert out, "the cycle did not finish"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def make(jobs):
    glidein = StubCollectors({"glidefactory": [ad(MyType="glidefactory", Name="A@f1", EntryName="A",
                                                  FactoryName="f1", GLIDEIN_Site="SiteA")]})
    pool = StubCollectors({"Machine": []})
    frontend = Frontend(Clock(), parse_config(CONFIG), glidein, pool, lambda address: StubSchedd(jobs))
    return frontend, glidein, pool


def test_a_cycle_advertises_one_request_per_entry_with_what_the_glideins_need():
    jobs = [ad(ClusterId=1, ProcId=i, JobStatus=1, Owner="alice") for i in range(3)]
    frontend, glidein, _pool = make(jobs)
    run(frontend.cycle())
    [(command, level, request)] = glidein.advertised
    assert (command, level) == ("UPDATE", "ADVERTISE_FRONTEND")
    assert (request["MyType"], request["Name"], request["ClientName"], request["ReqFactory"], request["ReqEntry"]) == (
        "glideclient", "A@f1@fe.main", "fe.main", "f1", "A")
    assert (request["ReqIdleGlideins"], request["ReqRemoveExcess"], request["MatchingIdleJobs"]) == (3, "NO", 3)
    assert request["GLIDEIN_Collector"] == "pool.example:9618" and request["GLIDEIN_Trusted"] == ["/CN=schedd"]


def test_without_the_pools_glideins_the_cycle_is_skipped_rather_than_asking_for_too_many():
    frontend, glidein, pool = make([ad(ClusterId=1, ProcId=0, JobStatus=1)])
    first = run(frontend.cycle())
    pool.down = True
    assert run(frontend.cycle()) is first
    assert len(glidein.advertised) == 1  # nothing new was advertised


def test_a_frontend_with_groups_must_name_the_schedds_its_glideins_trust():
    with pytest.raises(ConfigError) as e:
        Frontend(Clock(), parse_config(CONFIG.replace('trusted = ["/CN=schedd"]\n', "")), StubCollectors(),
                 StubCollectors(), lambda a: StubSchedd([]))
    assert "[frontend] trusted must name the identities of the pool's schedds" in str(e.value)


def test_requests_carry_the_frontends_own_files_once_it_serves_them():
    frontend, glidein, _pool = make([ad(ClusterId=1, ProcId=0, JobStatus=1)])
    run(frontend.cycle())
    assert "ClientWebURL" not in glidein.advertised[-1][2]
    frontend.files = ("http://frontend.example:8080/", "b" * 64)
    run(frontend.cycle())
    request = glidein.advertised[-1][2]
    assert (request["ClientWebURL"], request["ClientDescription"]) == ("http://frontend.example:8080/", "b" * 64)


def test_the_pilot_credential_is_sealed_for_the_entrys_factory_with_the_frontends_identity(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gwms.credentials.sealed import unseal

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    (tmp_path / "pilot.pem").write_text("PILOT\n")
    config = parse_config(CONFIG.replace('name = "fe"', f'name = "fe"\npilot_credential = "{tmp_path}/pilot.pem"'))
    glidein = StubCollectors({"glidefactory": [ad(MyType="glidefactory", Name="A@f1", EntryName="A",
                                                  FactoryName="f1", PubKeyValue=public)]})
    frontend = Frontend(Clock(), config, glidein, StubCollectors({"Machine": []}),
                        lambda address: StubSchedd([ad(ClusterId=1, ProcId=0, JobStatus=1)]))
    frontend.identity = "/O=gwms/OU=Hosts/CN=frontend"
    run(frontend.cycle())
    request = glidein.advertised[-1][2]
    payload = unseal(private, request["GlideinEncryptedCredential"])
    assert payload["identity"] == "/O=gwms/OU=Hosts/CN=frontend" and payload["credential"] == "PILOT\n"
    assert "PILOT" not in classads.format_old(request)
