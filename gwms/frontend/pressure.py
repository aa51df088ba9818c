"""The VO frontend's pressure logic: how many glideins to ask each factory entry for.

Pure code: no I/O, no reactor, the time comes in as an argument.  The frontend daemon reads the
idle jobs, the pool's glidein slots and the glidein collector's entry ads, calls
:func:`compute_requests` once per cycle, publishes one request ad per (group, entry) from the
:class:`EntryRequest` objects it gets back, invalidates the requests listed in
:attr:`CycleResult.withdrawn`, and feeds the result back in as ``previous`` next cycle.

The rules (glideinWMS's "constant pressure", simplified)
--------------------------------------------------------

For every configured group and every entry the glidein collector advertises:

1. **Which jobs.**  A group considers the idle jobs (``JobStatus`` 1 or absent) its
   ``job_constraint`` accepts (MY = the job).  A job *matches* an entry when the group's
   ``match`` expression is true with MY = the job and TARGET = the entry ad (HTCondor's scope
   rule: an unscoped name the job lacks is the entry's).
2. **Effective idle jobs.**  A job matching k entries counts 1/k at each, so a job that could run
   in many places does not make every place ask for a glidein.  The sum is exact (fractions) and
   rounded *up*: a fraction of a job still needs a glidein; zero jobs never ask for one.
3. **Wanted idle glideins** = effective idle jobs - this group's glideins from that entry already
   unclaimed in the pool (they will take jobs soon), at least 0.  Then, each limit only ever
   lowering the number, and each recorded in :attr:`EntryRequest.curb_reason` when it did:

   a. ``idle_per_entry``: at most that many at one entry ("idle_per_entry");
   b. ``ramp_up``: at most the previous cycle's ReqIdleGlideins + ramp_up, so a burst of jobs
      does not flood a site at once; 0 disables it ("ramp-up");
   c. the group's ``max_idle`` over all its entries ("group max_idle");
   d. ``curb_idle``: if the group already has that many idle glideins (queued idle at the
      factories + unclaimed in the pool), every request is halved, rounded up, so an entry with
      jobs waiting keeps at least one glidein coming ("curb_idle"; 0 means always halve);
   e. the frontend's ``max_idle`` over all groups and entries ("frontend max_idle").

   A total limit (c, e) scales the requests down in proportion (largest-remainder
   apportionment: integers, summing exactly to the limit, no request ever raised, ties broken
   by (group, entry) order so the result is deterministic).
4. **ReqMaxGlideins** = glideins running at the entry + the idle request, where "running" is the
   factory's count for this group there (its glidefactoryclient numbers), or, before the
   factory has reported, this group's slots from that entry in the pool.  The group's
   ``max_running`` is split over its entries with jobs waiting in proportion to that sum, after
   setting aside what runs at entries without jobs ("max_running"); the frontend's
   ``max_running`` likewise over all groups ("frontend max_running").  Where that lowers
   ReqMaxGlideins below running + idle, the idle request drops to what still fits.
5. **Empty queue** at an entry (no matching idle job): ReqIdleGlideins 0, ReqMaxGlideins = what
   runs there now (running glideins are not killed), ReqRemoveExcess = the group's
   ``remove_excess`` so the factory withdraws the idle ones.  With jobs waiting it is "NO".
6. **Entries come and go.**  An entry no longer advertised gets no request; the pairs requested
   last cycle and not now are listed in :attr:`CycleResult.withdrawn` for the daemon to
   invalidate.  If the glidein collector could not be read at all (``glidein_collector_ok``
   False), the previous requests are kept unchanged: a factory outage must not turn into
   "ask for zero" everywhere.
7. Output is sorted by (group, entry name), so it is stable from cycle to cycle.

Counting glideins in the pool: a slot belongs to a group when its ``GLIDEIN_Client`` is the
group's ``client_name``, to an entry by ``GLIDEIN_Entry_Name@GLIDEIN_Factory``.  Slots are
counted as glideinWMS's frontend counts them (one per slot; dynamic slots are not glideins of
their own): ``Unclaimed`` slots are idle glideins (a partitionable one only while it has CPUs
left), ``Claimed`` slots are running jobs.

Cost: jobs are grouped into clusters by the values of the job attributes the groups'
expressions refer to (followed through the job's own expressions), and each cluster is matched
once per entry, so a cycle costs one pass over the jobs plus (kinds of job x entries)
evaluations.  An expression that can read any job attribute (``MY["x"]``, ``eval``) makes every
distinct job ad its own kind: correct, only slower.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Final

from gwms import classads
from gwms.classads import ClassAd, ClassAdError, Constraint, ExprTree

__all__ = [
    "REMOVE_EXCESS",
    "CycleResult",
    "EntryRequest",
    "FactoryCounts",
    "FactoryEntry",
    "FrontendLimits",
    "GroupConfig",
    "GroupConfigError",
    "GroupSummary",
    "compute_requests",
]

#: glideinWMS's ReqRemoveExcess values: keep the excess, wait for it to start, remove the idle
#: excess, remove idle and running excess.
REMOVE_EXCESS: Final = ("NO", "WAIT", "IDLE", "ALL")

# Curb reasons, as `gwms frontend status` shows them.
IDLE_PER_ENTRY: Final = "idle_per_entry"
RAMP_UP: Final = "ramp-up"
GROUP_MAX_IDLE: Final = "group max_idle"
CURB_IDLE: Final = "curb_idle"
FRONTEND_MAX_IDLE: Final = "frontend max_idle"
MAX_RUNNING: Final = "max_running"
FRONTEND_MAX_RUNNING: Final = "frontend max_running"

IDLE: Final = 1  # JobStatus of an idle job


class GroupConfigError(ValueError):
    """A frontend group's configuration is unusable; the message names the group."""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _check_count(group: str, name: str, value: object) -> None:
    # bool is an int in Python; "max_idle = true" in a config is a mistake, not 1.
    if type(value) is not int or value < 0:
        raise GroupConfigError(f"frontend group {group!r}: {name} must be a whole number >= 0, not {value!r}")


