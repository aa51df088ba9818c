"""The VO frontend's pressure logic: exact requests per (group, entry) over several cycles."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import pytest
from twisted.internet.task import Clock

from gwms import classads
from gwms.frontend.pressure import (
    CycleResult,
    FactoryCounts,
    FactoryEntry,
    FrontendLimits,
    GroupConfig,
    GroupConfigError,
    compute_requests,
)

CYCLE_SECONDS = 60.0
SITE_MATCH = "stringListMember(TARGET.GLIDEIN_Site, MY.DESIRED_Sites)"


# ---------------------------------------------------------------------------------------------
# Ads
# ---------------------------------------------------------------------------------------------


def _ad(attrs: dict[str, object]) -> classads.ClassAd:
    """An ad from Python values; a str starting with '=' is a ClassAd expression."""
    ad = classads.ClassAd()
    for name, value in attrs.items():
        if isinstance(value, str) and value.startswith("="):
            ad[name] = classads.parse_expr(value[1:])
        else:
            ad[name] = value
    return ad


def jobs(count: int, **attrs: object) -> list[classads.ClassAd]:
    """``count`` idle jobs, alike except for their ids."""
    return [_ad({"MyType": "Job", "JobStatus": 1, "ClusterId": 1, "ProcId": proc, "Owner": "alice", **attrs})
            for proc in range(count)]


def entry(name: str, site: str | None = None, factory: str = "F", **counts: FactoryCounts) -> FactoryEntry:
    """Entry ``name`` at GLIDEIN_Site ``site`` (default: the entry name), with the factory's
    numbers for the groups named in ``counts``."""
    ad = _ad({"MyType": "glidefactory", "Name": f"{name}@{factory}", "EntryName": name, "FactoryName": factory,
              "GLIDEIN_Site": site or name, "GLIDEIN_CPUS": 8})
    return FactoryEntry(ad, counts)


def glideins(count: int, entry_name: str, state: str, client: str = "g", **attrs: object) -> list[classads.ClassAd]:
    return [_ad({"MyType": "Machine", "Name": f"slot{i}@{entry_name}-{state}-{client}", "State": state,
                 "SlotType": "Static", "Cpus": 1, "GLIDEIN_Entry_Name": entry_name, "GLIDEIN_Factory": "F",
                 "GLIDEIN_Client": client, **attrs})
            for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


class Want(NamedTuple):
    """Expected ReqIdleGlideins, ReqMaxGlideins, ReqRemoveExcess and curb reason."""

    idle: int
    max: int
    remove: str = "NO"
    reason: str = ""


@dataclass
class Cycle:
    jobs: list[classads.ClassAd]
    entries: list[FactoryEntry]
    want: dict[tuple[str, str], Want]  # every (group, entry) requested, nothing else
    glideins: list[classads.ClassAd] = field(default_factory=list)
    collector_ok: bool = True
    #: other EntryRequest fields to check exactly, per (group, entry)
    facts: dict[tuple[str, str], dict[str, object]] = field(default_factory=dict)
    #: GroupSummary fields to check exactly, per group
    summary: dict[str, dict[str, object]] = field(default_factory=dict)
    withdrawn: tuple[tuple[str, str], ...] = ()
    kept_previous: bool = False


@dataclass
class Scenario:
    name: str
    groups: list[GroupConfig]
    cycles: list[Cycle]
    limits: FrontendLimits = field(default_factory=FrontendLimits)


def group(name: str = "g", **options: object) -> GroupConfig:
    """A group without ramp-up unless asked, so most scenarios show the other rules' numbers."""
    options.setdefault("ramp_up", 0)
    return GroupConfig(name, **options)  # type: ignore[arg-type]


A, B, C = "A@F", "B@F", "C@F"

