"""The schedd's commands in memory: submission, ownership, queries and hostile input."""

from __future__ import annotations

import getpass

import pytest
from twisted.internet.testing import MemoryReactorClock

from gwms import classads
from gwms.protocols.messages import CommandError, Limits, MessageServerFactory
from gwms.schedd.queue import JobQueue
from gwms.schedd.service import Schedd
from gwms.testing.network import MemoryNetwork, memory_config, memory_security

ME = getpass.getuser()
LISTS = f"""
[security.READ]
allow = ["*"]
[security.WRITE]
allow = ["{ME}", "intruder"]
[security.ADMINISTRATOR]
allow = ["admin"]
[security.NEGOTIATOR]
allow = ["negotiator"]
[schedd]
spool = "spool"
"""


class Audit:
    def __init__(self):
        self.events = []

    def record(self, request, decision):
        self.events.append((request.identity.name, request.command, decision.allowed, decision.rule))

    def close(self):
        pass


@pytest.fixture
def env(tmp_path):
    clock = MemoryReactorClock()
    config = memory_config(LISTS)
    queue = JobQueue(tmp_path / "queue.db", clock=clock.seconds)
    schedd = Schedd(clock, config, queue)
    audit = Audit()
    factory = MessageServerFactory(clock, memory_security(config, audit), schedd.commands(), Limits(max_frame=1 << 20))
    net = MemoryNetwork(clock)

    class Env:
        pass

    e = Env()
    e.clock, e.schedd, e.queue, e.audit = clock, schedd, queue, audit

    def client(identity, level="WRITE"):
        proto, _server, _pump = net.connect(factory, identity, level, config=config)
        net.flush()
        return proto

    def call(proto, command, ad, stream=False):
        d = proto.call(command, ad, stream=stream)
        net.flush()
        out = []
        d.addBoth(out.append)
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    e.client, e.call = client, call
    yield e
    queue.close()


def ad(**values):
    a = classads.ClassAd()
    for k, v in values.items():
        a[k] = v
    return a


def submit(e, proto, n=2, **cluster_attrs):
    cluster = e.call(proto, "NEW_CLUSTER", ad())["ClusterId"]
    cluster_ad = ad(Cmd="/bin/true", Iwd="/tmp", JobUniverse=5, **cluster_attrs)
    return e.call(proto, "SUBMIT", ad(ClusterId=cluster, ClusterAd=cluster_ad,
                                      Procs=[ad(ProcId=i) for i in range(n)], Final=True))


def test_submit_forces_the_owner_to_the_authenticated_user(env):
    me = env.client(ME)
    reply = submit(env, me, n=3, Owner="root", User="root@elsewhere")
    assert reply["Count"] == 3
    assert {env.queue.owner((1, p)) for p in range(3)} == {ME}
    assert env.queue.get((1, 0), "User") == f"{ME}@gwms"


def test_submit_needs_a_cluster_made_on_the_same_connection(env):
    me = env.client(ME)
    with pytest.raises(CommandError) as e:
        env.call(me, "SUBMIT", ad(ClusterId=7, ClusterAd=ad(), Procs=[], Final=True))
    assert e.value.code == "BAD_CLUSTER"
    other = env.client(ME)
    cluster = env.call(me, "NEW_CLUSTER", ad())["ClusterId"]
    with pytest.raises(CommandError):
        env.call(other, "SUBMIT", ad(ClusterId=cluster, ClusterAd=ad(), Procs=[ad(ProcId=0)], Final=True))


def test_procs_in_several_frames_are_queued_only_by_the_final_one(env):
    me = env.client(ME)
    cluster = env.call(me, "NEW_CLUSTER", ad())["ClusterId"]
    env.call(me, "SUBMIT", ad(ClusterId=cluster, ClusterAd=ad(Cmd="/bin/true", Iwd="/tmp"),
                              Procs=[ad(ProcId=0), ad(ProcId=1)], Final=False))
    assert len(env.queue) == 0
    env.call(me, "SUBMIT", ad(ClusterId=cluster, Procs=[ad(ProcId=2)], Final=True))
    assert len(env.queue) == 3