def _compile(group: str, what: str, text: str | None) -> Constraint:
    if text is not None and not isinstance(text, str):
        raise GroupConfigError(f"frontend group {group!r}: {what} must be ClassAd expression text, not {text!r}")
    try:
        return classads.compile_constraint(text)
    except ClassAdError as e:
        raise GroupConfigError(f"frontend group {group!r}: bad {what} {text!r}: {e}") from None


@dataclass(frozen=True)
class GroupConfig:
    """One frontend group: which jobs it serves, where they may run, and its limits.

    The expressions are parsed here, so a malformed one is an error when the configuration is
    loaded (naming the group), never in the middle of a cycle.
    """

    name: str
    #: ClassAd expression, MY = the job, TARGET = the entry (glidefactory) ad.
    match: str = "true"
    #: ClassAd expression over the job alone: which jobs this group considers (None: all).
    job_constraint: str | None = None
    idle_per_entry: int = 100
    max_idle: int = 1000
    curb_idle: int = 200
    max_running: int = 10000
    ramp_up: int = 20
    remove_excess: str = "IDLE"
    #: The GLIDEIN_Client value of this group's glideins (the name the group's requests are
    #: made under, e.g. "frontend.group"); None means the group name.
    client_name: str | None = None

    _match: Constraint = field(init=False, repr=False, compare=False)
    _constraint: Constraint = field(init=False, repr=False, compare=False)
    # The job attributes (lower-case) both expressions read, and whether they may read any;
    # the same for the match expression alone.
    _job_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _any_job_attribute: bool = field(init=False, repr=False, compare=False)
    _match_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _match_any: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise GroupConfigError(f"frontend group name must be a non-empty string, not {self.name!r}")
        for name in ("idle_per_entry", "max_idle", "curb_idle", "max_running", "ramp_up"):
            _check_count(self.name, name, getattr(self, name))
        remove = self.remove_excess.upper() if isinstance(self.remove_excess, str) else self.remove_excess
        if remove not in REMOVE_EXCESS:
            raise GroupConfigError(f"frontend group {self.name!r}: remove_excess must be one of "
                                   f"{', '.join(REMOVE_EXCESS)}, not {self.remove_excess!r}")
        if self.client_name is not None and (not isinstance(self.client_name, str) or not self.client_name):
            raise GroupConfigError(f"frontend group {self.name!r}: client_name must be a non-empty string")
        match = _compile(self.name, "match expression", self.match)
        constraint = _compile(self.name, "job_constraint", self.job_constraint)
        match_names, match_any = _job_references(match)
        names, any_attribute = _job_references(constraint)
        object.__setattr__(self, "remove_excess", remove)
        object.__setattr__(self, "_match", match)
        object.__setattr__(self, "_constraint", constraint)
        object.__setattr__(self, "_job_names", tuple(sorted(names | match_names | {"jobstatus"})))
        object.__setattr__(self, "_any_job_attribute", any_attribute or match_any)
        object.__setattr__(self, "_match_names", tuple(sorted(match_names)))
        object.__setattr__(self, "_match_any", match_any)

    @property
    def client(self) -> str:
        """The GLIDEIN_Client value that marks this group's glideins."""
        return self.client_name if self.client_name is not None else self.name


