"""``gwms q --analyze ID``: why a job does not run, as condor_q -better-analyze tells it.

The analysis is pure (:func:`analyze_job` on a job ad and the pool's slot ads, giving a
:class:`Report`); :func:`analyze` only fetches the ads and prints the report.  Every evaluation
goes through :mod:`gwms.classads` with HTCondor's matchmaking scope rule, so an unscoped name
in the job's Requirements (``Memory >= 1024``) means the slot's, as it does in the negotiator.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gwms import classads
from gwms.cli import UsageError

# JobStatus values, as condor_q names them.
IDLE, RUNNING, REMOVED, COMPLETED, HELD, TRANSFERRING_OUTPUT, SUSPENDED = 1, 2, 3, 4, 5, 6, 7
STATUS_NAMES = {IDLE: "idle", RUNNING: "running", REMOVED: "removed", COMPLETED: "completed", HELD: "held",
                TRANSFERRING_OUTPUT: "transferring output", SUSPENDED: "suspended"}

_JOB_ID_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?")


@dataclass(frozen=True)
class Clause:
    """One top-level ``&&`` clause of the job's Requirements."""

    text: str  # as classad2 prints it
    rejects: int  # slots for which it is not true (false, UNDEFINED or ERROR)


@dataclass(frozen=True)
class Report:
    """What :func:`analyze_job` found; :meth:`format` is what ``gwms q --analyze`` prints."""

    job_id: str
    owner: str | None
    status: int | None
    hold_reason: str | None
    remote_host: str | None
    requirements: str | None  # the job's Requirements as classad2 prints it; None if it has none
    slots: int  # slot ads in the pool
    clauses: tuple[Clause, ...]
    matching: int  # slots that satisfy the job's whole Requirements
    refusing: int  # of those, slots whose START or Requirements refuse the job
    claimed: int  # of those that match both ways, slots already claimed (or busy)

    @property
    def available(self) -> int:
        """Slots that match both ways and are free: the ones that can run the job now."""
        return self.matching - self.refusing - self.claimed

    def verdict(self) -> str:
        """One line: why the job does (not) run."""
        if self.status == HELD:
            return f"held: {self.hold_reason}" if self.hold_reason else "held (no HoldReason given)"
        if self.status in (RUNNING, TRANSFERRING_OUTPUT, SUSPENDED):
            where = f" on slot {self.remote_host}" if self.remote_host else ""
            return f"{STATUS_NAMES[self.status]}{where}"
        if self.status == COMPLETED:
            return "completed"
        if self.status == REMOVED:
            return "removed"
        if self.slots == 0:
            return "no slot matches: the pool has no slots"
        if self.available:
            return f"{_count(self.available, 'slot')} can run this job now"
        if self.matching == 0:
            for number, clause in enumerate(self.clauses, start=1):
                if clause.rejects == self.slots:
                    return f"no slot matches: clause [{number}] {clause.text} rejects {_all(self.slots)}"
            if self.clauses:
                # Every slot fails some clause, but not the same one: name the strictest.
                number, clause = max(enumerate(self.clauses, start=1), key=lambda pair: pair[1].rejects)
                return (f"no slot matches: no single clause rejects {_all(self.slots)}, but together they do "
                        f"(clause [{number}] rejects the most: {clause.rejects})")
            return f"no slot matches: the job's Requirements reject {_all(self.slots)}"
        if self.refusing == self.matching:
            return (f"no slot matches: the {_count(self.matching, 'slot')} that satisfy the job's Requirements "
                    f"refuse the job (their START or Requirements)")
        return f"no free slot: the {_count(self.claimed, 'slot')} that match the job are already claimed"

    def format(self) -> str:
        status = STATUS_NAMES.get(self.status, f"status {self.status}") if self.status is not None else "status unknown"
        owner = f" ({self.owner})" if self.owner else ""
        lines = [f"Job {self.job_id}{owner}: {status}"]
        if self.requirements is None:
            lines.append("Requirements: none (every slot satisfies them)")
        else:
            lines.append(f"Requirements: {self.requirements}")
        if len(self.clauses) > 1:
            lines += ["", "Slots rejected by each clause of the Requirements:"]
            width = len(str(self.slots))
            for number, clause in enumerate(self.clauses, start=1):
                lines.append(f"  [{number}] {clause.rejects:>{width}}  {clause.text}")
        counts = [
            ("Slots in the pool", self.slots),
            ("  satisfying the job's Requirements", self.matching),
            ("  of those, refusing the job (their START or Requirements)", self.refusing),
            ("  of the rest, already claimed", self.claimed),
            ("  free to run the job now", self.available),
        ]
        label_width = max(len(label) for label, _ in counts) + 1
        number_width = len(str(self.slots))
        lines.append("")
        lines += [f"{label + ':':<{label_width}} {value:>{number_width}}" for label, value in counts]
        lines += ["", f"Verdict: {self.verdict()}"]
        return "\n".join(lines) + "\n"


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _count(n: int, word: str) -> str:
    return f"{n} {_plural(n, word)}"