SCENARIOS = [
    Scenario(
        "empty queue: no new glideins, keep the running ones, remove the excess idle ones",
        [group(remove_excess="wait")],
        [Cycle(jobs=[], entries=[entry("A", g=FactoryCounts(idle=3, running=5)), entry("B")],
               want={("g", A): Want(0, 5, "WAIT"), ("g", B): Want(0, 0, "WAIT")},
               facts={("g", A): {"factory_idle": 3, "factory_running": 5, "factory_held": 0, "idle_jobs": 0},
                      ("g", B): {"factory_idle": None, "factory_running": None}},
               summary={"g": {"idle_jobs": 0, "req_idle_glideins": 0, "req_max_glideins": 5}})],
    ),
    Scenario(
        "jobs matching one entry",
        [group(match='TARGET.GLIDEIN_Site == "S1"')],
        [Cycle(jobs=jobs(7), entries=[entry("A", "S1", g=FactoryCounts(running=3)), entry("B", "S2")],
               want={("g", A): Want(7, 10), ("g", B): Want(0, 0, "IDLE")},
               facts={("g", A): {"idle_jobs": 7, "effective_idle_jobs": 7.0, "wanted_idle_glideins": 7}})],
    ),
    Scenario(
        "jobs matching several entries count 1/k at each",
        [group()],
        [Cycle(jobs=jobs(4), entries=[entry("A"), entry("B"), entry("C")],
               want={("g", A): Want(2, 2), ("g", B): Want(2, 2), ("g", C): Want(2, 2)},
               facts={key: {"idle_jobs": 4, "effective_idle_jobs": 4 / 3} for key in [("g", A), ("g", B), ("g", C)]})],
    ),
    Scenario(
        "DESIRED_Sites matching, unscoped names resolved in the job first, then the entry",
        [group(match="stringListMember(GLIDEIN_Site, DESIRED_Sites)")],
        # 3 jobs want S1,S2 and 1 wants S1,S2,S3: 3/2 + 1/3 = 11/6 at A and B, 1/3 at C.  The
        # last job has its own GLIDEIN_Site, which wins over the entry's: it matches nowhere.
        [Cycle(jobs=jobs(3, DESIRED_Sites="S1,S2") + jobs(1, DESIRED_Sites="S1,S2,S3")
               + jobs(1, DESIRED_Sites="S1", GLIDEIN_Site="S9"),
               entries=[entry("A", "S1"), entry("B", "S2"), entry("C", "S3"), entry("D", "S4")],
               want={("g", A): Want(2, 2), ("g", B): Want(2, 2), ("g", C): Want(1, 1),
                     ("g", "D@F"): Want(0, 0, "IDLE")},
               facts={("g", A): {"idle_jobs": 4, "effective_idle_jobs": 11 / 6},
                      ("g", C): {"idle_jobs": 1, "effective_idle_jobs": 1 / 3}},
               summary={"g": {"idle_jobs": 5, "unmatched_jobs": 1}})],
    ),
    Scenario(
        "job attributes that are expressions are followed when jobs are grouped",
        [group(match=SITE_MATCH)],
        # Same DESIRED_Sites text, different Home: S1,S2 and S3,S2 -> S1 1/2, S2 1, S3 1/2.
        [Cycle(jobs=jobs(1, Home="S1", DESIRED_Sites='=strcat(Home, ",S2")')
               + jobs(1, Home="S3", DESIRED_Sites='=strcat(Home, ",S2")'),
               entries=[entry("A", "S1"), entry("B", "S2"), entry("C", "S3")],
               want={("g", A): Want(1, 1), ("g", B): Want(1, 1), ("g", C): Want(1, 1)},
               facts={("g", A): {"effective_idle_jobs": 0.5}, ("g", B): {"effective_idle_jobs": 1.0},
                      ("g", C): {"effective_idle_jobs": 0.5}})],
    ),
    Scenario(
        "idle glideins already in the pool reduce the request",
        [group(match=SITE_MATCH)],
        # At A: 3 unclaimed + 2 claimed static slots, a partitionable slot with no CPUs left
        # (not idle) and its dynamic slot (a job, not a glidein of its own): 6 glideins, 3 idle,
        # 3 jobs running.  Another client's idle glidein does not count for g.
        [Cycle(jobs=jobs(10, DESIRED_Sites="A"), entries=[entry("A"), entry("B")],
               glideins=glideins(3, "A", "Unclaimed") + glideins(2, "A", "Claimed")
               + glideins(1, "A", "Unclaimed", SlotType="Partitionable", Cpus=0)
               + glideins(1, "A", "Claimed", SlotType="Dynamic")
               + glideins(1, "A", "Unclaimed", client="other") + glideins(1, "B", "Unclaimed"),
               want={("g", A): Want(7, 13), ("g", B): Want(0, 1, "IDLE")},
               facts={("g", A): {"pool_unclaimed": 3, "running_jobs": 3, "wanted_idle_glideins": 7},
                      ("g", B): {"pool_unclaimed": 1}},
               summary={"g": {"idle_glideins": 4}})],
    ),
    Scenario(
        "unclaimed glideins covering every job: nothing new, but no removal while jobs wait",
        [group()],
        [Cycle(jobs=jobs(2), entries=[entry("A")], glideins=glideins(3, "A", "Unclaimed"),
               want={("g", A): Want(0, 3, "NO")})],
    ),
    Scenario(
        "idle_per_entry caps one entry",
        [group(idle_per_entry=5)],
        [Cycle(jobs=jobs(8), entries=[entry("A")], want={("g", A): Want(5, 5, reason="idle_per_entry")},
               facts={("g", A): {"wanted_idle_glideins": 8}})],
    ),
    Scenario(
        "ramp-up: the request grows by ramp_up per cycle, and falls at once",
        [group(ramp_up=20)],
        [Cycle(jobs=jobs(50), entries=[entry("A")], want={("g", A): Want(20, 20, reason="ramp-up")}),
         Cycle(jobs=jobs(50), entries=[entry("A")], want={("g", A): Want(40, 40, reason="ramp-up")}),
         Cycle(jobs=jobs(50), entries=[entry("A")], want={("g", A): Want(50, 50)}),
         Cycle(jobs=jobs(30), entries=[entry("A")], want={("g", A): Want(30, 30)})],
    ),
    Scenario(
        "group max_idle split across entries in proportion (largest remainder)",
        [group(max_idle=10, match=SITE_MATCH)],
        # 9, 6, 3 wanted -> 5, 3.33, 1.67 -> 5, 3, 1 and the largest remainder (C) gets the 10th.
        [Cycle(jobs=jobs(9, DESIRED_Sites="A") + jobs(6, DESIRED_Sites="B") + jobs(3, DESIRED_Sites="C"),
               entries=[entry("A"), entry("B"), entry("C")],
               want={("g", A): Want(5, 5, reason="group max_idle"), ("g", B): Want(3, 3, reason="group max_idle"),
                     ("g", C): Want(2, 2, reason="group max_idle")})],
    ),
    Scenario(
        "group max_idle ties go to the first entry by name",
        [group(max_idle=4)],
        [Cycle(jobs=jobs(6), entries=[entry("C"), entry("A"), entry("B")],
               want={("g", A): Want(2, 2), ("g", B): Want(1, 1, reason="group max_idle"),
                     ("g", C): Want(1, 1, reason="group max_idle")})],
    ),
    Scenario(
        "curb_idle halves the requests (rounded up) once the group has that many idle glideins",
        [group(curb_idle=10, match=SITE_MATCH)],
        # 8 queued at the factory + 2 unclaimed = 10 idle: A wants 9 - 2 = 7 -> 4, B 1 -> 1.
        [Cycle(jobs=jobs(9, DESIRED_Sites="A") + jobs(1, DESIRED_Sites="B"),
               entries=[entry("A", g=FactoryCounts(idle=8, running=2)), entry("B")],
               glideins=glideins(2, "A", "Unclaimed"),
               want={("g", A): Want(4, 6, reason="curb_idle"), ("g", B): Want(1, 1)},
               summary={"g": {"idle_glideins": 10, "curbed": True}}),
         # One fewer queued at the factory: 9 idle, under the curb.
         Cycle(jobs=jobs(9, DESIRED_Sites="A") + jobs(1, DESIRED_Sites="B"),
               entries=[entry("A", g=FactoryCounts(idle=7, running=2)), entry("B")],
               glideins=glideins(2, "A", "Unclaimed"),
               want={("g", A): Want(7, 9), ("g", B): Want(1, 1)},
               summary={"g": {"idle_glideins": 9, "curbed": False}})],
    ),
    Scenario(
        "frontend max_idle split over two groups",
        [group("a", job_constraint='Owner == "alice"'), group("b", job_constraint='Owner == "bob"')],
        [Cycle(jobs=jobs(12, Owner="alice") + jobs(8, Owner="bob"), entries=[entry("A")],
               want={("a", A): Want(6, 6, reason="frontend max_idle"),
                     ("b", A): Want(4, 4, reason="frontend max_idle")},
               summary={"a": {"idle_jobs": 12}, "b": {"idle_jobs": 8}})],
        limits=FrontendLimits(max_idle=10),
    ),
    Scenario(
        "group max_running split over the entries with jobs, after what runs where none wait",
        [group(max_running=10, match=SITE_MATCH)],
        # C runs 2 with no jobs: 8 left.  A wants 6 + 5 = 11, B 0 + 6 = 6: 88/17 -> 5, 48/17 -> 3.
        # A already runs 6 > 5: no new idle glideins there.
        [Cycle(jobs=jobs(5, DESIRED_Sites="A") + jobs(6, DESIRED_Sites="B"),
               entries=[entry("A", g=FactoryCounts(running=6)), entry("B"), entry("C", g=FactoryCounts(running=2))],
               want={("g", A): Want(0, 5, reason="max_running"), ("g", B): Want(3, 3, reason="max_running"),
                     ("g", C): Want(0, 2, "IDLE")})],
    ),
    Scenario(
        "frontend max_running",
        [group()],
        [Cycle(jobs=jobs(6), entries=[entry("A", g=FactoryCounts(running=2))],
               want={("g", A): Want(3, 5, reason="frontend max_running")})],
        limits=FrontendLimits(max_running=5),
    ),
    Scenario(
        "an entry that disappears gets no request and is withdrawn",
        [group()],
        [Cycle(jobs=jobs(4), entries=[entry("A"), entry("B")], want={("g", A): Want(2, 2), ("g", B): Want(2, 2)}),
         Cycle(jobs=jobs(4), entries=[entry("A")], want={("g", A): Want(4, 4)}, withdrawn=(("g", B),))],
    ),
    Scenario(
        "factory down: the previous requests are kept, then ramp-up resumes from them",
        [group(ramp_up=3)],
        [Cycle(jobs=jobs(10), entries=[entry("A")], want={("g", A): Want(3, 3, reason="ramp-up")}),
         Cycle(jobs=jobs(10), entries=[], collector_ok=False, want={("g", A): Want(3, 3, reason="ramp-up")},
               kept_previous=True),
         Cycle(jobs=jobs(10), entries=[entry("A")], want={("g", A): Want(6, 6, reason="ramp-up")})],
    ),
]