@dataclass(frozen=True)
class FrontendLimits:
    """Limits over all groups of the frontend."""

    max_idle: int = 5000
    max_running: int = 50000

    def __post_init__(self) -> None:
        for name in ("max_idle", "max_running"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"frontend {name} must be a whole number >= 0, not {value!r}")


@dataclass(frozen=True)
class FactoryCounts:
    """A factory's monitoring of one group's glideins at one entry (its glidefactoryclient ad)."""

    idle: int = 0  # queued at the site, not yet running
    running: int = 0
    held: int = 0


@dataclass(frozen=True)
class FactoryEntry:
    """One entry as the glidein collector shows it.

    ``ad`` is the glidefactory ad (EntryName, FactoryName, Name = "entry@factory", GLIDEIN_*
    attributes; the entry's key is built from EntryName and FactoryName, the way glidein slots
    name their entry); ``counts`` the factory's numbers for each group (by group name) at this entry;
    a group missing there is one the factory has not reported on yet.
    """

    ad: ClassAd
    counts: Mapping[str, FactoryCounts] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryRequest:
    """The request for one (group, entry), with the numbers behind it."""

    group: str
    entry: str  # "entry@factory", the key of the entry
    entry_name: str
    factory_name: str
    req_idle_glideins: int
    req_max_glideins: int
    req_remove_excess: str
    idle_jobs: int  # idle jobs matching this entry (each counted once here)
    effective_idle_jobs: float  # each job counted 1/k at each of the k entries it matches
    running_jobs: int  # this group's claimed glidein slots from this entry
    wanted_idle_glideins: int  # before any limit: effective idle jobs - unclaimed, at least 0
    factory_idle: int | None  # the factory's numbers; None until it has reported
    factory_running: int | None
    factory_held: int | None
    pool_unclaimed: int  # this group's unclaimed glidein slots from this entry
    curb_reason: str = ""  # the limits that lowered the request, comma-separated, in order

    def attributes(self) -> dict[str, object]:
        """The request and monitoring attributes of the glideclient ad, glideinWMS's names."""
        return {
            "ReqIdleGlideins": self.req_idle_glideins,
            "ReqMaxGlideins": self.req_max_glideins,
            "ReqRemoveExcess": self.req_remove_excess,
            "GlideinMonitorJobsIdleMatching": self.idle_jobs,
            "GlideinMonitorJobsIdleEffective": self.effective_idle_jobs,
            "GlideinMonitorJobsRunningHere": self.running_jobs,
            "GlideinMonitorGlideinsIdle": self.pool_unclaimed,
            "GlideinMonitorGlideinsRunning": self.running_jobs,
            "GlideinMonitorCurbReason": self.curb_reason,
        }


@dataclass(frozen=True)
class GroupSummary:
    """One group's totals for the cycle."""

    group: str
    idle_jobs: int  # idle jobs the group considers
    unmatched_jobs: int  # of those, the ones no advertised entry matches
    idle_glideins: int  # queued idle at the factories + unclaimed in the pool (curb_idle's basis)
    curbed: bool  # curb_idle halved this group's requests
    req_idle_glideins: int
    req_max_glideins: int