def _all(n: int) -> str:
    return "the only slot" if n == 1 else f"all {n} slots"


def _text(ad: classads.ClassAd, name: str) -> str | None:
    value = classads.evaluate(ad, name)
    return None if value is None or value is classads.ERROR else str(value)


def _is_free(slot: classads.ClassAd) -> bool:
    """Whether the negotiator would offer the slot: Unclaimed, and Idle if it says."""
    state = classads.evaluate(slot, "State")
    activity = classads.evaluate(slot, "Activity")
    return (isinstance(state, str) and state.lower() == "unclaimed"
            and (activity is None or (isinstance(activity, str) and activity.lower() == "idle")))


def job_id(job_ad: classads.ClassAd) -> str:
    return f"{classads.evaluate(job_ad, 'ClusterId')}.{classads.evaluate(job_ad, 'ProcId')}"


def analyze_job(job_ad: classads.ClassAd, slot_ads: Sequence[classads.ClassAd]) -> Report:
    """Why the job does (not) run on these slots: each Requirements clause's rejections, the
    slots matching the whole Requirements, how many of those refuse the job, how many are
    claimed.  Slot START and Requirements count as in the negotiator (both must hold; a
    missing one holds)."""
    try:
        requirements = job_ad.lookup("Requirements")
    except KeyError:
        requirements = None
    parts = classads.conjuncts(requirements) if requirements is not None else []
    rejects = [0] * len(parts)
    matching = refusing = claimed = 0
    for slot in slot_ads:
        for i, part in enumerate(parts):
            if not classads.evaluate_constraint(part, job_ad, slot):
                rejects[i] += 1
        if not classads.requirements_met(job_ad, slot):
            continue
        matching += 1
        if not (classads.requirements_met(slot, job_ad) and classads.requirements_met(slot, job_ad, "Start")):
            refusing += 1
        elif not _is_free(slot):
            claimed += 1
    status = classads.evaluate(job_ad, "JobStatus")
    return Report(
        job_id=job_id(job_ad),
        owner=_text(job_ad, "Owner"),
        status=status if isinstance(status, int) and not isinstance(status, bool) else None,
        hold_reason=_text(job_ad, "HoldReason"),
        remote_host=_text(job_ad, "RemoteHost"),
        requirements=None if requirements is None else repr(requirements),
        slots=len(slot_ads),
        clauses=tuple(Clause(repr(part).strip(), count) for part, count in zip(parts, rejects)),
        matching=matching,
        refusing=refusing,
        claimed=claimed,
    )


def parse_job_id(text: str) -> tuple[int, int]:
    """``12.0`` (or ``12``, meaning 12.0) as (cluster, proc)."""
    match = _JOB_ID_RE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"--analyze: {text!r} is not a job id (CLUSTER.PROC)")
    return int(match.group(1)), int(match.group(2) or 0)


def analyze(args: argparse.Namespace) -> int:
    from twisted.internet import defer

    from gwms.cli.jobs import _run
    from gwms.cli.status import client_setup
    from gwms.protocols.client import CollectorList, query_ads

    cluster, proc = parse_job_id(args.analyze)
    # The slots come from the pool's collectors: client_setup reads them from --config (q has
    # no --pool option; take one if a caller's parser adds it).
    security, addresses = client_setup(argparse.Namespace(pool=getattr(args, "pool", None), config=args.config))
    if not addresses:
        raise UsageError("no collectors configured: the [pool] collectors of --config are needed to find slots")
    constraint = f"ClusterId == {cluster} && ProcId == {proc}"

    @defer.inlineCallbacks
    def work(schedd: Any) -> Any:
        jobs = yield schedd.query(constraint)
        if not jobs:  # gone from the queue: completed or removed jobs are in the history
            jobs = yield schedd.query(constraint, history=True, limit=1)
        if not jobs:
            raise UsageError(f"job {cluster}.{proc} not found")
        collectors = CollectorList(schedd.reactor, addresses, security)
        try:
            slots = yield query_ads(collectors, "Machine")
        finally:
            collectors.close()
        return jobs[0], slots

    job_ad, slot_ads = _run(args, work)
    print(analyze_job(job_ad, slot_ads).format(), end="")
    return 0
