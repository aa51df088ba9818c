"""``gwms q --analyze``: the analysis on hand-made ads, and the command's glue with fakes (no network)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from gwms import classads
from gwms.cli import UsageError, build_parser, dispatch
from gwms.cli.analyze import Clause, Report, analyze, analyze_job, parse_job_id


def _ad(values: dict[str, object]) -> classads.ClassAd:
    """An ad from Python values; strings starting with '=' are expressions."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str) and value.startswith("="):
            parts.append(f"{key} = {value[1:]}")
        elif isinstance(value, str):
            parts.append(f"{key} = {classads.quote(value)}")
        else:
            parts.append(f"{key} = {value}")
    return classads.parse_new("[" + "; ".join(parts) + "]")


def job(**attrs: object) -> classads.ClassAd:
    values: dict[str, object] = {
        "ClusterId": 12, "ProcId": 0, "Owner": "alice", "JobStatus": 1, "RequestCpus": 1, "RequestMemory": 2048,
        # condor_submit style, plus an unscoped name that must mean the slot's (HTCondor's scope rule)
        "Requirements": '=(TARGET.Arch == "X86_64") && (TARGET.OpSys == "LINUX") && (Memory >= RequestMemory)',
    }
    values.update(attrs)
    return _ad(values)


def slot(name: str, **attrs: object) -> classads.ClassAd:
    values: dict[str, object] = {
        "Name": name, "Arch": "X86_64", "OpSys": "LINUX", "Cpus": 1, "Memory": 4096, "State": "Unclaimed",
        "Activity": "Idle", "Start": "=true", "Requirements": "=START",
    }
    values.update(attrs)
    return _ad(values)


# -- the analysis ---------------------------------------------------------------------------------


def test_counts_each_clause_the_whole_requirements_and_the_slots_side():
    slots = [
        slot("small", Memory=1024),  # rejected by clause 3
        slot("arm", Arch="aarch64", Memory=1024),  # rejected by clauses 1 and 3
        slot("picky", Start='=TARGET.Owner == "bob"'),  # matches, but its START refuses alice
        slot("busy", State="Claimed", Activity="Busy"),  # matches both ways, already claimed
        slot("free"),
        slot("free2", Start="=RequestMemory <= Memory"),  # unscoped job name in START: the job's
    ]
    report = analyze_job(job(), slots)
    assert report.slots == 6
    assert report.clauses == (
        Clause('TARGET.Arch == "X86_64"', 1),
        Clause('TARGET.OpSys == "LINUX"', 0),
        Clause("Memory >= RequestMemory", 2),
    )
    assert (report.matching, report.refusing, report.claimed, report.available) == (4, 1, 1, 2)
    assert report.verdict() == "2 slots can run this job now"


def test_a_clause_that_rejects_every_slot_is_named():
    report = analyze_job(job(RequestMemory=100_000), [slot("a"), slot("b", Arch="aarch64")])
    assert report.matching == 0
    assert report.verdict() == "no slot matches: clause [3] Memory >= RequestMemory rejects all 2 slots"
    only = analyze_job(job(RequestMemory=100_000), [slot("a")])
    assert only.verdict() == "no slot matches: clause [3] Memory >= RequestMemory rejects the only slot"


def test_when_no_single_clause_rejects_all_slots_the_strictest_is_named():
    slots = [slot("arm", Arch="aarch64"), slot("small", Memory=1), slot("small2", Memory=1)]
    report = analyze_job(job(), slots)
    assert [c.rejects for c in report.clauses] == [1, 0, 2]
    assert report.verdict() == ("no slot matches: no single clause rejects all 3 slots, but together they do "
                                "(clause [3] rejects the most: 2)")


def test_a_requirements_that_is_not_a_conjunction_is_one_clause():
    report = analyze_job(job(Requirements='=TARGET.Arch == "SPARC" || TARGET.Memory > 1000000'), [slot("a")])
    assert len(report.clauses) == 1
    assert report.verdict().startswith("no slot matches: clause [1] ")


def test_slots_that_refuse_the_job():
    slots = [slot("a", Start='=Owner == "bob"'), slot("b", Requirements="=false")]
    report = analyze_job(job(), slots)
    assert (report.matching, report.refusing) == (2, 2)
    assert report.verdict() == ("no slot matches: the 2 slots that satisfy the job's Requirements refuse the job "
                                "(their START or Requirements)")


def test_matching_slots_that_are_all_claimed():
    report = analyze_job(job(), [slot("a", State="Claimed", Activity="Busy"), slot("b", Activity="Busy")])
    assert (report.matching, report.refusing, report.claimed) == (2, 0, 2)
    assert report.verdict() == "no free slot: the 2 slots that match the job are already claimed"


def test_a_job_without_requirements_matches_every_slot():
    ad = job()
    del ad["Requirements"]
    report = analyze_job(ad, [slot("a"), slot("b")])
    assert report.requirements is None and report.clauses == ()
    assert report.verdict() == "2 slots can run this job now"


def test_an_empty_pool():
    assert analyze_job(job(), []).verdict() == "no slot matches: the pool has no slots"


@pytest.mark.parametrize(("attrs", "verdict"), [
    ({"JobStatus": 5, "HoldReason": "Error from starter: out of memory"}, "held: Error from starter: out of memory"),
    ({"JobStatus": 5}, "held (no HoldReason given)"),
    ({"JobStatus": 2, "RemoteHost": "slot1@wn1.example.org"}, "running on slot slot1@wn1.example.org"),
    ({"JobStatus": 7, "RemoteHost": "slot1@wn1.example.org"}, "suspended on slot slot1@wn1.example.org"),
    ({"JobStatus": 4}, "completed"),
    ({"JobStatus": 3}, "removed"),
])
def test_the_verdict_of_a_job_that_is_not_idle_is_its_state(attrs, verdict):
    assert analyze_job(job(**attrs), [slot("a")]).verdict() == verdict