@dataclass(frozen=True)
class CycleResult:
    """One cycle's requests, sorted by (group, entry)."""

    time: float
    requests: tuple[EntryRequest, ...]
    groups: tuple[GroupSummary, ...]
    #: (group, entry) pairs requested last cycle that get no request now: invalidate them.
    withdrawn: tuple[tuple[str, str], ...] = ()
    #: True when the glidein collector could not be read and the previous requests were kept.
    kept_previous: bool = False

    def request(self, group: str, entry: str) -> EntryRequest | None:
        """The request for (group, "entry@factory"), or None."""
        for request in self.requests:
            if request.group == group and request.entry == entry:
                return request
        return None


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def compute_requests(groups: Sequence[GroupConfig], limits: FrontendLimits, jobs: Iterable[ClassAd],
                     entries: Iterable[FactoryEntry], glideins: Iterable[ClassAd],
                     previous: CycleResult | None, now: float, *,
                     glidein_collector_ok: bool = True) -> CycleResult:
    """One frontend cycle: the request for every (group, entry); see the module docstring.

    ``jobs`` are the idle job ads of all schedds, ``glideins`` the pool's slot ads, ``previous``
    the last cycle's result (None on the first).  ``glidein_collector_ok`` False means the
    entries could not be read: the previous requests are returned unchanged.
    """
    ordered = sorted(groups, key=lambda g: g.name)
    names = [g.name for g in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"frontend group names must be unique: {names}")
    clients = [g.client for g in ordered]
    if len(set(clients)) != len(clients):
        # Glideins are told apart by GLIDEIN_Client: two groups sharing one would count each
        # other's glideins as their own.
        raise ValueError(f"frontend group client names must be unique: {clients}")
    if not glidein_collector_ok:
        return _keep_previous(previous, now)
    known = _index_entries(entries)
    pool = _count_pool(glideins)
    before = {(r.group, r.entry): r for r in previous.requests} if previous is not None else {}
    clusters = _cluster_jobs(jobs, ordered)
    matches: dict[tuple[object, ...], tuple[int, ...]] = {}  # shared: groups often share a match
    plans = [_plan_group(group, clusters, known, pool, before, matches) for group in ordered]
    everything = [d for plan in plans for d in plan.drafts]
    _cap_idle(everything, limits.max_idle, FRONTEND_MAX_IDLE)
    for draft in everything:
        draft.max = draft.running + draft.idle if draft.has_jobs else draft.running
    for plan in plans:
        _cap_max(plan.drafts, plan.group.max_running, MAX_RUNNING)
    _cap_max(everything, limits.max_running, FRONTEND_MAX_RUNNING)
    requests = tuple(_freeze(d) for d in everything)
    current = {(r.group, r.entry) for r in requests}
    withdrawn = tuple(sorted(key for key in before if key not in current))
    return CycleResult(time=now, requests=requests, groups=tuple(_summary(plan) for plan in plans),
                       withdrawn=withdrawn)


def _keep_previous(previous: CycleResult | None, now: float) -> CycleResult:
    if previous is None:
        return CycleResult(time=now, requests=(), groups=(), kept_previous=True)
    return CycleResult(time=now, requests=previous.requests, groups=previous.groups, kept_previous=True)


# ---------------------------------------------------------------------------------------------
# Reading ads
# ---------------------------------------------------------------------------------------------


def _value(ad: ClassAd, name: str) -> object:
    """The attribute's value, evaluated only if it is an expression (most are literals, and
    the pool can have tens of thousands of slots)."""
    try:
        value = ad.get(name)
    except UnicodeDecodeError:
        return None
    if isinstance(value, ExprTree):
        return classads.evaluate(ad, name)
    return value


def _string(ad: ClassAd, name: str) -> str | None:
    value = _value(ad, name)
    return value if type(value) is str else None


@dataclass(frozen=True)
class _Entry:
    key: str  # "entry@factory"
    entry_name: str
    factory_name: str
    ad: ClassAd
    counts: Mapping[str, FactoryCounts]


def _index_entries(entries: Iterable[FactoryEntry]) -> list[_Entry]:
    """The usable entries sorted by key.  An ad without EntryName and FactoryName cannot be
    addressed by a request and is skipped; of duplicates the first is kept."""
    found: dict[str, _Entry] = {}
    for entry in entries:
        entry_name = _string(entry.ad, "EntryName")
        factory_name = _string(entry.ad, "FactoryName")
        if not entry_name or not factory_name:
            continue
        key = f"{entry_name}@{factory_name}"
        found.setdefault(key, _Entry(key, entry_name, factory_name, entry.ad, entry.counts))
    return [found[key] for key in sorted(found)]


@dataclass
class _PoolCount:
    unclaimed: int = 0
    claimed: int = 0
    glideins: int = 0  # every slot that stands for a glidein (not dynamic slots)