def _run(scenario: Scenario) -> list[CycleResult]:
    """Every cycle of the scenario, a clock tick apart, each fed the previous result."""
    clock = Clock()
    results: list[CycleResult] = []
    previous = None
    for cycle in scenario.cycles:
        clock.advance(CYCLE_SECONDS)
        previous = compute_requests(scenario.groups, scenario.limits, cycle.jobs, cycle.entries, cycle.glideins,
                                    previous, clock.seconds(), glidein_collector_ok=cycle.collector_ok)
        results.append(previous)
    return results


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario: Scenario) -> None:
    for number, (cycle, result) in enumerate(zip(scenario.cycles, _run(scenario)), start=1):
        where = f"cycle {number}"
        assert result.time == number * CYCLE_SECONDS, where
        got = {(r.group, r.entry): Want(r.req_idle_glideins, r.req_max_glideins, r.req_remove_excess, r.curb_reason)
               for r in result.requests}
        assert got == cycle.want, where
        for key, facts in cycle.facts.items():
            request = result.request(*key)
            assert request is not None, (where, key)
            for name, value in facts.items():
                expected = pytest.approx(value) if isinstance(value, float) else value  # 11/6 is not exact
                assert getattr(request, name) == expected, (where, key, name)
        summaries = {s.group: s for s in result.groups}
        for name, facts in cycle.summary.items():
            for attribute, value in facts.items():
                assert getattr(summaries[name], attribute) == value, (where, name, attribute)
        assert result.withdrawn == cycle.withdrawn, where
        assert result.kept_previous is cycle.kept_previous, where


