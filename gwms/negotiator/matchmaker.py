"""The negotiator's matchmaking core: idle autoclusters against slot ads, with fair share.

Pure code, no networking: :class:`Matchmaker.cycle` takes what the daemon collected and returns
the matches.  It follows HTCondor's negotiator where the design does not say otherwise:

* **Candidates.**  Slots in state Unclaimed (and activity Idle when the ad says).  A static slot
  is matched at most once per cycle.  A partitionable slot is matched again and again, as with
  HTCondor's consumption policies: every match carves the job's request off the resources we
  track for it, and the job Requirements and slot START of the next job are evaluated against
  the slot ad with the remaining Cpus/Memory/Disk, so a slot is given out until nothing fits.
  Depth first (HTCondor's NEGOTIATOR_DEPTH_FIRST): after a match, the same autocluster's next
  jobs go to what is left of that slot while they match and fit in the submitter's slice.
* **Matching** is :func:`classads.symmetric_match` (job Requirements against the slot, slot
  Requirements against the job) plus the slot's START, which counts like its Requirements.
  The best slot has the highest job Rank, then the highest slot Rank, then the smallest Name.
* **Fair share** is HTCondor's pie spin.  The pie is the Cpus of the candidate slots (slot
  weight = Cpus, HTCondor's default SLOT_WEIGHT).  Submitters are served in effective-priority
  order, each up to its slice, proportional to 1/effective priority; a submitter that cannot
  use its slice (no more jobs, nothing matches) leaves it for the next spin, where what is left
  is sliced again among those who still want something.  A slice limits the weight of what is
  matched (a static slot weighs its Cpus, a piece of a partitionable slot the cpus requested):
  a job takes the best slot that still fits in the slice, and a job none fits makes way for
  the submitter's next request.  When every slice is too small for the next job, each
  submitter in priority order gets one match beyond its slice, so that nothing usable stays
  idle.  A submitter's own requests are served in the order given (the schedd's job priority
  order).
* **Scale.**  The cost grows with the kinds of job and slot, not their counts.  Jobs arrive
  grouped in autoclusters; slots are grouped here by the values of their *significant*
  attributes: whatever any request's Requirements/Rank/Request* refer to on the TARGET side,
  the slot's own START/Requirements/Rank, Cpus/Memory/Disk, and what those refer to in turn.
  One evaluation per (autocluster, slot group) decides for every slot of the group; slots are
  then popped from the group in Name order.  A carved partitionable slot moves to the group of
  its new remaining resources.

Bad ads are skipped and counted, never allowed to stop the cycle: one broken startd or job must
not starve the pool.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from gwms import classads
from gwms.classads import ClassAd, ExprTree
from gwms.negotiator.priorities import Priorities

__all__ = [
    "CycleStats",
    "Match",
    "Matchmaker",
    "ResourceRequest",
    "autocluster_signature",
    "significant_job_attributes",
]

# Resource arithmetic is in floats (RequestMemory may be a real); comparisons allow this much.
_EPS: Final = 1e-9

_RESOURCES: Final = ("Cpus", "Memory", "Disk")
_REQUESTS: Final = ("RequestCpus", "RequestMemory", "RequestDisk")
# What a job gets when it does not say: one core, as condor_submit's default.  Memory and disk
# default to nothing (condor_submit always fills them in; a hand-made ad may not).
_REQUEST_DEFAULTS: Final = (1.0, 0.0, 0.0)
# Job attributes that always decide where a job can run, whatever the slots look at.
_JOB_POLICY: Final = ("Requirements", "Rank", *_REQUESTS)
# Slot expressions that always decide which jobs a slot takes and which it prefers.
_SLOT_EXPRESSIONS: Final = ("Start", "Requirements", "Rank")


# ---------------------------------------------------------------------------------------------
# Public data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceRequest:
    """One autocluster of idle jobs in one schedd."""

    schedd: str  # the schedd's Name
    submitter: str  # e.g. "alice@pool"
    autocluster_id: int
    job_ad: ClassAd  # representative job ad: Requirements, Rank, RequestCpus/Memory/Disk, ...
    count: int  # idle jobs in it


@dataclass(frozen=True)
class Match:
    schedd: str
    submitter: str
    autocluster_id: int
    slot_name: str  # Name of the slot ad (for a partitionable slot, the pslot's; several matches may name it)
    slot_ad: ClassAd  # the slot ad as received (it carries the private ClaimId the schedd needs)
    request_cpus: float  # what the job asked: the startd carves a dynamic slot of this size
    request_memory: float
    request_disk: float


@dataclass
class CycleStats:
    submitters: int  # submitters with valid requests
    requests: int  # valid requests (autoclusters)
    slots: int  # candidate slots (unclaimed, valid)
    slot_groups: int  # slot groups, including those made for carved partitionable slots
    matches: int
    match_evaluations: int  # ClassAd evaluations of an (autocluster, slot group) pair
    seconds: float
    skipped_slots: int = 0  # slot ads left out because they were malformed (not counting claimed ones)
    skipped_requests: int = 0  # requests left out because they were malformed
    spins: int = 0  # turns of the pie


# ---------------------------------------------------------------------------------------------
# What an expression refers to
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Refs:
    """The attribute references in one expression, by the scope they name.

    ``bare`` names are unscoped: they mean the ad's own attribute if it has one and otherwise
    (HTCondor's matchmaking fallback) the other ad's.  ``own_all``/``other_all``: a reference
    we cannot name (``TARGET["x"]``, a bare ``MY``, ``eval()``, ``parent``), so every attribute
    of that side may matter.
    """

    my: tuple[str, ...]
    target: tuple[str, ...]
    bare: tuple[str, ...]
    own_all: bool
    other_all: bool


_REFS_CACHE: dict[str, _Refs] = {}
_REFS_CACHE_MAX: Final = 20_000
# Asking an ad with no attributes gives the references as written, all of them "external",
# whatever the ad the expression came from defines (classad2's internalRefs follows an ad's
# own definitions, which would make the answer depend on the first ad we asked).
_NO_ATTRIBUTES: Final = ClassAd()


def _references(expr: ExprTree, text: str) -> _Refs:
    # Not classads.references: that one scans the printed text to tell MY.x from x exactly,
    # which costs ~0.8 s per cycle at 10,000 slots (measured with bench/negotiator.py). Here
    # classad2's own lists are enough: where it reports MY.x as a bare x (its HTCondor mode),
    # x counts for both sides, which only groups slots less finely, never wrongly.
    cached = _REFS_CACHE.get(text)
    if cached is not None:
        return cached
    my: list[str] = []
    target: list[str] = []
    bare: list[str] = []
    own_all = other_all = False
    names = _NO_ATTRIBUTES.externalRefs(expr) + _NO_ATTRIBUTES.internalRefs(expr)
    for ref in names:
        if not ref:
            continue  # classad2 returns [""] for none
        if "'" in ref or '"' in ref:
            own_all = other_all = True  # a quoted name or scope ('parent'): do not guess
            continue
        parts = ref.split(".")
        scope = parts[0].lower()
        if scope == "my":
            if len(parts) > 1:
                my.append(parts[1])
            else:
                own_all = True
        elif scope == "target":
            if len(parts) > 1:
                target.append(parts[1])
            else:
                other_all = True
        elif scope == "parent":
            own_all = other_all = True
        else:
            bare.append(parts[0])
    if "eval(" in text.lower():
        # eval() builds attribute references at run time: nothing above can see them.
        own_all = other_all = True
    refs = _Refs(tuple(my), tuple(target), tuple(bare), own_all, other_all)
    if len(_REFS_CACHE) >= _REFS_CACHE_MAX:
        _REFS_CACHE.clear()  # pathological input only; a cold cache costs time, not correctness
    _REFS_CACHE[text] = refs
    return refs


_MISSING: Final = ("missing",)


def _value_key(ad: ClassAd, name: str, value: object) -> object:
    """A hashable stand-in for an attribute's value that is equal exactly when the values are.

    Literals are compared with their type (1, 1.0 and true differ under =?=); anything else by
    classad2's own text of it.
    """
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool:
        return (kind, value)
    if isinstance(value, ExprTree):
        return ("expr", repr(value))
    return ("text", repr(ad.lookup(name)))


@dataclass(slots=True)
class _Walk:
    own: dict[str, object]  # lower-case name -> value key, for every own attribute that matters
    other: dict[str, str]  # lower-case name -> spelling, of the other ad's attributes referred to
    own_all: bool = False
    other_all: bool = False


def _walk(ad: ClassAd, names: Iterable[str], seeded: dict[str, object] | None = None) -> _Walk:
    """Follow references from ``names`` through ``ad``'s own attributes.

    ``own`` gets every attribute of ``ad`` that can influence their values (in a canonical
    order: equal for ads equal in them), ``other`` the attributes of the other ad they refer to.
    ``seeded`` entries are taken as already known and not followed.
    """
    own: dict[str, object] = {} if seeded is None else seeded
    other: dict[str, str] = {}
    own_all = other_all = False
    # (name, unscoped): an unscoped reference the ad cannot resolve is the other ad's.
    pending = [(name, False) for name in names]
    pending.reverse()  # popped from the end: keep the given order
    while pending:
        name, unscoped = pending.pop()
        low = name.lower()
        if low in own:
            continue
        try:
            value = ad[name]
        except KeyError:
            own[low] = _MISSING
            if unscoped:
                other.setdefault(low, name)  # HTCondor's matchmaking looks in TARGET next
            continue
        except UnicodeDecodeError:
            own[low] = ("bad-utf8",)
            continue
        if not isinstance(value, ExprTree):
            own[low] = _value_key(ad, name, value)
            continue
        text = repr(value)
        own[low] = ("expr", text)
        refs = _references(value, text)
        own_all = own_all or refs.own_all
        other_all = other_all or refs.other_all
        for ref in refs.target:
            other.setdefault(ref.lower(), ref)
        more = [*((ref, False) for ref in refs.my), *((ref, True) for ref in refs.bare)]
        more.reverse()
        pending.extend(more)
    return _Walk(own, other, own_all, other_all)


# ---------------------------------------------------------------------------------------------
# Signatures (used by the schedd to build autoclusters)
# ---------------------------------------------------------------------------------------------


def significant_job_attributes(slot_ads: Iterable[ClassAd]) -> frozenset[str]:
    """Job attributes that slot START/Requirements/Rank refer to (TARGET.x, or unscoped names
    the slot lacks), and what those slot expressions refer to in turn; plus the job's own
    Requirements, Rank and RequestCpus/Memory/Disk.  Names are case-insensitive, as in
    ClassAds; each appears once, spelled as first seen.

    If some slot refers to the job in a way that cannot be named (``TARGET["x"]``, ``eval``),
    the set holds ``"*"``: every job attribute is significant.
    """
    found: dict[str, str] = {name.lower(): name for name in _JOB_POLICY}
    for ad in slot_ads:
        if not isinstance(ad, ClassAd):
            continue
        try:
            walk = _walk(ad, _SLOT_EXPRESSIONS)
        except Exception:  # noqa: BLE001, S112 - a hostile ad must not break the schedd's bookkeeping
            continue
        for low, name in walk.other.items():
            found.setdefault(low, name)
        if walk.other_all:
            found["*"] = "*"
    return frozenset(found.values())


def autocluster_signature(job_ad: ClassAd, significant: Iterable[str]) -> tuple[Any, ...]:
    """A hashable value equal for two jobs exactly when they are equal in the ``significant``
    attributes and in every attribute of their own those refer to (``Requirements`` naming
    ``DESIRED_Sites`` makes DESIRED_Sites part of the signature).  Attribute names are
    case-insensitive; values compare with their type.  ``"*"`` in ``significant`` (see
    :func:`significant_job_attributes`) or a reference that cannot be named makes the whole
    ad the signature.
    """
    names = sorted({name.lower() for name in significant})
    if "*" not in names:
        walk = _walk(job_ad, names)
        if not walk.own_all:
            return tuple(walk.own.items())
    # Every attribute may matter: the whole ad, in a canonical order.
    return tuple((name.lower(), _value_key(job_ad, name, job_ad[name])) for name in sorted(job_ad, key=str.lower))


# ---------------------------------------------------------------------------------------------
# Cycle state
# ---------------------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    """A finite int or float (not bool, not classad2's Value, which is an IntEnum)."""
    kind = type(value)
    if (kind is int or kind is float) and math.isfinite(value):  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    return None


def _literal_rank(ad: ClassAd) -> float | None:
    """The ad's Rank if it needs no evaluation, as :func:`classads.rank` would give it; None
    if it is an expression."""
    try:
        value = ad["Rank"]
    except KeyError:
        return 0.0
    except UnicodeDecodeError:
        return 0.0
    kind = type(value)
    if kind is bool or kind is int or kind is float:
        result = float(value)  # type: ignore[arg-type]
        return 0.0 if math.isnan(result) else result
    if isinstance(value, ExprTree):
        return None
    return 0.0  # strings, lists, UNDEFINED...: not a number, rank 0


def _plain(value: float) -> int | float:
    # Remaining resources go back into ads: keep integers integers (1 =?= 1.0 is false).
    return int(value) if float(value).is_integer() else value


def _constraint(ad: ClassAd, name: str) -> classads.Constraint | None:
    """``ad``'s expression ``name`` ready to evaluate many times; None if the ad has none (no
    condition, as :func:`classads.symmetric_match` counts a missing Requirements)."""
    try:
        return classads.Constraint(name, ad.lookup(name))
    except KeyError:
        return None


class _Slot:
    __slots__ = ("ad", "base", "carved", "cpus", "disk", "memory", "name")

    def __init__(self, name: str, ad: ClassAd, cpus: float, memory: float, disk: float, base: tuple[Any, ...]):
        self.name = name
        self.ad = ad
        self.cpus = cpus
        self.memory = memory
        self.disk = disk
        self.base = base  # group key without the resources (partitionable slots change those)
        self.carved = False  # resources no longer those of ``ad``


_SEED_RESOURCES: Final = ("cpus", "memory", "disk")


def _slot_projection(walk: _Walk) -> tuple[Any, ...] | None:
    """From a walk seeded with the resources: what of the slot the expressions walked from can
    see apart from the resources (compared by value, separately).  None if some reference
    cannot be named."""
    if walk.own_all:
        return None
    items = iter(walk.own.items())
    for _ in _SEED_RESOURCES:
        next(items)
    return tuple(items)


class _Kind:
    """What the groups of slots equal in everything but their resources share: the policy
    expressions, compiled once, and for partitionable slots a private copy of one of their ads
    whose Cpus/Memory/Disk are set to those of the carved group being evaluated (cheaper than
    a copy per group, and the ads as received are never modified).

    ``policy`` is what the slot's own START/Requirements/Rank can see of it (None: anything),
    ``job_refs`` the job attributes they refer to (None: any); ``projections`` caches what job
    expressions referring to a set of slot attributes can see.  Those make evaluations
    shareable between kinds and autoclusters that look the same from where they are looked
    at (a job that does not care about the site sees the same slot at every site)."""

    __slots__ = (
        "ad",
        "job_refs",
        "policy",
        "projections",
        "rank",
        "requirements",
        "scratch",
        "scratch_state",
        "start",
    )

    def __init__(self, ad: ClassAd) -> None:
        self.ad = ad
        self.requirements = _constraint(ad, "Requirements")
        self.start = _constraint(ad, "Start")
        self.rank = _literal_rank(ad)  # known without evaluating, or None
        self.scratch: ClassAd | None = None
        self.scratch_state: tuple[float, float, float] | None = None
        walk = _walk(ad, _SLOT_EXPRESSIONS, dict.fromkeys(_SEED_RESOURCES))
        self.policy = _slot_projection(walk)
        self.job_refs = None if walk.other_all else tuple(sorted(walk.other))
        self.projections: dict[tuple[str, ...], tuple[Any, ...] | None] = {}

    def projection(self, names: tuple[str, ...]) -> tuple[Any, ...] | None:
        try:
            return self.projections[names]
        except KeyError:
            walk = _walk(self.ad, names, dict.fromkeys(_SEED_RESOURCES))
            result = self.projections[names] = _slot_projection(walk)
            return result


class _Group:
    """Slots equal in every significant attribute: one evaluation decides for all of them."""

    __slots__ = (
        "cpus",
        "disk",
        "gid",
        "kind",
        "max_pushed",
        "members",
        "memory",
        "offered",
        "parked",
        "partitionable",
        "rep",
        "watchers",
    )

    def __init__(self, gid: int, kind: _Kind, rep: ClassAd | None, partitionable: bool, cpus: float,
                 memory: float, disk: float) -> None:
        self.gid = gid
        self.kind = kind
        self.rep = rep  # an ad with exactly these resources, or None: the kind's scratch ad
        self.partitionable = partitionable
        self.cpus = cpus
        self.memory = memory
        self.disk = disk
        self.members: list[tuple[str, _Slot]] = []  # heap by Name
        self.offered = False  # in the list of groups every autocluster is offered
        # Bookkeeping for the autoclusters' heaps (see _Request): the largest first-slot Name
        # any heap entry for this group was made with, the autoclusters that found it empty,
        # and those for which it is a candidate at all.
        self.max_pushed = ""
        self.parked: set[int] = set()
        self.watchers: set[int] = set()

    def head(self) -> str:
        return self.members[0][0]


class _Side:
    """One side's share of an evaluation, kept for every pair that looks the same from there."""

    __slots__ = ("rank", "request")

    def __init__(self, request: tuple[float, float, float] | None) -> None:
        self.request = request  # the job side: the request sizes; the slot side: anything not None
        self.rank: float | None = None  # evaluated when first needed


@dataclass(slots=True)
class _Eval:
    job_rank: float
    slot_rank: float
    cpus: float
    memory: float
    disk: float


_UNSEEN: Final = object()


class _Request:
    """One autocluster during a cycle.

    ``heap`` orders the slot groups it may match by (-job Rank, -slot Rank, Name of the group's
    first slot).  Where both Ranks are literals the order is known before evaluating, so groups
    are evaluated lazily, in that order, until one matches: a job with no Rank usually costs a
    handful of evaluations, not one per group.  Entries go stale as slots are taken; they are
    checked and fixed when they reach the top.
    """

    __slots__ = (
        "cursor",
        "empty_at",
        "fixed",
        "heap",
        "index",
        "job",
        "job_rank",
        "parts",
        "projections",
        "pushed",
        "ranks",
        "remaining",
        "request",
        "requirements",
        "results",
        "slot_refs",
    )

    def __init__(self, index: int, request: ResourceRequest, fixed: tuple[float, float, float] | None,
                 parts: tuple[float | None, ...], job_rank: float | None, slot_refs: tuple[str, ...] | None) -> None:
        self.index = index
        self.request = request
        self.job = request.job_ad
        self.requirements = _constraint(self.job, "Requirements")
        self.remaining = request.count
        self.fixed = fixed  # the requests when they do not depend on the slot
        self.parts = parts  # each request if it does not depend on the slot, else None
        self.job_rank = job_rank  # known without evaluating, or None
        self.heap: list[tuple[float, float, str, int]] = []
        self.pushed: dict[int, str] = {}  # gid -> first-slot Name of its one current entry
        self.results: dict[int, _Eval | None] = {}  # gid -> evaluation (None: no match)
        self.ranks: dict[int, tuple[float, float]] = {}  # gid -> heap key of the candidates
        self.cursor = 0  # how many of the offered groups it has seen
        self.empty_at = -1  # how many groups had been offered when none matched any more
        self.slot_refs = slot_refs  # the slot attributes its expressions refer to (None: any)
        self.projections: dict[tuple[str, ...], tuple[tuple[Any, ...] | None, bool]] = {}

    def projection(self, names: tuple[str, ...] | None) -> tuple[tuple[Any, ...] | None, bool]:
        """What slot expressions referring to job attributes ``names`` can see of this job
        (None: anything), and whether that refers back to the slot (RequestMemory =
        TARGET.Memory / 2): then the slot side depends on more of the slot than its policy."""
        if names is None:
            return None, True
        try:
            return self.projections[names]
        except KeyError:
            walk = _walk(self.job, names)
            result = self.projections[names] = (None if walk.own_all else tuple(walk.own.items()),
                                                bool(walk.other) or walk.other_all)
            return result


class _Submitter:
    __slots__ = ("effective", "limited", "name", "requests")

    def __init__(self, name: str, effective: float) -> None:
        self.name = name
        self.effective = effective
        self.requests: list[_Request] = []
        self.limited = False


class Matchmaker:
    def __init__(self, priorities: Priorities) -> None:
        self.priorities = priorities

    def cycle(self, requests: Sequence[ResourceRequest], slots: Sequence[ClassAd],
              now: float) -> tuple[list[Match], CycleStats]:
        """One negotiation cycle.  ``now`` is the cycle's time.  Priorities are read, not
        updated: the daemon folds in usage with :meth:`Priorities.update` (doing it here too
        would count the same interval twice)."""
        return _Cycle(self.priorities, requests, slots, now).run()


_ABSENT: Final = object()


def _get(ad: ClassAd, name: str) -> object:
    """The attribute's value, evaluated if it is an expression: None if UNDEFINED, _ABSENT if
    the ad does not have it."""
    try:
        value = ad[name]
    except KeyError:
        return _ABSENT
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool:
        return value
    return classads.evaluate(ad, name)  # expressions, and UNDEFINED/ERROR literals


class _Cycle:
    def __init__(self, priorities: Priorities, requests: Sequence[ResourceRequest], slots: Sequence[ClassAd],
                 now: float) -> None:
        self.started = time.perf_counter()
        self.priorities = priorities
        self.now = now
        self.evaluations = 0
        self._evaluated = False  # whether the current _evaluate evaluated anything
        # Evaluations shared between pairs that look the same from the job's side and from the
        # slot's side (see _Kind).
        self.job_sides: dict[tuple[Any, ...], _Side | None] = {}
        self.slot_sides: dict[tuple[Any, ...], _Side | None] = {}
        self.skipped_slots = 0
        self.skipped_requests = 0
        self.matches: list[Match] = []
        self.groups: list[_Group] = []
        self.by_key: dict[tuple[Any, ...], _Group] = {}
        self.kinds: dict[tuple[Any, ...], _Kind] = {}
        self.offered: list[int] = []  # gids of the groups offered to every autocluster, in order
        self.requests: list[_Request] = []
        self.submitters: dict[str, _Submitter] = {}
        self.pie = 0.0  # cpus of the slots not given out yet
        self.candidates = 0
        self._prepare_requests(requests)
        self._prepare_slots(slots)

    # -- requests --------------------------------------------------------------------------------

    def _prepare_requests(self, requests: Sequence[ResourceRequest]) -> None:
        # The slot attributes some request refers to (lower-case name -> spelling).
        self.slot_names: dict[str, str] = {}
        self.slot_names_all = False
        for request in requests:
            try:
                prepared = self._prepare_request(request)
            except Exception:  # noqa: BLE001 - one hostile job ad must not stop the cycle
                prepared = None
            if prepared is None:
                self.skipped_requests += 1
                continue
            ac, walk = prepared
            self.requests.append(ac)
            for low, name in walk.other.items():
                self.slot_names.setdefault(low, name)
            self.slot_names_all = self.slot_names_all or walk.other_all
            submitter = self.submitters.get(request.submitter)
            if submitter is None:
                submitter = _Submitter(request.submitter, self.priorities.effective(request.submitter))
                self.submitters[request.submitter] = submitter
            submitter.requests.append(ac)

    def _prepare_request(self, request: ResourceRequest) -> tuple[_Request, _Walk] | None:
        if not isinstance(request, ResourceRequest) or not isinstance(request.job_ad, ClassAd):
            return None
        if not isinstance(request.submitter, str) or not request.submitter:
            return None
        if type(request.count) is not int or request.count <= 0:
            return None
        job = request.job_ad
        walk = _walk(job, _JOB_POLICY)
        parts: list[float | None] = []
        for name, default in zip(_REQUESTS, _REQUEST_DEFAULTS):
            depends = _walk(job, (name,))
            if depends.other or depends.other_all:
                parts.append(None)  # refers to the slot: evaluated against each slot group
                continue
            value = _request_value(job, name, default, None)
            if value is None:
                return None  # e.g. RequestCpus = "many": nothing can satisfy it
            parts.append(value)
        fixed = None if None in parts else (parts[0], parts[1], parts[2])
        slot_refs = None if walk.other_all else tuple(sorted(walk.other))
        ac = _Request(len(self.requests), request, fixed, tuple(parts), _literal_rank(job),  # type: ignore[arg-type]
                      slot_refs)
        return ac, walk

    # -- slots -----------------------------------------------------------------------------------

    def _prepare_slots(self, slots: Sequence[ClassAd]) -> None:
        # The attributes whose values (and whatever those refer to) make two slots
        # interchangeable: the slot's policy and every slot attribute a request refers to.
        # The resources are compared by value, separately.
        resources = {name.lower() for name in _RESOURCES}
        names = [*_SLOT_EXPRESSIONS, *(name for low, name in self.slot_names.items() if low not in resources)]
        seen_names: set[str] = set()
        for ad in slots:
            try:
                added = self._add_slot(ad, names, seen_names)
            except Exception:  # noqa: BLE001 - one hostile slot ad must not stop the cycle
                added = False
            if added is False:
                self.skipped_slots += 1

    def _add_slot(self, ad: ClassAd, names: list[str], seen_names: set[str]) -> bool | None:
        """True if added, None if not a candidate (claimed, busy...), False if malformed."""
        if not isinstance(ad, ClassAd):
            return False
        state = _get(ad, "State")
        if not isinstance(state, str):
            return False
        if state.lower() != "unclaimed":
            return None
        activity = _get(ad, "Activity")
        if activity is not _ABSENT:
            if not isinstance(activity, str):
                return False
            if activity.lower() != "idle":
                return None
        name = _get(ad, "Name")
        if not isinstance(name, str) or not name:
            return False
        cpus = _number(_get(ad, "Cpus"))
        memory = _number(_get(ad, "Memory"))
        disk = _number(_get(ad, "Disk"))
        if cpus is None or memory is None or disk is None or cpus < 0 or memory < 0 or disk < 0:
            return False
        if cpus <= _EPS:
            # Nothing can run there (every job takes some cpu), and a slot that weighs nothing
            # would escape fair share.
            return None
        slot_type = _get(ad, "SlotType")
        partitionable = isinstance(slot_type, str) and slot_type.lower() == "partitionable"
        if name in seen_names:
            return False  # the collector keys ads by Name: a duplicate would be matched twice
        seen_names.add(name)
        base: tuple[Any, ...]
        if self.slot_names_all:
            base = (("*", name),)  # some job refers to attributes it does not name: no grouping
        else:
            walk = _walk(ad, names, {"cpus": None, "memory": None, "disk": None})
            if walk.own_all:
                base = (("*", name),)
            else:
                items = iter(walk.own.items())
                for _ in range(3):
                    next(items)  # the resources: compared by value (see _group_for)
                base = tuple(items)
        slot = _Slot(name, ad, cpus, memory, disk, base)
        self._place(slot, partitionable)
        self.candidates += 1
        self.pie += cpus
        return True

    def _group_for(self, slot: _Slot, partitionable: bool) -> _Group:
        key = (slot.base, partitionable, slot.cpus, slot.memory, slot.disk)
        group = self.by_key.get(key)
        if group is not None:
            return group
        kind_key = (slot.base, partitionable)
        kind = self.kinds.get(kind_key)
        if kind is None:
            kind = _Kind(slot.ad)
            self.kinds[kind_key] = kind
        # A slot not carved yet is its own ad; a carved one is evaluated as the kind's scratch.
        group = _Group(len(self.groups), kind, None if slot.carved else slot.ad, partitionable, slot.cpus,
                       slot.memory, slot.disk)
        self.groups.append(group)
        self.by_key[key] = group
        return group

    def _place(self, slot: _Slot, partitionable: bool) -> None:
        group = self._group_for(slot, partitionable)
        was_empty = not group.members
        lower_head = not was_empty and slot.name < group.head()
        heapq.heappush(group.members, (slot.name, slot))
        if not group.offered:
            # A group is offered to every autocluster once it has a slot (see _offer_new_groups).
            group.offered = True
            self.offered.append(group.gid)
            return
        if was_empty and group.parked:
            # Autoclusters that dropped it while it was empty want it back.
            for index in group.parked:
                ac = self.requests[index]
                if group.gid not in ac.pushed:
                    self._push(ac, group, ac.ranks[group.gid])
                    ac.empty_at = -1  # it may have run out of candidates: it has one again
            group.parked.clear()
        if (was_empty or lower_head) and slot.name < group.max_pushed:
            # Some heap may hold an entry for this group with a larger Name than its new first
            # slot: it would come up too late among equal Ranks.  Give those heaps a fresh one.
            for index in group.watchers:
                ac = self.requests[index]
                if group.gid in ac.pushed and ac.pushed[group.gid] != slot.name:
                    self._push(ac, group, ac.ranks[group.gid])

    # -- evaluation ------------------------------------------------------------------------------

    def _rep(self, group: _Group) -> ClassAd:
        """The ad to evaluate ``group`` with."""
        if group.rep is not None:
            return group.rep
        kind = group.kind
        if kind.scratch is None:
            kind.scratch = classads.decode(classads.encode(kind.ad))  # exact copy
        state = (group.cpus, group.memory, group.disk)
        if kind.scratch_state != state:
            kind.scratch["Cpus"] = _plain(group.cpus)
            kind.scratch["Memory"] = _plain(group.memory)
            kind.scratch["Disk"] = _plain(group.disk)
            kind.scratch_state = state
        return kind.scratch

    def _evaluate(self, ac: _Request, group: _Group) -> _Eval | None:
        fixed = ac.fixed
        if fixed is not None and group.partitionable and not _fits(group, fixed):
            return None  # decided without ClassAds: it does not fit what is left
        self._evaluated = False
        try:
            return self._evaluate_classads(ac, group)
        except Exception:  # noqa: BLE001 - a pathological expression fails only its own match
            return None
        finally:
            if self._evaluated:
                self.evaluations += 1

    def _evaluate_classads(self, ac: _Request, group: _Group) -> _Eval | None:
        # classads.symmetric_match (job Requirements, then the slot's), with the expressions
        # looked up once per autocluster and slot kind instead of at every evaluation; then
        # START, which must hold as well.  Each side's result is shared with every pair that
        # looks the same from that side.
        job, kind = ac.job, group.kind
        resources = (group.cpus, group.memory, group.disk)
        seen = None if ac.slot_refs is None else kind.projection(ac.slot_refs)
        job_key = (ac.index, "g", group.gid) if seen is None else (ac.index, seen, resources)
        job_side = self.job_sides.get(job_key, _UNSEEN)
        rep: ClassAd | None = None
        if job_side is _UNSEEN:
            rep = self._rep(group)
            self._evaluated = True
            job_side = self._job_side(ac, rep)
            self.job_sides[job_key] = job_side
        if job_side is None:
            return None
        assert isinstance(job_side, _Side) and job_side.request is not None
        request = job_side.request
        if group.partitionable and not _fits(group, request):
            return None
        sees, refers_back = ac.projection(kind.job_refs)
        slot_key = (("g", group.gid) if kind.policy is None or refers_back else (kind.policy, resources),
                    ("a", ac.index) if sees is None else sees)
        slot_side = self.slot_sides.get(slot_key, _UNSEEN)
        if slot_side is _UNSEEN:
            rep = rep or self._rep(group)
            self._evaluated = True
            slot_side = _Side((0.0, 0.0, 0.0)) if self._slot_side(kind, rep, job) else None
            self.slot_sides[slot_key] = slot_side
        if slot_side is None:
            return None
        assert isinstance(slot_side, _Side)
        job_rank = ac.job_rank
        if job_rank is None:
            if job_side.rank is None:
                self._evaluated = True
                job_side.rank = classads.rank(job, rep or self._rep(group))
            job_rank = job_side.rank
        slot_rank = kind.rank
        if slot_rank is None:
            if slot_side.rank is None:
                self._evaluated = True
                slot_side.rank = classads.rank(rep or self._rep(group), job)
            slot_rank = slot_side.rank
        return _Eval(job_rank, slot_rank, request[0], request[1], request[2])

    @staticmethod
    def _job_side(ac: _Request, rep: ClassAd) -> _Side | None:
        job = ac.job
        if ac.requirements is not None and not ac.requirements.matches(job, rep):
            return None
        request = ac.fixed
        if request is None:
            values = []
            for name, default, part in zip(_REQUESTS, _REQUEST_DEFAULTS, ac.parts):
                value = _request_value(job, name, default, rep) if part is None else part
                if value is None:
                    return None
                values.append(value)
            request = (values[0], values[1], values[2])
        return _Side(request)

    @staticmethod
    def _slot_side(kind: _Kind, rep: ClassAd, job: ClassAd) -> bool:
        if kind.requirements is not None and not kind.requirements.matches(rep, job):
            return False
        return kind.start is None or kind.start.matches(rep, job)

    # -- the autoclusters' heaps ---------------------------------------------------------------

    def _push(self, ac: _Request, group: _Group, ranks: tuple[float, float]) -> None:
        head = group.head()
        heapq.heappush(ac.heap, (ranks[0], ranks[1], head, group.gid))
        ac.pushed[group.gid] = head
        group.max_pushed = max(group.max_pushed, head)

    def _offer_new_groups(self, ac: _Request) -> None:
        """Put the groups ``ac`` has not been offered yet into its heap."""
        offered = self.offered
        fixed = ac.fixed
        while ac.cursor < len(offered):
            group = self.groups[offered[ac.cursor]]
            ac.cursor += 1
            result = ac.results.get(group.gid, _UNSEEN)
            if result is _UNSEEN:
                if fixed is not None and group.partitionable and not _fits(group, fixed):
                    ac.results[group.gid] = None  # too small for it, now and for good
                    continue
                if ac.job_rank is not None and group.kind.rank is not None:
                    ranks = (-ac.job_rank, -group.kind.rank)  # evaluated when it reaches the top
                else:
                    result = self._evaluate(ac, group)
                    ac.results[group.gid] = result
            if result is None:
                continue
            if result is not _UNSEEN:
                assert isinstance(result, _Eval)
                ranks = (-result.job_rank, -result.slot_rank)
            ac.ranks[group.gid] = ranks
            group.watchers.add(ac.index)
            if group.members:
                self._push(ac, group, ranks)
            else:
                group.parked.add(ac.index)

    def _best(self, ac: _Request, room: float) -> tuple[_Group, _Eval] | bool:
        """The best group for ``ac``'s next job whose weight fits in ``room``; True if some
        group matches but none fits (the submitter's limit), False if none matches."""
        self._offer_new_groups(ac)
        heap = ac.heap
        pushed = ac.pushed
        skipped: list[tuple[float, float, str, int]] = []
        found: tuple[_Group, _Eval] | bool = False
        while heap:
            job_rank, slot_rank, head, gid = heap[0]
            if pushed.get(gid) != head:
                heapq.heappop(heap)  # superseded by a newer entry
                continue
            group = self.groups[gid]
            if not group.members:
                heapq.heappop(heap)
                del pushed[gid]
                group.parked.add(ac.index)
                continue
            if group.members[0][0] != head:
                heapq.heappop(heap)  # its first slot was taken: re-file it under the next one
                self._push(ac, group, (job_rank, slot_rank))
                continue
            result = ac.results.get(gid, _UNSEEN)
            if result is _UNSEEN:
                result = self._evaluate(ac, group)
                ac.results[gid] = result
            if result is None:
                heapq.heappop(heap)
                del pushed[gid]
                group.watchers.discard(ac.index)
                continue
            assert isinstance(result, _Eval)
            weight = result.cpus if group.partitionable else group.cpus
            if weight > room + _EPS:
                skipped.append(heapq.heappop(heap))
                found = True
                continue
            found = (group, result)
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def _carve(self, ac: _Request, slot: _Slot, group: _Group, result: _Eval) -> float:
        """Match one job of ``ac`` to ``slot`` (of ``group``); the weight it used."""
        request = ac.request
        self.matches.append(Match(schedd=request.schedd, submitter=request.submitter,
                                  autocluster_id=request.autocluster_id, slot_name=slot.name, slot_ad=slot.ad,
                                  request_cpus=result.cpus, request_memory=result.memory,
                                  request_disk=result.disk))
        ac.remaining -= 1
        if not group.partitionable:
            return group.cpus
        slot.cpus = _clean(slot.cpus - result.cpus)
        slot.memory = _clean(slot.memory - result.memory)
        slot.disk = _clean(slot.disk - result.disk)
        slot.carved = True
        return result.cpus

    def _take(self, ac: _Request, group: _Group, result: _Eval, room: float) -> tuple[float, int]:
        """Match ``ac``'s next job to the first slot of ``group`` and, if that is a
        partitionable slot, its following jobs to what is left of the slot while they match
        and all of them fit in ``room`` (HTCondor's NEGOTIATOR_DEPTH_FIRST).  The first match
        is made whatever ``room`` (the caller checked it).  Returns (weight, matches)."""
        _, slot = heapq.heappop(group.members)
        weight = self._carve(ac, slot, group, result)
        made = 1
        if not group.partitionable:
            return weight, made
        state = group
        while slot.cpus > _EPS and ac.remaining > 0:
            # What is left is another kind of slot: its group (perhaps new) decides.  It is
            # offered to everybody only once the slot is put back in it.
            state = self._group_for(slot, True)
            again = ac.results.get(state.gid, _UNSEEN)
            if again is _UNSEEN:
                again = self._evaluate(ac, state)
                ac.results[state.gid] = again
            if again is None:
                break
            assert isinstance(again, _Eval)
            if weight + again.cpus > room + _EPS:
                break
            weight += self._carve(ac, slot, state, again)
            made += 1
        if slot.cpus > _EPS:
            self._place(slot, True)  # what is left may suit other jobs
        return weight, made

    # -- fair share ------------------------------------------------------------------------------

    def _wants_more(self, ac: _Request) -> bool:
        return ac.remaining > 0 and ac.empty_at < len(self.offered)

    def _negotiate(self, submitter: _Submitter, limit: float, overshoot: bool) -> tuple[float, int]:
        """Serve ``submitter``'s requests in order up to ``limit`` cpus; with ``overshoot`` its
        first match may exceed the limit.  Returns (weight used, matches made)."""
        used = 0.0
        made = 0
        for ac in submitter.requests:
            while self._wants_more(ac):
                room = limit - used
                if overshoot and made == 0:
                    best = self._best(ac, math.inf)  # one match beyond the slice, no more
                elif room <= _EPS:
                    submitter.limited = True
                    return used, made
                else:
                    best = self._best(ac, room)
                if best is False:
                    ac.empty_at = len(self.offered)  # nothing matches; look again only if new groups appear
                    break
                if best is True:
                    submitter.limited = True  # it matches, but not within the slice: next request
                    break
                group, result = best
                weight, count = self._take(ac, group, result, room)
                used += weight
                self.pie -= weight
                made += count
        return used, made

    def run(self) -> tuple[list[Match], CycleStats]:
        submitters = sorted(self.submitters.values(), key=lambda s: (s.effective, s.name))
        spins = 0
        overshoot = False
        while True:
            active = [s for s in submitters if any(self._wants_more(ac) for ac in s.requests)]
            if not active or self.pie <= _EPS:
                break
            spins += 1
            pie = self.pie
            total = sum(1.0 / s.effective for s in active)
            progress = 0
            limited = False
            for submitter in active:
                # The slice is computed on the pie as the spin started: the submitters served
                # first do not shrink the slices of those after them.
                submitter.limited = False
                _, made = self._negotiate(submitter, pie * (1.0 / submitter.effective) / total, overshoot)
                progress += made
                limited = limited or submitter.limited
            if progress:
                overshoot = False
            elif limited and not overshoot:
                # Every slice is smaller than the slot its submitter's next job needs.  Rather
                # than leave those slots idle until the next cycle, let each submitter, best
                # priority first, take one match beyond its slice.
                overshoot = True
            else:
                break
        stats = CycleStats(submitters=len(self.submitters), requests=len(self.requests), slots=self.candidates,
                           slot_groups=len(self.groups), matches=len(self.matches),
                           match_evaluations=self.evaluations, seconds=time.perf_counter() - self.started,
                           skipped_slots=self.skipped_slots, skipped_requests=self.skipped_requests, spins=spins)
        return self.matches, stats


def _clean(value: float) -> float:
    # Carving in floats: 0.30000000000000004 left of a slot is 0.3, and -1e-17 is 0.
    rounded = round(value, 9)
    return 0.0 if abs(rounded) < _EPS else rounded


def _fits(group: _Group, request: tuple[float, float, float]) -> bool:
    return (request[0] <= group.cpus + _EPS and request[1] <= group.memory + _EPS
            and request[2] <= group.disk + _EPS)


def _request_value(job: ClassAd, name: str, default: float, slot: ClassAd | None) -> float | None:
    """RequestCpus/Memory/Disk as a number: the default when missing or UNDEFINED, None when
    unusable (an error, a string, negative, not finite, or zero cpus)."""
    try:
        raw = job[name]
    except KeyError:
        return default
    if isinstance(raw, ExprTree) or type(raw) not in (int, float, bool, str):  # expression or UNDEFINED
        value = classads.evaluate(job, name, slot)
    else:
        value = raw
    if value is None:
        return default
    number = _number(value)
    if number is None or number < 0:
        return None
    if name == "RequestCpus" and number <= 0:
        return None  # a job must take some cpu, or one slot could take every job
    return number