def _count_pool(glideins: Iterable[ClassAd]) -> dict[tuple[str, str], _PoolCount]:
    """Glidein slots by (GLIDEIN_Client, "entry@factory")."""
    counts: dict[tuple[str, str], _PoolCount] = {}
    for ad in glideins:
        client = _string(ad, "GLIDEIN_Client")
        entry_name = _string(ad, "GLIDEIN_Entry_Name")
        factory = _string(ad, "GLIDEIN_Factory")
        if client is None or entry_name is None or factory is None:
            continue  # not a glidein, or not one a group of ours asked for
        count = counts.setdefault((client, f"{entry_name}@{factory}"), _PoolCount())
        state = _string(ad, "State")
        slot_type = _string(ad, "SlotType")
        if state == "Claimed":
            count.claimed += 1
        elif state == "Unclaimed":
            # A partitionable slot stays Unclaimed while its dynamic slots run jobs; it is an
            # idle glidein only while it can still give out a CPU.
            cpus = _value(ad, "Cpus") if slot_type == "Partitionable" else 1
            if (type(cpus) is not int and type(cpus) is not float) or cpus > 0:
                count.unclaimed += 1
        if slot_type != "Dynamic":
            count.glideins += 1
    return counts


# ---------------------------------------------------------------------------------------------
# Job clusters
# ---------------------------------------------------------------------------------------------

_MISSING: Final = ("missing",)


def _job_side(refs: frozenset[str]) -> tuple[set[str], bool]:
    """The job attributes (lower-case) among an expression's references, evaluated with the
    job as MY; True if it may read any job attribute.  Unscoped names count: the job's own
    attribute wins over the entry's when it has one."""
    names: set[str] = set()
    everything = False
    for ref in refs:
        scope, dot, name = ref.partition(".")
        if not dot:
            if ref == "MY":
                everything = True
            elif ref != "TARGET":
                names.add(ref.lower())
        elif scope == "MY":
            names.add(name.lower())
    return names, everything


def _job_references(constraint: Constraint) -> tuple[set[str], bool]:
    if constraint.expr is None:
        return set(), False
    return _job_side(classads.references(constraint.expr))


def _value_key(ad: ClassAd, name: str, value: object) -> object:
    """Equal exactly when two attribute values are: literals with their type (1, 1.0 and true
    differ under =?=), anything else by classad2's text of it."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool:
        return (kind, value)
    if isinstance(value, ExprTree):
        return ("expr", repr(value))
    try:
        return ("text", repr(ad.lookup(name)))
    except (UnicodeDecodeError, KeyError):
        return object()  # cannot be compared: a kind of its own


def _whole_ad_key(ad: ClassAd) -> tuple[object, ...]:
    items = []
    for name in sorted(ad, key=str.lower):
        try:
            items.append((name.lower(), _value_key(ad, name, ad.get(name))))
        except UnicodeDecodeError:
            items.append((name.lower(), object()))
    return ("*", *items)


def _signature(ad: ClassAd, names: tuple[str, ...], whole: bool) -> tuple[object, ...]:
    """Equal for two jobs exactly when they agree on ``names`` and on every attribute of their
    own those refer to (``DESIRED_Sites = strcat(A, B)`` brings in A and B), so one
    evaluation decides for every job of a cluster."""
    if whole:
        return _whole_ad_key(ad)
    # Fast path, one call per job at 100,000 jobs: all the names are literals (the usual job).
    flat: list[object] = []
    for name in names:
        try:
            value = ad[name]
        except KeyError:
            flat.append(_MISSING)
            continue
        except UnicodeDecodeError:
            break
        kind = type(value)
        if kind is str or kind is int or kind is float or kind is bool:
            flat.append(kind)
            flat.append(value)
        else:
            break
    else:
        return tuple(flat)
    return _walked_signature(ad, names)


def _walked_signature(ad: ClassAd, names: tuple[str, ...]) -> tuple[object, ...]:
    """_signature for a job with expressions or unusual values: follows its own references.
    The "walk" marker keeps these keys apart from the fast path's."""
    seen: dict[str, object] = {"": "walk"}
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        try:
            value = ad.get(name, _MISSING)
        except UnicodeDecodeError:
            seen[name] = object()
            continue
        if value is _MISSING:
            seen[name] = _MISSING  # an unscoped reference then reads the entry's attribute
        elif isinstance(value, ExprTree):
            seen[name] = ("expr", repr(value))
            more, everything = _job_side(classads.references(value))
            if everything:
                return _whole_ad_key(ad)
            pending.extend(more)
        else:
            seen[name] = _value_key(ad, name, value)
    return tuple(seen.items())