def test_jobs_not_idle_or_outside_the_job_constraint_are_not_counted() -> None:
    groups = [group(job_constraint='Owner == "alice"')]
    batch = jobs(3) + jobs(2, Owner="bob") + jobs(4, JobStatus=2)
    result = compute_requests(groups, FrontendLimits(), batch, [entry("A")], [], None, Clock().seconds())
    assert result.request("g", A).req_idle_glideins == 3
    assert result.groups[0].idle_jobs == 3


def test_requests_are_sorted_by_group_then_entry() -> None:
    groups = [group("zeta"), group("alpha")]
    result = compute_requests(groups, FrontendLimits(), jobs(1), [entry("C"), entry("A"), entry("B", factory="E")],
                              [], None, Clock().seconds())
    assert [(r.group, r.entry) for r in result.requests] == [
        ("alpha", A), ("alpha", "B@E"), ("alpha", C), ("zeta", A), ("zeta", "B@E"), ("zeta", C)]
    assert [s.group for s in result.groups] == ["alpha", "zeta"]


def test_request_attributes_use_glideinwms_names() -> None:
    result = compute_requests([group(idle_per_entry=2)], FrontendLimits(), jobs(3), [entry("A")],
                              glideins(1, "A", "Claimed"), None, Clock().seconds())
    request = result.request("g", A)
    assert (request.entry_name, request.factory_name) == ("A", "F")
    assert request.attributes() == {
        "ReqIdleGlideins": 2, "ReqMaxGlideins": 3, "ReqRemoveExcess": "NO",
        "GlideinMonitorJobsIdleMatching": 3, "GlideinMonitorJobsIdleEffective": 3.0,
        "GlideinMonitorJobsRunningHere": 1, "GlideinMonitorGlideinsIdle": 0, "GlideinMonitorGlideinsRunning": 1,
        "GlideinMonitorCurbReason": "idle_per_entry",
    }