def test_the_report_as_printed():
    slots = [slot("small", Memory=1024), slot("busy", State="Claimed"), slot("free")]
    assert analyze_job(job(), slots).format() == (
        "Job 12.0 (alice): idle\n"
        'Requirements: (TARGET.Arch == "X86_64") && (TARGET.OpSys == "LINUX") && (Memory >= RequestMemory)\n'
        "\n"
        "Slots rejected by each clause of the Requirements:\n"
        '  [1] 0  TARGET.Arch == "X86_64"\n'
        '  [2] 0  TARGET.OpSys == "LINUX"\n'
        "  [3] 1  Memory >= RequestMemory\n"
        "\n"
        "Slots in the pool:                                          3\n"
        "  satisfying the job's Requirements:                        2\n"
        "  of those, refusing the job (their START or Requirements): 0\n"
        "  of the rest, already claimed:                             1\n"
        "  free to run the job now:                                  1\n"
        "\n"
        "Verdict: 1 slot can run this job now\n"
    )


def test_a_report_is_plain_data():
    report = Report(job_id="1.0", owner=None, status=None, hold_reason=None, remote_host=None, requirements=None,
                    slots=0, clauses=(), matching=0, refusing=0, claimed=0)
    assert "Job 1.0: status unknown" in report.format()


@pytest.mark.parametrize(("text", "expected"), [("12.0", (12, 0)), ("12.3", (12, 3)), (" 7 ", (7, 0))])
def test_job_ids(text, expected):
    assert parse_job_id(text) == expected


@pytest.mark.parametrize("text", ["", "x", "12.", ".3", "1.2.3", "-1"])
def test_bad_job_ids_are_usage_errors(text):
    with pytest.raises(UsageError, match="not a job id"):
        parse_job_id(text)


# -- the command, with the schedd and the collectors faked ----------------------------------------


class FakeSchedd:
    reactor = None

    def __init__(self, queue: list[classads.ClassAd], history: list[classads.ClassAd]) -> None:
        self.queue = queue
        self.history = history
        self.constraints: list[tuple[str | None, bool]] = []

    def query(self, constraint: str | None = None, history: bool = False, limit: int | None = None, **_: Any) -> Any:
        self.constraints.append((constraint, history))
        ads = self.history if history else self.queue
        return defer.succeed([ad for ad in ads if classads.evaluate_constraint(constraint, ad)])


class FakeCollectors:
    closed = False

    def __init__(self, reactor: Any, addresses: Any, security: Any) -> None:
        FakeCollectors.instance = self

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def pool(monkeypatch):
    """Fake schedd contents and slots; returns the schedd (for its queue, history, queries)."""
    import gwms.cli.jobs
    import gwms.cli.status
    import gwms.protocols.client

    schedd = FakeSchedd([], [])
    slots: list[classads.ClassAd] = []

    def run(args: Any, work: Any) -> Any:  # gwms.cli.jobs._run without a reactor or a socket
        box: list[Any] = []
        defer.maybeDeferred(work, schedd).addBoth(box.append)
        if isinstance(box[0], Failure):
            if box[0].check(UsageError):
                raise UsageError(box[0].getErrorMessage())
            box[0].raiseException()
        return box[0]

    monkeypatch.setattr(gwms.cli.jobs, "_run", run)
    monkeypatch.setattr(gwms.cli.status, "client_setup", lambda args: ("security", ["collector:9618"]))
    monkeypatch.setattr(gwms.protocols.client, "CollectorList", FakeCollectors)
    monkeypatch.setattr(gwms.protocols.client, "query_ads", lambda collectors, ad_type: defer.succeed(list(slots)))
    schedd.slots = slots  # type: ignore[attr-defined]
    return schedd


def test_the_command_prints_the_report_of_the_queued_job(pool, capsys):
    pool.queue += [job(ProcId=1, RequestMemory=10**6), job()]
    pool.slots += [slot("a"), slot("b", Memory=1)]
    args = build_parser().parse_args(["q", "--analyze", "12.0"])
    assert dispatch(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("Job 12.0 (alice): idle\n")
    assert out.endswith("Verdict: 1 slot can run this job now\n")
    assert pool.constraints == [("ClusterId == 12 && ProcId == 0", False)]
    assert FakeCollectors.instance.closed


def test_a_job_that_left_the_queue_is_found_in_the_history(pool, capsys):
    pool.history.append(job(JobStatus=4))
    assert analyze(build_parser().parse_args(["q", "--analyze", "12"])) == 0
    assert capsys.readouterr().out.endswith("Verdict: completed\n")
    assert [history for _constraint, history in pool.constraints] == [False, True]


def test_a_job_that_does_not_exist_is_a_one_line_usage_error(pool, capsys):
    pool.queue.append(job())
    args = build_parser().parse_args(["q", "--analyze", "99.0"])
    assert dispatch(args) == 2
    assert capsys.readouterr().err == "gwms q: job 99.0 not found\n"


def test_a_bad_job_id_is_a_usage_error_before_any_query(pool, capsys):
    assert dispatch(build_parser().parse_args(["q", "--analyze", "twelve"])) == 2
    assert "not a job id" in capsys.readouterr().err
    assert pool.constraints == []