@dataclass
class _Cluster:
    job: ClassAd  # the first job of the kind stands for all of them
    count: int


def _cluster_jobs(jobs: Iterable[ClassAd], groups: Sequence[GroupConfig]) -> list[_Cluster]:
    """One pass over the jobs, by what any group's expressions can see; each group then splits
    these (few) clusters by its own attributes (see _group_clusters)."""
    names = tuple(sorted({name for g in groups for name in g._job_names}))
    whole = any(g._any_job_attribute for g in groups)
    clusters: dict[tuple[object, ...], _Cluster] = {}
    for job in jobs:
        key = _signature(job, names, whole)
        cluster = clusters.get(key)
        if cluster is None:
            clusters[key] = _Cluster(job, 1)
        else:
            cluster.count += 1
    return list(clusters.values())


def _group_clusters(group: GroupConfig, clusters: list[_Cluster]) -> list[_Cluster]:
    """The clusters merged by this group's attributes, limited to jobs it considers."""
    merged: dict[tuple[object, ...], _Cluster] = {}
    for cluster in clusters:
        key = _signature(cluster.job, group._job_names, group._any_job_attribute)
        found = merged.get(key)
        if found is None:
            merged[key] = _Cluster(cluster.job, cluster.count)
        else:
            found.count += cluster.count
    considered = []
    for cluster in merged.values():
        status = _value(cluster.job, "JobStatus")
        if status is not None and status != IDLE:
            continue  # JobStatus is in every signature, so this holds for the whole cluster
        if group._constraint.matches(cluster.job):
            considered.append(cluster)
    return considered


def _matching_entries(group: GroupConfig, job: ClassAd, entries: list[_Entry],
                      cache: dict[tuple[object, ...], tuple[int, ...]]) -> tuple[int, ...]:
    """The indexes of the entries ``job`` matches.  Remembered by the match expression and the
    job attributes it reads, so kinds of job that differ only in what the job_constraint reads,
    and groups with the same match expression, cost one evaluation per entry between them."""
    key = (group._match.text, _signature(job, group._match_names, group._match_any))
    found = cache.get(key)
    if found is None:
        found = tuple(i for i, entry in enumerate(entries) if group._match.matches(job, entry.ad))
        cache[key] = found
    return found


# ---------------------------------------------------------------------------------------------
# Per-group plan
# ---------------------------------------------------------------------------------------------


@dataclass
class _Draft:
    """One (group, entry) request while the limits are applied."""

    group: GroupConfig
    entry: _Entry
    idle_jobs: int
    effective: Fraction
    pool: _PoolCount
    counts: FactoryCounts | None
    running: int  # glideins running there (the factory's number, or the pool's)
    wanted: int
    idle: int
    max: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def has_jobs(self) -> bool:
        return self.idle_jobs > 0

    def lower_idle(self, value: int, reason: str) -> None:
        if value < self.idle:
            self.idle = value
            self.note(reason)

    def note(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)


@dataclass
class _Plan:
    group: GroupConfig
    drafts: list[_Draft]
    idle_jobs: int
    unmatched_jobs: int
    idle_glideins: int
    curbed: bool