def test_malformed_submissions_are_refused_and_nothing_stored_is_lost(env):
    me = env.client(ME)
    submit(env, me, n=1)
    before = len(env.queue)
    cases = [
        dict(ClusterAd=ad(), Procs="not a list", Final=True),
        dict(ClusterAd=ad(), Procs=[ad(ProcId=0), ad(ProcId=0)], Final=True),
        dict(Procs=[ad(ProcId=0)], Final=True),
    ]
    for bad in cases:
        cluster = env.call(me, "NEW_CLUSTER", ad())["ClusterId"]  # a failed submission uses its cluster up
        with pytest.raises(CommandError) as e:
            env.call(me, "SUBMIT", ad(ClusterId=cluster, **bad))
        assert e.value.code in ("MALFORMED_AD", "SUBMIT_FAILED"), e.value
    assert len(env.queue) == before
    with pytest.raises(CommandError) as e:
        env.call(me, "QUERY_JOBS", ad(Constraint="JobStatus == == 1"), stream=True)
    assert e.value.code == "MALFORMED_AD" and "bad constraint" in e.value.message
    with pytest.raises(CommandError) as e:
        env.call(me, "ACT_ON_JOBS", ad(Action="remove", JobIds=["1.x"]))
    assert "invalid job id" in e.value.message
    with pytest.raises(CommandError) as e:
        env.call(me, "ACT_ON_JOBS", ad(Action="explode", JobIds=["1.0"]))
    assert "Action must be" in e.value.message
    assert len(env.queue) == before


def test_a_user_acts_only_on_own_jobs_refusals_are_audited_and_admin_may(env):
    me = env.client(ME)
    submit(env, me, n=2)
    intruder = env.client("intruder")
    reply = env.call(intruder, "ACT_ON_JOBS", ad(Action="remove", JobIds=["1"]))
    assert reply["Count"] == 0 and list(reply["Refused"]) == ["1.0", "1.1"]
    assert len(env.queue) == 2
    assert any(ev[0] == "intruder" and not ev[2] and "may not remove jobs of other users" in ev[3]
               for ev in env.audit.events)
    admin = env.client("admin")
    assert env.call(admin, "ACT_ON_JOBS", ad(Action="hold", JobIds=["1.0"], Reason="admin says"))["Count"] == 1
    assert env.queue.get((1, 0), "HoldReason") == "admin says"
    assert env.call(me, "ACT_ON_JOBS", ad(Action="release", JobIds=["1.0"]))["Count"] == 1
    assert env.call(me, "ACT_ON_JOBS", ad(Action="remove", Constraint="ProcId == 1"))["Count"] == 1
    assert [j["JobStatus"] for j in env.queue.history()] == [3]


def test_identities_without_an_account_cannot_submit(env):
    with pytest.raises(CommandError) as e:
        env.call(env.client("intruder"), "NEW_CLUSTER", ad())
    assert e.value.code in ("PERMISSION_DENIED",)


def test_resource_requests_group_idle_jobs_into_autoclusters(env):
    me = env.client(ME)
    submit(env, me, n=5, RequestCpus=1, RequestMemory=100)
    submit(env, me, n=3, RequestCpus=2, RequestMemory=100)
    negotiator = env.client("negotiator", "NEGOTIATOR")
    final, items = env.call(negotiator, "GET_RESOURCE_REQUESTS", ad(), stream=True)
    groups = sorted((classads.decode(i)["JobCount"], classads.decode(i)["RequestCpus"]) for i in items)
    assert groups == [(3, 2), (5, 1)]
    with pytest.raises(CommandError) as e:
        env.call(me, "GET_RESOURCE_REQUESTS", ad(), stream=True)
    assert e.value.code == "PERMISSION_DENIED"
