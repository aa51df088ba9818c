"""The negotiator's matchmaking core: matching, ranking, carving, grouping, fair share."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwms import classads
from gwms.negotiator.matchmaker import (
    CycleStats,
    Match,
    Matchmaker,
    ResourceRequest,
    autocluster_signature,
    significant_job_attributes,
)
from gwms.negotiator.priorities import Priorities

JOB_REQUIREMENTS = "TARGET.Cpus >= RequestCpus && TARGET.Memory >= RequestMemory"


def slot(name: str, **attrs: object) -> classads.ClassAd:
    """A slot ad: unclaimed, idle, 1 cpu, 2 GB, START true unless overridden.  String values
    starting with '=' are expressions."""
    values: dict[str, object] = {"MyType": "Machine", "Name": name, "State": "Unclaimed", "Activity": "Idle",
                                 "SlotType": "Static", "Cpus": 1, "Memory": 2048, "Disk": 1_000_000,
                                 "Start": "=true", "ClaimId": f"<10.0.0.1:9618>#1#1#{name}"}
    values.update(attrs)
    return _ad(values)


def job(**attrs: object) -> classads.ClassAd:
    values: dict[str, object] = {"MyType": "Job", "RequestCpus": 1, "RequestMemory": 1024, "RequestDisk": 1000,
                                 "Requirements": "=" + JOB_REQUIREMENTS}
    values.update(attrs)
    return _ad(values)


def _ad(values: dict[str, object]) -> classads.ClassAd:
    parts = []
    for key, value in values.items():
        if isinstance(value, str) and value.startswith("="):
            parts.append(f"{key} = {value[1:]}")
        elif isinstance(value, str):
            parts.append(f"{key} = {classads.quote(value)}")
        elif isinstance(value, bool):
            parts.append(f"{key} = {'true' if value else 'false'}")
        else:
            parts.append(f"{key} = {value}")
    return classads.parse_new("[" + "; ".join(parts) + "]")


def request(job_ad: classads.ClassAd, count: int = 1, submitter: str = "alice@pool", autocluster_id: int = 1,
            schedd: str = "schedd@submit") -> ResourceRequest:
    return ResourceRequest(schedd=schedd, submitter=submitter, autocluster_id=autocluster_id, job_ad=job_ad,
                           count=count)


def run(requests: list[ResourceRequest], slots: list[classads.ClassAd],
        priorities: Priorities | None = None) -> tuple[list[Match], CycleStats]:
    return Matchmaker(priorities or Priorities(None)).cycle(requests, slots, now=1000.0)


def matched_names(matches: list[Match]) -> list[str]:
    return [m.slot_name for m in matches]


# -- matching ------------------------------------------------------------------------------------


def test_job_matches_only_slots_its_requirements_accept_and_whose_start_accepts_it() -> None:
    slots = [
        slot("wrong-site", GLIDEIN_Site="B"),
        slot("start-refuses", GLIDEIN_Site="A", Start='=TARGET.Owner != "alice"'),
        slot("requirements-refuse", GLIDEIN_Site="A", Requirements="=TARGET.RequestMemory > 100000"),
        slot("too-small", GLIDEIN_Site="A", Memory=512),
        slot("good", GLIDEIN_Site="A", Start='=TARGET.Owner == "alice" && TARGET.RequestMemory <= MY.Memory'),
    ]
    ad = job(Owner="alice", Requirements=f'=TARGET.GLIDEIN_Site == "A" && {JOB_REQUIREMENTS}')
    matches, stats = run([request(ad, count=5)], slots)
    assert matched_names(matches) == ["good"]
    assert stats.matches == 1


def test_start_and_requirements_must_both_hold_on_the_slot_side() -> None:
    slots = [slot("start-only", Start="=true", Requirements="=false"),
             slot("requirements-only", Start="=false", Requirements="=true")]
    matches, _ = run([request(job(), count=2)], slots)
    assert matches == []


def test_match_carries_the_slot_ad_as_received_and_the_request() -> None:
    ad = slot("slot1@host", Cpus=4, Memory=8000)
    matches, _ = run([request(job(RequestCpus=2, RequestMemory=3000, RequestDisk=5000), autocluster_id=7,
                              schedd="schedd@a", submitter="bob@pool")], [ad])
    (m,) = matches
    assert m.slot_ad is ad and m.slot_ad["ClaimId"] == "<10.0.0.1:9618>#1#1#slot1@host"
    assert (m.schedd, m.submitter, m.autocluster_id, m.slot_name) == ("schedd@a", "bob@pool", 7, "slot1@host")
    assert (m.request_cpus, m.request_memory, m.request_disk) == (2, 3000, 5000)


def test_best_slot_by_job_rank_then_slot_rank_then_name() -> None:
    slots = [
        slot("c-small", Memory=2048, Rank="=10"),
        slot("b-big-low", Memory=8192, Rank="=1"),
        slot("z-big-high", Memory=8192, Rank="=5"),
        slot("a-big-high", Memory=8192, Rank="=TARGET.RequestMemory / 1024 + 4"),  # = 5 too
    ]
    ad = job(Rank="=TARGET.Memory")
    matches, _ = run([request(ad, count=4)], slots)
    # Memory first (the job's Rank); among the 8 GB ones the slot Rank; ties by Name.
    assert matched_names(matches) == ["a-big-high", "z-big-high", "b-big-low", "c-small"]


def test_ties_are_broken_by_slot_name_across_groups() -> None:
    slots = [slot("n3", GLIDEIN_Site="X"), slot("n1", GLIDEIN_Site="Y"), slot("n2", GLIDEIN_Site="X"),
             slot("n0", GLIDEIN_Site="Y")]
    ad = job(Requirements=f'=TARGET.GLIDEIN_Site =!= undefined && {JOB_REQUIREMENTS}')
    matches, stats = run([request(ad, count=4)], slots)
    assert matched_names(matches) == ["n0", "n1", "n2", "n3"]
    assert stats.slot_groups == 2


def test_claimed_and_busy_slots_are_skipped() -> None:
    slots = [slot("claimed", State="Claimed", Activity="Busy", RemoteOwner="bob@pool"),
             slot("unclaimed-busy", Activity="Busy"),
             slot("matched", State="Matched"),
             slot("free")]
    matches, stats = run([request(job(), count=10)], slots)
    assert matched_names(matches) == ["free"]
    assert stats.slots == 1 and stats.skipped_slots == 0


def test_a_static_slot_is_matched_once_per_cycle() -> None:
    slots = [slot("only")]
    matches, _ = run([request(job(), count=3, autocluster_id=1), request(job(RequestMemory=512), autocluster_id=2)],
                     slots)
    assert matched_names(matches) == ["only"]


def test_a_request_without_requirements_matches_any_willing_slot() -> None:
    ad = job()
    del ad["Requirements"]
    matches, _ = run([request(ad, count=2)], [slot("a"), slot("b", Start="=false")])
    assert matched_names(matches) == ["a"]


# -- partitionable slots -------------------------------------------------------------------------


def pslot(name: str, cpus: int, memory: int, **attrs: object) -> classads.ClassAd:
    return slot(name, SlotType="Partitionable", Cpus=cpus, Memory=memory, Disk=cpus * 1_000_000, **attrs)


def test_a_partitionable_slot_is_carved_repeatedly_until_exhausted() -> None:
    matches, stats = run([request(job(RequestCpus=2, RequestMemory=4000), count=10)], [pslot("p", 8, 16000)])
    assert matched_names(matches) == ["p"] * 4  # 8 cpus / 2
    assert all((m.request_cpus, m.request_memory) == (2, 4000) for m in matches)
    assert stats.matches == 4


def test_carving_stops_at_the_first_exhausted_resource() -> None:
    matches, _ = run([request(job(RequestCpus=1, RequestMemory=6000), count=10)], [pslot("p", 8, 16000)])
    assert len(matches) == 2  # memory: 16000 / 6000


def test_requirements_are_evaluated_against_the_remaining_resources() -> None:
    # The job insists on a slot with at least 4 cpus left; START wants 2 GB per cpu left over.
    ad = job(RequestCpus=2, RequestMemory=1000, Requirements=f"=TARGET.Cpus >= 4 && {JOB_REQUIREMENTS}")
    start = "=MY.Memory >= 2000 * MY.Cpus - 10000"
    matches, _ = run([request(ad, count=10)], [pslot("p", 8, 16000, Start=start)])
    assert len(matches) == 3  # at 8, 6 and 4 cpus left; 2 left is refused


def test_leftovers_of_a_partitionable_slot_serve_other_requests() -> None:
    big = request(job(RequestCpus=3, RequestMemory=1000), count=2, autocluster_id=1)
    small = request(job(RequestCpus=1, RequestMemory=1000), count=5, autocluster_id=2)
    matches, _ = run([big, small], [pslot("p", 8, 16000)])
    assert Counter(m.autocluster_id for m in matches) == {1: 2, 2: 2}  # 3 + 3 + 1 + 1 = 8 cpus
    assert set(matched_names(matches)) == {"p"}


def test_partitionable_and_static_slots_together() -> None:
    slots = [pslot("p1", 4, 8000), slot("s1", Cpus=1), pslot("p0", 2, 4000)]
    matches, stats = run([request(job(RequestCpus=1, RequestMemory=1000), count=100)], slots)
    assert Counter(matched_names(matches)) == {"p0": 2, "p1": 4, "s1": 1}
    assert stats.slots == 3


# -- scale ---------------------------------------------------------------------------------------


def test_grouping_makes_evaluations_scale_with_kinds_not_counts() -> None:
    slots = [slot(f"slot{i:04d}@wn", GLIDEIN_Site="A", Cpus=1, Memory=2048) for i in range(1000)]
    requests = [request(job(RequestMemory=1000 + k), count=300, autocluster_id=k) for k in range(5)]
    matches, stats = run(requests, slots)
    assert stats.matches == 1000
    assert stats.slot_groups == 1
    assert stats.match_evaluations <= 5  # one per (autocluster, group)
    # Popped in Name order.
    assert matched_names(matches) == sorted(matched_names(matches))


def test_slots_differing_in_what_jobs_look_at_are_not_grouped() -> None:
    # Foo is looked at through Bar: slots that differ in Foo only must still be told apart.
    slots = [slot(f"s{i}", Bar="=MY.Foo * 2", Foo=i % 2) for i in range(10)]
    ad = job(Requirements=f"=TARGET.Bar == 2 && {JOB_REQUIREMENTS}")
    matches, stats = run([request(ad, count=10)], slots)
    assert matched_names(matches) == ["s1", "s3", "s5", "s7", "s9"]
    assert stats.slot_groups == 2


def test_slots_differing_in_their_own_policy_are_not_grouped() -> None:
    slots = [slot(f"s{i}", Start=f"=TARGET.RequestMemory <= {1000 * i}") for i in range(4)]
    matches, _ = run([request(job(RequestMemory=1500), count=10)], slots)
    assert matched_names(matches) == ["s2", "s3"]


# -- fair share ----------------------------------------------------------------------------------


def two_submitters(alice_jobs: int, bob_jobs: int, slots: int = 100) -> Counter[str]:
    priorities = Priorities(None)
    priorities.set_factor("alice@pool", 1.0)
    priorities.set_factor("bob@pool", 3.0)
    requests = [request(job(), count=alice_jobs, submitter="alice@pool", autocluster_id=1),
                request(job(), count=bob_jobs, submitter="bob@pool", autocluster_id=2)]
    matches, _ = run(requests, [slot(f"slot{i:03d}") for i in range(slots)], priorities)
    return Counter(m.submitter for m in matches)


def test_fair_share_is_inversely_proportional_to_effective_priority() -> None:
    got = two_submitters(1000, 1000)
    assert got == {"alice@pool": 75, "bob@pool": 25}


def test_fair_share_with_an_uneven_pie() -> None:
    got = two_submitters(1000, 1000, slots=10)  # 7.5 : 2.5
    assert sum(got.values()) == 10  # nothing usable left idle
    assert got["alice@pool"] in (7, 8) and got["bob@pool"] in (2, 3)


def test_a_submitter_wanting_less_than_its_share_gets_it_and_the_rest_goes_to_the_other() -> None:
    got = two_submitters(10, 1000)
    assert got == {"alice@pool": 10, "bob@pool": 90}
    got = two_submitters(1000, 5)
    assert got == {"alice@pool": 95, "bob@pool": 5}


def test_usage_lowers_a_submitters_share() -> None:
    priorities = Priorities(None)
    priorities.update({}, 0.0)
    priorities.update({"heavy@pool": 30.0, "light@pool": 10.0}, 1e9)  # steady state: 30 vs 10
    requests = [request(job(), count=100, submitter=name, autocluster_id=k)
                for k, name in enumerate(["heavy@pool", "light@pool"])]
    matches, _ = run(requests, [slot(f"slot{i:02d}") for i in range(40)], priorities)
    assert Counter(m.submitter for m in matches) == {"light@pool": 30, "heavy@pool": 10}


def test_shares_are_counted_in_cpus() -> None:
    # Equal priorities; alice's jobs take 4-cpu static slots, bob's 1-cpu ones.
    priorities = Priorities(None)
    slots = [slot(f"big{i}", Cpus=4, Kind="big") for i in range(10)] + [slot(f"small{i:02d}", Kind="small")
                                                                        for i in range(40)]
    requests = [request(job(Requirements='=TARGET.Kind == "big"'), count=100, submitter="alice@pool"),
                request(job(Requirements='=TARGET.Kind == "small"'), count=100, submitter="bob@pool",
                        autocluster_id=2)]
    matches, _ = run(requests, slots, priorities)
    got = Counter(m.submitter for m in matches)
    assert got == {"alice@pool": 10, "bob@pool": 40}  # 40 cpus each


def test_a_submitters_requests_are_served_in_the_order_given() -> None:
    requests = [request(job(RequestMemory=1000), count=3, autocluster_id=10),
                request(job(RequestMemory=500), count=3, autocluster_id=5)]
    matches, _ = run(requests, [slot(f"s{i}") for i in range(4)])
    assert [m.autocluster_id for m in matches] == [10, 10, 10, 5]


def test_the_best_priority_is_served_first_when_slots_are_scarce() -> None:
    priorities = Priorities(None)
    priorities.set_factor("alice@pool", 10.0)
    priorities.set_factor("bob@pool", 1.0)
    requests = [request(job(), count=5, submitter="alice@pool", autocluster_id=1),
                request(job(), count=5, submitter="bob@pool", autocluster_id=2)]
    matches, _ = run(requests, [slot("only")], priorities)
    assert [m.submitter for m in matches] == ["bob@pool"]


# -- hostile input -------------------------------------------------------------------------------


def test_hostile_slot_ads_are_skipped_rather_than_crashing_the_cycle() -> None:
    no_cpus = slot("no-cpus")
    del no_cpus["Cpus"]
    no_state = slot("no-state")
    del no_state["State"]
    slots = [
        no_cpus,
        slot("memory-not-a-number", Memory="lots"),
        slot("negative-disk", Disk=-1),
        slot("requirements-error", Requirements="=1/0 == 1 || error"),
        slot("start-error", Start='="a" + 1'),
        slot("name-not-a-string", Name="=42"),
        no_state,
        slot("rank-error", Rank="=1/0"),
        "not a classad",  # type: ignore[list-item]
        slot("good"),
    ]
    matches, stats = run([request(job(), count=10)], slots)
    assert sorted(matched_names(matches)) == ["good", "rank-error"]  # an error Rank is rank 0
    assert stats.skipped_slots == 6  # the errors in expressions are only non-matches


def test_hostile_requests_are_skipped() -> None:
    bad_cpus = job(RequestCpus="many")
    zero_cpus = job(RequestCpus=0)
    requests = [request(bad_cpus), request(zero_cpus, autocluster_id=2), request(job(), count=0, autocluster_id=3),
                request(job(Requirements="=1/0"), autocluster_id=4), request(job(), autocluster_id=5)]
    matches, stats = run(requests, [slot("a"), slot("b")])
    assert [m.autocluster_id for m in matches] == [5]
    assert stats.skipped_requests == 3 and stats.requests == 2


def test_the_cycle_is_deterministic() -> None:
    slots = [slot(f"s{i}", GLIDEIN_Site=f"S{i % 3}", Cpus=1 + i % 2) for i in range(30)]
    slots += [pslot(f"p{i}", 4, 8000, GLIDEIN_Site=f"S{i % 3}") for i in range(5)]
    requests = [request(job(RequestCpus=1 + k % 2, Requirements=f'=TARGET.GLIDEIN_Site != "S{k % 3}"'), count=20,
                        submitter=f"u{k % 3}@pool", autocluster_id=k) for k in range(6)]
    first, _ = run(requests, slots)
    second, _ = run(requests, list(reversed(slots)))
    assert [(m.slot_name, m.autocluster_id) for m in first] == [(m.slot_name, m.autocluster_id) for m in second]


# -- signatures for the schedd -------------------------------------------------------------------


def test_significant_job_attributes_follow_what_slots_refer_to() -> None:
    slots = [slot("a", Start='=TARGET.Owner != "mallory" && MY.Flavor', Flavor='=TARGET.x509UserProxyVOName == "cms"'),
             slot("b", Rank="=TARGET.JobPrio", Requirements="=START && isUndefined(TARGET.Foo)")]
    names = {n.lower() for n in significant_job_attributes(slots)}
    assert {"owner", "x509userproxyvoname", "jobprio", "foo"} <= names
    assert {"requirements", "rank", "requestcpus", "requestmemory", "requestdisk"} <= names
    assert "flavor" not in names  # the slot's own attribute


def test_autocluster_signature_includes_what_significant_attributes_refer_to() -> None:
    significant = ["Requirements", "RequestCpus"]
    requirements = "=stringListMember(TARGET.GLIDEIN_Site, DESIRED_Sites)"
    a = job(Requirements=requirements, DESIRED_Sites="A,B", Cmd="/bin/a")
    b = job(Requirements=requirements, DESIRED_Sites="A,B", Cmd="/bin/b")
    c = job(Requirements=requirements, DESIRED_Sites="C", Cmd="/bin/a")
    assert autocluster_signature(a, significant) == autocluster_signature(b, significant)
    assert autocluster_signature(a, significant) != autocluster_signature(c, significant)
    assert autocluster_signature(job(RequestCpus=1), significant) != autocluster_signature(job(RequestCpus=1.0),
                                                                                             significant)
    hash(autocluster_signature(a, significant))


@pytest.mark.parametrize("count", [1, 7])
def test_match_count_never_exceeds_idle_jobs(count: int) -> None:
    matches, _ = run([request(job(), count=count)], [slot(f"s{i}") for i in range(5)] + [pslot("p", 8, 16000)])
    assert len(matches) == count


# -- against a reference without grouping --------------------------------------------------------

def reference_state(slots: list[classads.ClassAd]) -> list[dict]:
    return [{"name": ad["Name"], "ad": ad, "p": ad["SlotType"] == "Partitionable", "cpus": ad["Cpus"],
             "memory": ad["Memory"], "disk": ad["Disk"], "free": True} for ad in slots]


def reference_evaluate(job_ad: classads.ClassAd, s: dict) -> tuple[float, float] | None:
    """(job Rank, slot Rank) if the job matches slot state ``s``, evaluating it from scratch."""
    ad = classads.without(s["ad"], ())
    ad["Cpus"], ad["Memory"], ad["Disk"] = s["cpus"], s["memory"], s["disk"]
    want = (job_ad["RequestCpus"], job_ad["RequestMemory"], job_ad["RequestDisk"])
    if s["p"] and (want[0] > s["cpus"] or want[1] > s["memory"] or want[2] > s["disk"]):
        return None
    if not classads.symmetric_match(job_ad, ad):
        return None
    if classads.evaluate(ad, "Start", job_ad) is not True:
        return None
    return classads.rank(job_ad, ad), classads.rank(ad, job_ad)


def reference_carve(s: dict, job_ad: classads.ClassAd) -> None:
    if not s["p"]:
        s["free"] = False
        return
    s["cpus"] -= job_ad["RequestCpus"]
    s["memory"] -= job_ad["RequestMemory"]
    s["disk"] -= job_ad["RequestDisk"]
    if s["cpus"] <= 0:
        s["free"] = False


def reference_cycle(requests: list[ResourceRequest], slots: list[classads.ClassAd]) -> list[tuple[str, int]]:
    """One submitter, no limits: every job, in order, takes the best matching slot, found by
    evaluating every slot; partitionable slots are carved depth-first."""
    state = reference_state(slots)
    out = []
    for req in requests:
        remaining = req.count
        while remaining:
            best = None
            for s in state:
                if not s["free"]:
                    continue
                ranks = reference_evaluate(req.job_ad, s)
                if ranks is not None:
                    key = (-ranks[0], -ranks[1], s["name"])
                    if best is None or key < best[0]:
                        best = (key, s)
            if best is None:
                break
            s = best[1]
            while True:
                out.append((s["name"], req.autocluster_id))
                remaining -= 1
                reference_carve(s, req.job_ad)
                if not s["free"] or not remaining or reference_evaluate(req.job_ad, s) is None:
                    break
    return out


slot_specs = st.lists(st.tuples(st.integers(0, 2), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1000, 3000, 8000]),
                                st.booleans(), st.integers(0, 2)), min_size=1, max_size=25)
request_specs = st.lists(st.tuples(st.integers(1, 3), st.sampled_from([500, 1000, 2500]), st.integers(-1, 2),
                                   st.booleans(), st.integers(1, 12)), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(slot_specs, request_specs, st.randoms(use_true_random=False))
def test_grouped_matching_agrees_with_evaluating_every_slot(slot_list, request_list, rng) -> None:
    slots = []
    for i, (site, cpus, memory, partitionable, rank) in enumerate(slot_list):
        attrs: dict[str, object] = {"GLIDEIN_Site": f"S{site}", "Cpus": cpus, "Memory": memory * cpus // 2,
                                    "Disk": 10_000 * cpus, "Rank": f"={rank}",
                                    "Start": "=TARGET.RequestMemory <= MY.Memory"}
        if partitionable:
            attrs["SlotType"] = "Partitionable"
        slots.append(slot(f"slot{rng.randrange(10**6):06d}-{i}", **attrs))
    requests = []
    for k, (cpus, memory, site, ranked, count) in enumerate(request_list):
        requirements = JOB_REQUIREMENTS + " && TARGET.Disk >= RequestDisk"
        if site >= 0:
            requirements = f'TARGET.GLIDEIN_Site != "S{site}" && ' + requirements
        attrs = {"RequestCpus": cpus, "RequestMemory": memory, "RequestDisk": 1000 * cpus,
                 "Requirements": "=" + requirements}
        if ranked:
            attrs["Rank"] = "=TARGET.Memory"
        requests.append(request(job(**attrs), count=count, autocluster_id=k))
    matches, _ = run(requests, slots)
    assert [(m.slot_name, m.autocluster_id) for m in matches] == reference_cycle(requests, slots)


pslot_specs = st.lists(st.tuples(st.integers(0, 99), st.sampled_from([4, 8, 16]), st.booleans()), min_size=1,
                       max_size=12)
ranked_request_specs = st.lists(st.tuples(st.integers(1, 4), st.sampled_from([None, "TARGET.Cpus", "-TARGET.Cpus"]),
                                          st.integers(1, 6)), min_size=2, max_size=6)


@settings(max_examples=150, deadline=None)
@given(pslot_specs, ranked_request_specs)
def test_carved_slots_keep_rank_and_name_order(slot_list, request_list) -> None:
    # Mostly partitionable slots of different sizes and jobs preferring big or small ones: carved
    # slots move between groups, and the first Name of a group can go down as well as up.
    slots = []
    for i, (number, cpus, partitionable) in enumerate(slot_list):
        attrs: dict[str, object] = {"Cpus": cpus, "Memory": 64000, "Disk": 800000,
                                    "Start": "=TARGET.RequestMemory <= MY.Memory"}
        if partitionable:
            attrs["SlotType"] = "Partitionable"
        slots.append(slot(f"s{number:02d}-{i}", **attrs))
    requests = []
    for k, (cpus, rank, count) in enumerate(request_list):
        attrs = {"RequestCpus": cpus, "RequestMemory": 1000, "RequestDisk": 1000}
        if rank:
            attrs["Rank"] = "=" + rank
        requests.append(request(job(**attrs), count=count, autocluster_id=k))
    matches, _ = run(requests, slots)
    assert [(m.slot_name, m.autocluster_id) for m in matches] == reference_cycle(requests, slots)


@settings(max_examples=100, deadline=None)
@given(slot_specs, st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3), st.sampled_from([500, 1000, 2500]),
                                      st.integers(-1, 2), st.integers(1, 30)), min_size=1, max_size=8),
       st.lists(st.sampled_from([1.0, 2.0, 3.0, 10.0]), min_size=4, max_size=4))
def test_fair_share_leaves_nothing_usable_idle(slot_list, request_list, factors) -> None:
    priorities = Priorities(None)
    for user, factor in enumerate(factors):
        priorities.set_factor(f"u{user}@pool", factor)
    slots = []
    for i, (site, cpus, memory, partitionable, _) in enumerate(slot_list):
        attrs: dict[str, object] = {"GLIDEIN_Site": f"S{site}", "Cpus": cpus, "Memory": memory * cpus // 2,
                                    "Disk": 10_000 * cpus, "Start": "=TARGET.RequestMemory <= MY.Memory"}
        if partitionable:
            attrs["SlotType"] = "Partitionable"
        slots.append(slot(f"slot{i:03d}", **attrs))
    requests = []
    for k, (user, cpus, memory, site, count) in enumerate(request_list):
        requirements = JOB_REQUIREMENTS
        if site >= 0:
            requirements = f'TARGET.GLIDEIN_Site != "S{site}" && ' + requirements
        requests.append(request(job(RequestCpus=cpus, RequestMemory=memory, RequestDisk=1000 * cpus,
                                    Requirements="=" + requirements),
                                count=count, submitter=f"u{user}@pool", autocluster_id=k))
    matches, _ = run(requests, slots, priorities)

    # Every match is a real one, and no slot is given out beyond what it has.
    state = {s["name"]: s for s in reference_state(slots)}
    by_id = {r.autocluster_id: r for r in requests}
    for m in matches:
        s = state[m.slot_name]
        assert s["free"]
        assert reference_evaluate(by_id[m.autocluster_id].job_ad, s) is not None
        reference_carve(s, by_id[m.autocluster_id].job_ad)
    got = Counter(m.autocluster_id for m in matches)
    assert all(got[r.autocluster_id] <= r.count for r in requests)
    # Work conservation: no job still idle could have used a slot still free.
    for r in requests:
        if got[r.autocluster_id] < r.count:
            assert all(reference_evaluate(r.job_ad, s) is None for s in state.values() if s["free"])


def test_shared_evaluations_see_what_job_attributes_refer_back_to() -> None:
    # The slots differ only in GLIDEIN_Site, which their START does not mention; but the job's
    # RequestMemory, which START looks at, depends on it.
    slots = [slot("a", GLIDEIN_Site="A", Memory=2048, Start="=TARGET.RequestMemory <= MY.Memory"),
             slot("b", GLIDEIN_Site="B", Memory=2048, Start="=TARGET.RequestMemory <= MY.Memory")]
    ad = job(RequestMemory='=ifThenElse(TARGET.GLIDEIN_Site == "A", 100000, 1000)', Requirements="=true")
    matches, _ = run([request(ad, count=2)], slots)
    assert [(m.slot_name, m.request_memory) for m in matches] == [("b", 1000)]


def test_jobs_that_do_not_look_at_the_site_share_evaluations_across_sites() -> None:
    slots = [slot(f"s{i:03d}", GLIDEIN_Site=f"Site{i % 20}") for i in range(200)]
    requests = [request(job(RequestMemory=1000 + k), count=1, autocluster_id=k) for k in range(3)]
    requests.append(request(job(Requirements='=TARGET.GLIDEIN_Site == "Site7"'), count=20, autocluster_id=9))
    matches, stats = run(requests, slots)
    assert stats.slot_groups == 20
    assert len(matches) == 3 + 10
    assert sorted(m.slot_name for m in matches if m.autocluster_id == 9) == [f"s{i:03d}" for i in range(7, 200, 20)]
    assert stats.match_evaluations <= 3 + 20


def test_slices_smaller_than_a_job_give_one_job_each_in_priority_order() -> None:
    # Four equal submitters, a 12-cpu partitionable slot, 4-cpu jobs: every slice (3 cpus) is
    # too small for a job.  Rather than leave the slot idle, each of the first three (equal
    # priorities go by name) gets one job; nobody gets the whole slot.
    priorities = Priorities(None)
    requests = [request(job(RequestCpus=4, RequestMemory=100), count=10, submitter=f"u{k}@pool",
                        autocluster_id=k) for k in (3, 2, 1, 0)]
    matches, _ = run(requests, [pslot("p", 12, 12000)], priorities)
    assert [m.submitter for m in matches] == ["u0@pool", "u1@pool", "u2@pool"]