def _plan_group(group: GroupConfig, clusters: list[_Cluster], entries: list[_Entry],
                pool: Mapping[tuple[str, str], _PoolCount], before: Mapping[tuple[str, str], EntryRequest],
                matches: dict[tuple[object, ...], tuple[int, ...]]) -> _Plan:
    """The group's requests up to and including its own idle limits (rules 1-3d)."""
    considered = _group_clusters(group, clusters)
    raw = [0] * len(entries)
    # Jobs by the number of entries they match, per entry: the effective sum is then a few
    # exact fractions per entry instead of one per cluster.
    by_fanout: list[dict[int, int]] = [{} for _ in entries]
    unmatched = 0
    for cluster in considered:
        matched = _matching_entries(group, cluster.job, entries, matches)
        if not matched:
            unmatched += cluster.count
            continue
        fanout = len(matched)
        for i in matched:
            raw[i] += cluster.count
            by_fanout[i][fanout] = by_fanout[i].get(fanout, 0) + cluster.count
    drafts = []
    for i, entry in enumerate(entries):
        effective = sum((Fraction(n, k) for k, n in by_fanout[i].items()), Fraction(0))
        counts = entry.counts.get(group.name)
        slots = pool.get((group.client, entry.key), _PoolCount())
        running = counts.running if counts is not None else slots.glideins
        wanted = max(0, math.ceil(effective) - slots.unclaimed) if raw[i] else 0
        draft = _Draft(group, entry, raw[i], effective, slots, counts, running, wanted, wanted)
        draft.lower_idle(group.idle_per_entry, IDLE_PER_ENTRY)
        if group.ramp_up:
            previous = before.get((group.name, entry.key))
            draft.lower_idle((previous.req_idle_glideins if previous else 0) + group.ramp_up, RAMP_UP)
        drafts.append(draft)
    _cap_idle(drafts, group.max_idle, GROUP_MAX_IDLE)
    # Idle glideins already waiting: queued at the factories plus unclaimed in the pool,
    # including the pool's from entries no longer advertised (they still take jobs).
    idle_glideins = sum(d.counts.idle for d in drafts if d.counts is not None)
    idle_glideins += sum(c.unclaimed for (client, _key), c in pool.items() if client == group.client)
    curbed = idle_glideins >= group.curb_idle
    if curbed:
        for draft in drafts:
            draft.lower_idle((draft.idle + 1) // 2, CURB_IDLE)
    total = sum(c.count for c in considered)
    return _Plan(group, drafts, total, unmatched, idle_glideins, curbed)


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


def _apportion(wants: Sequence[int], cap: int) -> list[int]:
    """``wants`` scaled down to sum to ``cap`` if they exceed it (largest remainder).

    Every share is floor(want * cap / total), plus one for the largest remainders until the
    sum is ``cap``; ties go to the earlier position.  No share exceeds its want: a share gets
    the extra one only with a nonzero remainder, i.e. when want * cap / total is not a whole
    number below want.
    """
    total = sum(wants)
    if total <= cap:
        return list(wants)
    cap = max(cap, 0)
    shares = [want * cap // total for want in wants]
    left = cap - sum(shares)
    by_remainder = sorted(range(len(wants)), key=lambda i: (-(wants[i] * cap % total), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    return shares


def _cap_idle(drafts: Sequence[_Draft], cap: int, reason: str) -> None:
    for draft, share in zip(drafts, _apportion([d.idle for d in drafts], cap)):
        draft.lower_idle(share, reason)


def _cap_max(drafts: Sequence[_Draft], cap: int, reason: str) -> None:
    """Rule 4: fit the ReqMaxGlideins of ``drafts`` under ``cap``.  Entries without jobs keep
    what runs there (a request must not kill running glideins) and use up that much of the cap
    first; the idle request of an entry shrinks to what still fits above its running glideins."""
    active = [d for d in drafts if d.has_jobs]
    fixed = sum(d.max for d in drafts if not d.has_jobs)
    for draft, share in zip(active, _apportion([d.max for d in active], cap - fixed)):
        if share < draft.max:
            draft.max = share
            draft.idle = min(draft.idle, max(0, share - draft.running))
            draft.note(reason)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _freeze(draft: _Draft) -> EntryRequest:
    counts = draft.counts
    return EntryRequest(
        group=draft.group.name,
        entry=draft.entry.key,
        entry_name=draft.entry.entry_name,
        factory_name=draft.entry.factory_name,
        req_idle_glideins=draft.idle,
        req_max_glideins=draft.max,
        req_remove_excess="NO" if draft.has_jobs else draft.group.remove_excess,
        idle_jobs=draft.idle_jobs,
        effective_idle_jobs=float(draft.effective),
        running_jobs=draft.pool.claimed,
        wanted_idle_glideins=draft.wanted,
        factory_idle=counts.idle if counts is not None else None,
        factory_running=counts.running if counts is not None else None,
        factory_held=counts.held if counts is not None else None,
        pool_unclaimed=draft.pool.unclaimed,
        curb_reason=",".join(draft.reasons),
    )


def _summary(plan: _Plan) -> GroupSummary:
    return GroupSummary(
        group=plan.group.name,
        idle_jobs=plan.idle_jobs,
        unmatched_jobs=plan.unmatched_jobs,
        idle_glideins=plan.idle_glideins,
        curbed=plan.curbed,
        req_idle_glideins=sum(d.idle for d in plan.drafts),
        req_max_glideins=sum(d.max for d in plan.drafts),
    )