def test_factory_down_on_the_first_cycle_requests_nothing_and_says_so() -> None:
    result = compute_requests([group()], FrontendLimits(), jobs(5), [], [], None, Clock().seconds(),
                              glidein_collector_ok=False)
    assert result.requests == () and result.kept_previous


def test_a_group_dropped_from_the_configuration_has_its_requests_withdrawn() -> None:
    clock = Clock()
    first = compute_requests([group("a"), group("b")], FrontendLimits(), jobs(2), [entry("A")], [], None,
                             clock.seconds())
    clock.advance(CYCLE_SECONDS)
    second = compute_requests([group("a")], FrontendLimits(), jobs(2), [entry("A")], [], first, clock.seconds())
    assert second.withdrawn == (("b", A),)
    assert [(r.group, r.entry) for r in second.requests] == [("a", A)]


def test_duplicate_group_names_are_refused() -> None:
    with pytest.raises(ValueError, match="group names must be unique"):
        compute_requests([group("a"), group("a")], FrontendLimits(), [], [], [], None, 0.0)


def test_duplicate_group_client_names_are_refused() -> None:
    with pytest.raises(ValueError, match="client names must be unique"):
        compute_requests([group("a", client_name="fe.x"), group("b", client_name="fe.x")], FrontendLimits(),
                         [], [], [], None, 0.0)


def test_glideins_belong_to_the_group_by_its_client_name() -> None:
    groups = [group("main", client_name="fe.main")]
    result = compute_requests(groups, FrontendLimits(), jobs(5), [entry("A")],
                              glideins(2, "A", "Unclaimed", client="fe.main") + glideins(4, "A", "Unclaimed"),
                              None, 0.0)
    assert (result.request("main", A).pool_unclaimed, result.request("main", A).req_idle_glideins) == (2, 3)


@pytest.mark.parametrize(("options", "message"), [
    ({"match": "stringListMember(TARGET.GLIDEIN_Site,"}, "bad match expression"),
    ({"match": "TARGET.GLIDEIN_Site == "}, "bad match expression"),
    ({"job_constraint": 'Owner == "alice" &&'}, "bad job_constraint"),
    ({"remove_excess": "SOME"}, "remove_excess must be one of NO, WAIT, IDLE, ALL"),
    ({"max_idle": -1}, "max_idle must be a whole number >= 0"),
    ({"ramp_up": True}, "ramp_up must be a whole number >= 0"),
], ids=["unclosed call", "missing operand", "bad job constraint", "remove_excess", "negative", "bool"])
def test_a_malformed_group_is_refused_when_built_naming_the_group(options: dict[str, object], message: str) -> None:
    with pytest.raises(GroupConfigError, match=f"frontend group 'cms': {message}"):
        GroupConfig("cms", **options)  # type: ignore[arg-type]


def test_remove_excess_is_case_insensitive() -> None:
    assert GroupConfig("g", remove_excess="all").remove_excess == "ALL"


def test_100000_jobs_of_300_kinds_against_100_entries() -> None:
    rng = random.Random(7)
    sites = [f"S{i}" for i in range(100)]
    # 299 kinds over the advertised sites and one kind only an unadvertised site can run.
    kinds = [rng.sample(sites, rng.randint(1, 6)) for _ in range(299)] + [["Nowhere"]]
    batch = [classads.ClassAd({"MyType": "Job", "JobStatus": 1, "ClusterId": n, "ProcId": 0,
                               "Owner": f"user{n % 7}", "DESIRED_Sites": ",".join(kinds[n % len(kinds)])})
             for n in range(100_000)]
    entries = [entry(f"E{i}", site) for i, site in enumerate(sites)]
    unlimited = 10**9
    groups = [GroupConfig("g", match=SITE_MATCH, idle_per_entry=unlimited, max_idle=unlimited,
                          max_running=unlimited, ramp_up=0)]
    result = compute_requests(groups, FrontendLimits(max_idle=unlimited, max_running=unlimited), batch, entries,
                              [], None, Clock().seconds())

    per_kind = [100_000 // len(kinds) + (1 if k < 100_000 % len(kinds) else 0) for k in range(len(kinds))]
    for i, site in enumerate(sites):
        effective = sum((Fraction(per_kind[k], len(kind)) for k, kind in enumerate(kinds) if site in kind), Fraction(0))
        raw = sum(per_kind[k] for k, kind in enumerate(kinds) if site in kind)
        request = result.request("g", f"E{i}@F")
        assert (request.idle_jobs, request.req_idle_glideins) == (raw, math.ceil(effective)), site
        assert request.effective_idle_jobs == pytest.approx(float(effective))
    assert (result.groups[0].idle_jobs, result.groups[0].unmatched_jobs) == (100_000, per_kind[-1])
