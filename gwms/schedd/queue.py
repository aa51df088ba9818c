"""The schedd's durable job queue.

Memory holds the live queue and SQLite (WAL, ``synchronous=FULL``) is its durable record:

* Per cluster one ClassAd (what ``condor_submit`` writes once for all its procs), and per
  proc an *overlay* ClassAd with only the attributes that differ from its cluster
  (``ProcId``, ``Arguments``, ``Out``, ``JobStatus`` once it changes, ...).  A 100,000-proc
  cluster therefore holds one full ad and 100,000 small ones, as HTCondor's schedd does.
* Mutations change memory and mark the proc dirty; :meth:`JobQueue.commit` writes every dirty
  overlay in one transaction, so the schedd pays one fsync per reactor turn rather than one
  per attribute.  :meth:`~JobQueue.new_cluster`, :meth:`~JobQueue.submit` and
  :meth:`~JobQueue.retire` are durable: they commit (pending changes included) before they
  return, so whatever the schedd acknowledged survives ``kill -9``.
* Completed and removed jobs leave the live queue for the ``history`` table in the same
  transaction that deletes them, so a crash leaves a job in exactly one of the two places.

Tables: ``clusters(cluster_id PK, ad)``, ``procs(cluster_id, proc_id, ad, PK(...))``,
``history(cluster_id, proc_id, completion_date, owner, ad)``, ``meta(key PK, value)``; ads are
stored as :func:`gwms.classads.encode` text.  The connection runs in SQLite's EXCLUSIVE locking
mode: one schedd owns a queue file, and a second one opening it gets a clear error instead of
two processes handing out the same cluster ids.

All ClassAd work goes through :mod:`gwms.classads` (the only module that talks to classad2).
Like the rest of gwms this is called from the reactor thread only.
"""

from __future__ import annotations

import enum
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, Self

from gwms import classads
from gwms.classads import ClassAd, ExprTree

__all__ = [
    "COMPLETED",
    "HELD",
    "IDLE",
    "REMOVED",
    "RUNNING",
    "SCHEMA_VERSION",
    "STATUS_NAMES",
    "SUSPENDED",
    "TRANSFERRING_OUTPUT",
    "JobId",
    "JobQueue",
    "QueueError",
    "format_job_id",
    "parse_job_id",
]

JobId = tuple[int, int]  # (cluster, proc)

# HTCondor's JobStatus codes.
IDLE: Final = 1
RUNNING: Final = 2
REMOVED: Final = 3
COMPLETED: Final = 4
HELD: Final = 5
TRANSFERRING_OUTPUT: Final = 6
SUSPENDED: Final = 7

STATUS_NAMES: Final = {
    IDLE: "Idle",
    RUNNING: "Running",
    REMOVED: "Removed",
    COMPLETED: "Completed",
    HELD: "Held",
    TRANSFERRING_OUTPUT: "Transferring Output",
    SUSPENDED: "Suspended",
}

#: Bumped whenever the tables change meaning; a database with another version is refused
#: rather than misread (an older gwms must not scribble over a newer gwms's queue).
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE clusters (cluster_id INTEGER PRIMARY KEY, ad TEXT NOT NULL)",
    # WITHOUT ROWID: rows are looked up and written by their key only, and it saves a b-tree.
    (
        "CREATE TABLE procs (cluster_id INTEGER NOT NULL, proc_id INTEGER NOT NULL, ad TEXT NOT NULL, "
        "PRIMARY KEY (cluster_id, proc_id)) WITHOUT ROWID"
    ),
    # The implicit rowid orders jobs retired in the same second (newest first = highest rowid).
    (
        "CREATE TABLE history (cluster_id INTEGER NOT NULL, proc_id INTEGER NOT NULL, "
        "completion_date INTEGER NOT NULL, owner TEXT, ad TEXT NOT NULL)"
    ),
    "CREATE INDEX history_by_date ON history (completion_date)",
    "CREATE INDEX history_by_owner ON history (owner, completion_date)",
)
_TABLES: Final = frozenset({"meta", "clusters", "procs", "history"})

# history() reads this many rows per query: lazy for the caller, and no statement is left
# open across the caller's own commits between two next() calls.
_HISTORY_PAGE: Final = 256

_JOB_ID_RE: Final = re.compile(r"([0-9]+)\.([0-9]+)", re.ASCII)

# Attribute names the queue keeps consistent itself (lower case: ClassAd names ignore case).
_CLUSTER_ID: Final = "clusterid"
_PROC_ID: Final = "procid"
_JOB_STATUS: Final = "jobstatus"
_OWNER: Final = "owner"
_COMPLETION_DATE: Final = "CompletionDate"

_LITERAL_TYPES: Final = (str, int, float, bool)
_MISSING: Final = object()


class QueueError(Exception):
    """The queue refused an operation or cannot use its database; the message says why."""


def format_job_id(job_id: JobId) -> str:
    """``(12, 3)`` -> ``"12.3"``, as HTCondor writes job ids."""
    cluster, proc = job_id
    return f"{cluster}.{proc}"


def parse_job_id(text: str) -> JobId:
    """``"12.3"`` -> ``(12, 3)``; anything else raises ValueError naming the text.

    Strict on purpose (ASCII digits only, no signs, spaces or underscores, which ``int()``
    would accept): job ids arrive from users and the network.
    """
    if not isinstance(text, str):
        raise TypeError(f"job id must be a string like '12.0', not {type(text).__name__}")
    match = _JOB_ID_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid job id {text!r}: expected Cluster.Proc, e.g. '12.0'")
    return int(match.group(1)), int(match.group(2))


def _plain(value: object) -> object:
    """A stored value as callers see it: UNDEFINED is None, ERROR is classads.ERROR."""
    if type(value) in _LITERAL_TYPES:  # the common case first: no enum checks
        return value
    # classad2 returns UNDEFINED/ERROR literals as members of an IntEnum; we only look at
    # the member name so that this module does not import classad2 itself.
    if isinstance(value, enum.IntEnum):
        return None if value.name == "Undefined" else classads.ERROR
    return value


def _status_of(value: object) -> int | None:
    return value if type(value) is int else None


def _owner_of(value: object) -> str | None:
    return value if type(value) is str else None


class _Cluster:
    """One cluster in memory: its ad (private to the queue, never changed after submit) and
    the procs' overlays."""

    __slots__ = ("ad", "encoded", "owner", "procs", "status")

    def __init__(self, ad: ClassAd, encoded: bytes) -> None:
        self.ad = ad
        # The ad as stored; job() decodes it to hand out a fresh copy (quicker than copying).
        self.encoded = encoded
        self.procs: dict[int, ClassAd] = {}
        # The cluster's JobStatus and Owner, which every proc without its own shares: indexing
        # a proc then looks at its few overlay names only, not at two ads.
        self.status = _status_of(ad.get("JobStatus"))
        self.owner = _owner_of(ad.get("Owner"))


class JobQueue:
    """The live job queue of one schedd, backed by an SQLite file (see the module docstring).

    Opening loads the whole queue; a corrupt file, a file that is not a gwms queue, a queue
    written by a newer schema, or a queue already open in another process raise
    :class:`QueueError` naming the file, and nothing is written to it.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._clock = clock
        self._clusters: dict[int, _Cluster] = {}
        # (owner, status) -> job ids: ids() and count_by_status() without scanning the queue.
        # Keyed by the pair so that per-owner queries (the negotiator's, the frontend's) are a
        # lookup too; a status-only query unions over the few owners.  Buckets are dicts used
        # as ordered sets: jobs mostly enter in id order, so sorting a bucket for ids() is
        # nearly free (15x quicker than sorting a set's hash order at 100,000 jobs).
        self._index: dict[tuple[str | None, int | None], dict[JobId, None]] = {}
        self._count = 0
        self._next_cluster = 1
        self._reserved: set[int] = set()  # handed out by new_cluster(), not yet submitted
        self._dirty: set[JobId] = set()  # procs whose overlay changed since the last commit
        self._db: sqlite3.Connection | None = None
        self._open()

    # -----------------------------------------------------------------------------------
    # Opening and loading
    # -----------------------------------------------------------------------------------

    def _fail(self, what: str, error: BaseException | None = None) -> QueueError:
        detail = f": {error}" if error is not None else ""
        return QueueError(f"job queue {self._path}: {what}{detail}")

    def _open(self) -> None:
        if self._path.is_dir():
            raise self._fail("is a directory, not a job queue file")
        try:
            existed = self._path.stat().st_size > 0
        except FileNotFoundError:
            existed = False
        except OSError as e:
            raise self._fail("cannot read", e) from e
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction spans
            # exactly what we say.  A short busy timeout: a queue held by another schedd stays
            # held, waiting longer would only delay the error.
            db = sqlite3.connect(str(self._path), isolation_level=None, timeout=1.0)
        except sqlite3.Error as e:
            raise self._fail("cannot open", e) from e
        self._db = db
        try:
            self._configure(db)
            self._check_schema(db, existed)
            self._load(db)
        except BaseException:
            self._db = None
            db.close()
            raise

    def _configure(self, db: sqlite3.Connection) -> None:
        try:
            # EXCLUSIVE before WAL: the WAL index then lives in our heap (no -shm file) and the
            # file stays locked while we have it open, so a second schedd cannot share it.
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            # FULL: the WAL is fsynced at every commit, which is what makes an acknowledged
            # change survive a crash (NORMAL would survive kill -9 but not power loss).
            db.execute("PRAGMA synchronous = FULL")
        except sqlite3.OperationalError as e:
            if "locked" in str(e):
                raise self._fail("in use by another process (is another schedd running on it?)", e) from e
            raise self._fail("not a readable SQLite database (corrupt, or not a job queue)", e) from e
        except sqlite3.Error as e:
            raise self._fail("not a readable SQLite database (corrupt, or not a job queue)", e) from e
        if str(mode).lower() != "wal":
            raise self._fail(f"cannot switch to WAL journal mode (SQLite says {mode!r})")

    def _check_schema(self, db: sqlite3.Connection, existed: bool) -> None:
        try:
            with self._transaction(what="read the schema"):
                names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not names:
                    # Only a new or zero-length file has no tables: nothing to lose by creating them.
                    for statement in _SCHEMA:
                        db.execute(statement)
                    db.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("schema_version", SCHEMA_VERSION), ("next_cluster_id", 1)],
                    )
                    return
                if "meta" not in names:
                    raise self._fail(f"not a gwms job queue (an SQLite database with tables {sorted(names)})")
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    raise self._fail("not a gwms job queue (no schema_version in its meta table)")
                version = row[0]
                if version != SCHEMA_VERSION:
                    raise self._fail(
                        f"schema version {version!r}, but this gwms reads version {SCHEMA_VERSION} only "
                        "(written by a newer gwms? open it with that version)"
                    )
                missing = _TABLES - names
                if missing:
                    raise self._fail(f"damaged job queue: tables {sorted(missing)} are missing")
        except sqlite3.DatabaseError as e:
            raise self._fail("corrupt or unreadable database", e) from e
        if existed:
            # Catch page-level damage now, with the file's name, rather than as a confusing
            # failure in some later commit.  quick_check skips the index-vs-table comparison of
            # integrity_check and costs a few tens of ms for a 100,000-job queue.
            try:
                problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
            except sqlite3.DatabaseError as e:
                raise self._fail("corrupt database", e) from e
            if problems != ["ok"]:
                raise self._fail("corrupt database: " + "; ".join(map(str, problems)))

    def _load(self, db: sqlite3.Connection) -> None:
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'next_cluster_id'").fetchone()
            next_cluster = row[0] if row is not None else 1
            if type(next_cluster) is not int or next_cluster < 1:
                raise self._fail(f"damaged job queue: next_cluster_id is {next_cluster!r}")
            for cluster_id, text in db.execute("SELECT cluster_id, ad FROM clusters ORDER BY cluster_id"):
                encoded = self._stored_bytes(text, f"cluster {cluster_id}")
                ad = self._decode(encoded, f"cluster {cluster_id}")
                self._clusters[cluster_id] = _Cluster(ad, encoded)
            for cluster_id, proc_id, text in db.execute("SELECT cluster_id, proc_id, ad FROM procs ORDER BY cluster_id, proc_id"):
                where = f"job {cluster_id}.{proc_id}"
                cluster = self._clusters.get(cluster_id)
                if cluster is None:
                    raise self._fail(f"damaged job queue: {where} belongs to no cluster")
                overlay = self._decode(self._stored_bytes(text, where), where)
                cluster.procs[proc_id] = overlay
                self._index_add((cluster_id, proc_id), cluster, overlay)
                self._count += 1
            highest = db.execute(
                "SELECT max(c) FROM (SELECT max(cluster_id) AS c FROM clusters UNION ALL SELECT max(cluster_id) FROM history)"
            ).fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise self._fail("corrupt or unreadable database", e) from e
        # Never trust the counter alone: an id in use must not be handed out again.
        self._next_cluster = max(next_cluster, (highest or 0) + 1)

    def _stored_bytes(self, text: object, where: str) -> bytes:
        if isinstance(text, str):
            return text.encode("utf-8")
        if isinstance(text, bytes):
            return text
        raise self._fail(f"damaged job queue: the ad of {where} is {type(text).__name__}, not text")

    def _decode(self, data: bytes, where: str) -> ClassAd:
        try:
            return classads.decode(data)
        except classads.ClassAdError as e:
            raise self._fail(f"damaged job queue: the stored ad of {where} does not parse", e) from e

    # -----------------------------------------------------------------------------------
    # Transactions
    # -----------------------------------------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise QueueError(f"job queue {self._path} is closed")
        return self._db

    def _check_open(self) -> None:
        if self._db is None:
            raise QueueError(f"job queue {self._path} is closed")

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; on any failure ROLLBACK, so a change is all or nothing."""
        db = self._conn
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error is the one worth reporting
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise self._fail("in use by another process (is another schedd running on it?)", e) from e
            if isinstance(e, sqlite3.Error):
                raise self._fail(f"cannot {what}", e) from e
            raise

    def _dirty_rows(self) -> list[tuple[bytes, int, int]]:
        rows = []
        for cluster_id, proc_id in self._dirty:
            cluster = self._clusters.get(cluster_id)
            overlay = cluster.procs.get(proc_id) if cluster is not None else None
            if overlay is not None:  # a retired job's row is gone; nothing to update
                rows.append((classads.encode(overlay), cluster_id, proc_id))
        return rows

    def _write_dirty(self, db: sqlite3.Connection, rows: list[tuple[bytes, int, int]]) -> None:
        if rows:
            # Stored as TEXT (decode("utf-8") is cheap next to encoding) so that the sqlite3
            # shell and `SELECT ad LIKE ...` show the ads as people expect.
            db.executemany(
                "UPDATE procs SET ad = ? WHERE cluster_id = ? AND proc_id = ?",
                [(ad.decode("utf-8"), c, p) for ad, c, p in rows],
            )

    def commit(self) -> None:
        """Write every pending change in one transaction (fsynced).  Nothing pending: no I/O.

        If the write fails the changes stay pending (and in memory) and QueueError is raised;
        the next commit tries again.
        """
        if not self._dirty:
            self._check_open()  # nothing to write, but a closed queue still says so
            return
        rows = self._dirty_rows()
        with self._transaction(what="commit"):
            self._write_dirty(self._conn, rows)
        self._dirty.clear()

    def close(self) -> None:
        """Commit what is pending (a clean shutdown loses nothing) and close the file."""
        if self._db is None:
            return
        try:
            self.commit()
        finally:
            self._db.close()
            self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -----------------------------------------------------------------------------------
    # Index
    # -----------------------------------------------------------------------------------

    @staticmethod
    def _key(cluster: _Cluster, overlay: ClassAd) -> tuple[str | None, int | None]:
        status = cluster.status
        owner = cluster.owner
        # Overlays hold a handful of names; scanning them beats two failed lookups (a
        # KeyError each inside classad2's mapping), which matters when loading 100,000 procs.
        for name in overlay:
            lower = name.lower()
            if lower == _JOB_STATUS:
                status = _status_of(overlay[name])
            elif lower == _OWNER:
                owner = _owner_of(overlay[name])
        return owner, status

    def _index_add(self, job_id: JobId, cluster: _Cluster, overlay: ClassAd, key: tuple[str | None, int | None] | None = None) -> None:
        if key is None:
            key = self._key(cluster, overlay)
        bucket = self._index.get(key)
        if bucket is None:
            bucket = self._index[key] = {}
        bucket[job_id] = None

    def _index_remove(self, job_id: JobId, cluster: _Cluster, overlay: ClassAd) -> None:
        key = self._key(cluster, overlay)
        bucket = self._index.get(key)
        if bucket is not None:
            bucket.pop(job_id, None)
            if not bucket:
                del self._index[key]

    # -----------------------------------------------------------------------------------
    # Submitting
    # -----------------------------------------------------------------------------------

    def new_cluster(self) -> int:
        """A new cluster id, durably reserved: never handed out again, even after kill -9.

        Commits pending changes too (they share the transaction).
        """
        cluster_id = self._next_cluster
        rows = self._dirty_rows()
        with self._transaction(what="reserve a cluster id") as db:
            self._write_dirty(db, rows)
            db.execute("UPDATE meta SET value = ? WHERE key = 'next_cluster_id'", (cluster_id + 1,))
        self._dirty.clear()
        self._next_cluster = cluster_id + 1
        self._reserved.add(cluster_id)
        return cluster_id

    def submit(self, cluster_ad: ClassAd, proc_ads: Sequence[ClassAd]) -> list[JobId]:
        """Queue a cluster: durable when this returns, and all or nothing.

        ``cluster_ad`` must carry ``ClusterId``, an id from :meth:`new_cluster` not submitted
        yet; each proc ad carries a unique ``ProcId`` >= 0 plus whatever differs from the
        cluster.  The queue keeps its own copies.  It sets ``QDate`` and
        ``EnteredCurrentStatus`` (now) on the cluster, and ``JobStatus = 1`` (idle) unless the
        cluster ad sets it; a proc ad may set its own ``JobStatus`` (e.g. submitted on hold).
        Proc attributes equal to the cluster's are not kept twice.  Returns the job ids in
        the order of ``proc_ads``.
        """
        if not isinstance(cluster_ad, ClassAd):
            raise QueueError(f"submit: the cluster ad must be a ClassAd, not {type(cluster_ad).__name__}")
        cluster_id = cluster_ad.get("ClusterId")
        if type(cluster_id) is not int:
            raise QueueError(f"submit: the cluster ad needs an integer ClusterId (from new_cluster()), not {cluster_id!r}")
        if cluster_id not in self._reserved:
            if cluster_id in self._clusters:
                raise QueueError(f"submit: cluster {cluster_id} is already submitted")
            raise QueueError(f"submit: cluster {cluster_id} was not handed out by new_cluster()")
        procs = list(proc_ads)
        if not procs:
            raise QueueError(f"submit: cluster {cluster_id} has no procs")

        # The queue's own copy of the cluster ad: the caller may go on using theirs.
        ad = ClassAd(dict(cluster_ad.items()))
        for name in [name for name in ad if name.lower() == _PROC_ID]:
            del ad[name]  # ProcId is per proc; a cluster-level one would shadow nothing useful
        status = ad.get("JobStatus", _MISSING)
        if status is _MISSING:
            ad["JobStatus"] = IDLE
        elif type(status) is not int or status not in STATUS_NAMES:
            raise QueueError(f"submit: cluster {cluster_id} has JobStatus {status!r}, not one of {sorted(STATUS_NAMES)}")
        now = int(self._clock())
        ad["QDate"] = now
        ad["EnteredCurrentStatus"] = now
        cluster_encoded = classads.encode(ad)

        cluster = _Cluster(ad, cluster_encoded)
        overlays: list[tuple[int, ClassAd, bytes, tuple[str | None, int | None]]] = []
        seen: set[int] = set()
        cluster_get = ad.get
        # Names the cluster has (lower case): most proc attributes are not among them, and
        # skipping the lookup for those avoids a KeyError per attribute per proc.
        cluster_names = {name.lower() for name in ad}
        for position, proc_ad in enumerate(procs):
            if not isinstance(proc_ad, ClassAd):
                raise QueueError(f"submit: proc ad {position} of cluster {cluster_id} is {type(proc_ad).__name__}, not a ClassAd")
            kept = {}
            proc_id: object = _MISSING
            owner = cluster.owner
            status = cluster.status
            for name in proc_ad:
                value = proc_ad[name]
                lower = name.lower()
                if lower == _PROC_ID:
                    proc_id = value
                elif lower == _CLUSTER_ID:
                    if value != cluster_id or type(value) is not int:
                        raise QueueError(f"submit: proc ad {position} has ClusterId {value!r}, but the cluster is {cluster_id}")
                    continue  # the cluster's own
                elif lower in cluster_names:
                    # Only what differs from the cluster is kept per proc.  type() first: 1 == 1.0
                    # == true in Python but not the same ClassAd value.
                    current = cluster_get(name, _MISSING)
                    if type(current) is type(value) and current == value:
                        continue
                if lower == _JOB_STATUS:
                    if type(value) is not int or value not in STATUS_NAMES:
                        raise QueueError(f"submit: proc ad {position} has JobStatus {value!r}, not one of {sorted(STATUS_NAMES)}")
                    status = value
                elif lower == _OWNER:
                    owner = _owner_of(value)
                kept[name] = value
            if type(proc_id) is not int or proc_id < 0:  # type: ignore[operator]
                what = "no ProcId" if proc_id is _MISSING else f"ProcId {proc_id!r}"
                raise QueueError(f"submit: proc ad {position} of cluster {cluster_id} has {what} (need an integer >= 0)")
            if proc_id in seen:
                raise QueueError(f"submit: ProcId {proc_id} appears more than once in cluster {cluster_id}")
            seen.add(proc_id)  # type: ignore[arg-type]
            overlay = ClassAd(kept)
            overlays.append((proc_id, overlay, classads.encode(overlay), (owner, status)))  # type: ignore[arg-type]

        rows = self._dirty_rows()
        with self._transaction(what=f"submit cluster {cluster_id}") as db:
            self._write_dirty(db, rows)
            db.execute("INSERT INTO clusters (cluster_id, ad) VALUES (?, ?)", (cluster_id, cluster_encoded.decode("utf-8")))
            db.executemany(
                "INSERT INTO procs (cluster_id, proc_id, ad) VALUES (?, ?, ?)",
                [(cluster_id, proc_id, encoded.decode("utf-8")) for proc_id, _, encoded, _ in overlays],
            )
        self._dirty.clear()

        # Durable now: only then does memory change, so a failed write leaves no trace.
        self._reserved.discard(cluster_id)
        self._clusters[cluster_id] = cluster
        in_order = all(overlays[i][0] < overlays[i + 1][0] for i in range(len(overlays) - 1))
        ordered = overlays if in_order else sorted(overlays, key=lambda item: item[0])
        for proc_id, overlay, _, key in ordered:
            cluster.procs[proc_id] = overlay  # in proc order: ids() and jobs() rely on it
            self._index_add((cluster_id, proc_id), cluster, overlay, key)
        self._count += len(overlays)
        return [(cluster_id, proc_id) for proc_id, _, _, _ in overlays]

    # -----------------------------------------------------------------------------------
    # Reading
    # -----------------------------------------------------------------------------------

    def _find(self, job_id: JobId) -> tuple[_Cluster, ClassAd] | None:
        try:
            cluster_id, proc_id = job_id
            cluster = self._clusters.get(cluster_id)
        except (TypeError, ValueError):
            return None
        if cluster is None:
            return None
        overlay = cluster.procs.get(proc_id)
        if overlay is None:
            return None
        return cluster, overlay

    def _require(self, job_id: JobId) -> tuple[_Cluster, ClassAd]:
        found = self._find(job_id)
        if found is None:
            raise QueueError(f"no job {_describe(job_id)} in the queue")
        return found

    @staticmethod
    def _merged(cluster: _Cluster, overlay: ClassAd) -> ClassAd:
        ad = classads.decode(cluster.encoded)  # a fresh copy, quicker than copying attribute by attribute
        # Not ad.update(overlay): the Mapping mixin's update costs several times this loop.
        for name in overlay:
            ad[name] = overlay[name]
        return ad

    def job(self, job_id: JobId) -> ClassAd | None:
        """The job's full ad (cluster + proc overlay; the overlay wins), as a fresh ClassAd the
        caller may keep and change; None if the job is not in the queue."""
        found = self._find(job_id)
        if found is None:
            return None
        return self._merged(*found)

    def get(self, job_id: JobId, attribute: str) -> object:
        """One attribute as stored (a Python literal, a list, a ClassAd or an ExprTree, not
        evaluated), the proc's value before the cluster's, without building the full ad.

        None if the job or the attribute is missing (or UNDEFINED); :data:`classads.ERROR` for
        a literal ERROR.
        """
        found = self._find(job_id)
        if found is None:
            return None
        cluster, overlay = found
        value = overlay.get(attribute, _MISSING)
        if value is _MISSING:
            value = cluster.ad.get(attribute)
        return _plain(value)

    def owner(self, job_id: JobId) -> str | None:
        """The job's Owner, or None (no such job, or no string Owner)."""
        return _owner_of(self.get(job_id, "Owner"))

    def status(self, job_id: JobId) -> int | None:
        """The job's JobStatus, or None if the job is not in the queue."""
        return _status_of(self.get(job_id, "JobStatus"))

    def __len__(self) -> int:
        return self._count

    def __contains__(self, job_id: object) -> bool:
        return self._find(job_id) is not None  # type: ignore[arg-type]

    def _all_ids(self) -> list[JobId]:
        # Clusters are created in increasing id order and procs stored sorted, so this is sorted.
        return [(cluster_id, proc_id) for cluster_id, cluster in self._clusters.items() for proc_id in cluster.procs]

    def ids(self, status: int | None = None, owner: str | None = None) -> list[JobId]:
        """Job ids in the queue, sorted, optionally only those with this status and/or owner.

        Served from the (owner, status) index: no ad is looked at.
        """
        if status is None and owner is None:
            return self._all_ids()
        found: list[JobId] = []
        for (job_owner, job_status), bucket in self._index.items():
            if (status is None or job_status == status) and (owner is None or job_owner == owner):
                found.extend(bucket)
        found.sort()
        return found

    def count_by_status(self, owner: str | None = None) -> dict[int, int]:
        """{JobStatus: number of jobs} for every status code (zeros included), optionally for
        one owner only."""
        counts = dict.fromkeys(STATUS_NAMES, 0)
        for (job_owner, job_status), bucket in self._index.items():
            if job_status is not None and (owner is None or job_owner == owner):
                counts[job_status] = counts.get(job_status, 0) + len(bucket)
        return counts

    def jobs(self, constraint: str | None = None, owner: str | None = None) -> Iterator[tuple[JobId, ClassAd]]:
        """(job id, full ad) for the jobs matching ``constraint`` (a ClassAd expression, as
        condor_q -constraint counts it) and ``owner``, in job id order.

        A bad constraint raises :class:`classads.ClassAdError` at once, before any job.  The
        ads are fresh copies.  Jobs retired while the caller iterates are skipped.
        """
        check = classads.compile_constraint(constraint)  # raises now, not at the first next()
        ids = self._all_ids() if owner is None else self.ids(owner=owner)
        return self._jobs(ids, check)

    def _jobs(self, ids: list[JobId], check: classads.Constraint) -> Iterator[tuple[JobId, ClassAd]]:
        if check.expr is None:
            for job_id in ids:
                found = self._find(job_id)
                if found is not None:
                    yield job_id, self._merged(*found)
            return
        # With a constraint most jobs are usually rejected, and a full ad costs ~25 us to build
        # (it is the cluster's 30-odd attributes), so we evaluate against one scratch copy of
        # the cluster ad per cluster, swapping each proc's few overlay attributes in, and
        # build a fresh ad only for the matches.  Consecutive procs mostly carry the same
        # names (ProcId, Arguments, Out, ...), which are simply overwritten; only names the
        # previous proc had and this one lacks are put back to the cluster's value.
        scratch = ClassAd()
        scratch_cluster: _Cluster | None = None
        applied: dict[str, str] = {}  # lower-case name -> name, of the overlay now in scratch
        for job_id in ids:
            found = self._find(job_id)
            if found is None:
                continue
            cluster, overlay = found
            if cluster is not scratch_cluster:
                scratch = classads.decode(cluster.encoded)
                scratch_cluster = cluster
                applied = {}
            names = {name.lower(): name for name in overlay}
            for lower, name in applied.items():
                if lower not in names:
                    if name in cluster.ad:
                        scratch[name] = cluster.ad.lookup(name)
                    else:
                        del scratch[name]
            for name in names.values():
                scratch[name] = overlay[name]
            applied = names
            if check.matches(scratch):
                yield job_id, self._merged(cluster, overlay)

    # -----------------------------------------------------------------------------------
    # Changing jobs (pending until commit)
    # -----------------------------------------------------------------------------------

    def set(self, job_id: JobId, values: Mapping[str, object]) -> None:
        """Set proc-level attributes; pending until :meth:`commit`.

        Values are Python literals (str, int, float, bool), lists, ClassAds or
        ``classads.ExprTree``; None removes the proc's own value (a cluster value it shadowed
        is then masked with UNDEFINED, so the attribute still reads as missing).  ClusterId and
        ProcId cannot change; JobStatus must be a status code (prefer :meth:`set_status`).
        Either every value is applied or none is (checked first).
        """
        cluster, overlay = self._require(job_id)
        items = list(values.items())
        reindex = False
        for name, value in items:
            lower = _check_name(name)
            if lower == _CLUSTER_ID or lower == _PROC_ID:
                raise QueueError(f"job {_describe(job_id)}: {name} cannot be changed")
            if lower == _JOB_STATUS:
                if type(value) is not int or value not in STATUS_NAMES:
                    raise QueueError(f"job {_describe(job_id)}: JobStatus {value!r} is not one of {sorted(STATUS_NAMES)}")
                reindex = True
            elif lower == _OWNER:
                reindex = True
            _check_value(name, value)
        if reindex:
            self._index_remove(job_id, cluster, overlay)
        cluster_ad = cluster.ad
        for name, value in items:
            if value is None:
                if name in cluster_ad:
                    overlay[name] = None  # UNDEFINED, shadowing the cluster's value
                elif name in overlay:
                    del overlay[name]
                continue
            if type(value) in _LITERAL_TYPES:
                # Back to the cluster's value: drop the proc's copy, keeping the overlay small.
                current = cluster_ad.get(name, _MISSING)
                if type(current) is type(value) and current == value:
                    if name in overlay:
                        del overlay[name]
                    continue
            overlay[name] = value
        if reindex:
            self._index_add(job_id, cluster, overlay)
        self._dirty.add(job_id)

    def set_status(self, job_id: JobId, status: int, reason: str | None = None, now: float | None = None) -> None:
        """Change JobStatus the way HTCondor records it; pending until :meth:`commit`.

        Sets ``JobStatus``, ``EnteredCurrentStatus`` (``now`` or the clock) and
        ``LastJobStatus``.  ``reason`` becomes ``HoldReason`` when holding, ``RemoveReason``
        when removing, and ``ReleaseReason`` when a held job goes back to idle; leaving HELD
        moves ``HoldReason`` to ``LastHoldReason``.  For other transitions ``reason`` is not
        recorded.
        """
        if type(status) is not int or status not in STATUS_NAMES:
            raise QueueError(f"job {_describe(job_id)}: status {status!r} is not one of {sorted(STATUS_NAMES)}")
        if reason is not None and not isinstance(reason, str):
            raise QueueError(f"job {_describe(job_id)}: reason must be a string, not {type(reason).__name__}")
        self._require(job_id)
        old = self.status(job_id)
        when = int(self._clock() if now is None else now)
        values: dict[str, object] = {"JobStatus": status, "EnteredCurrentStatus": when}
        if old is not None:
            values["LastJobStatus"] = old
        if status == HELD:
            if reason is not None:
                values["HoldReason"] = reason
        else:
            if old == HELD:
                last = self.get(job_id, "HoldReason")
                if last is not None:
                    values["LastHoldReason"] = last
                values["HoldReason"] = None
                if status == IDLE and reason is not None:
                    values["ReleaseReason"] = reason
            if status == REMOVED and reason is not None:
                values["RemoveReason"] = reason
        self.set(job_id, values)

    # -----------------------------------------------------------------------------------
    # Leaving the queue
    # -----------------------------------------------------------------------------------

    def retire(self, job_ids: Iterable[JobId]) -> None:
        """Move completed or removed jobs to the history, durably, in one transaction.

        Each job's full ad gets ``CompletionDate`` (now) unless it already has a nonzero one
        (condor_submit writes ``CompletionDate = 0``).  A cluster left without procs is
        dropped.  Pending changes are committed in the same transaction.  All or nothing: an
        unknown job, or one whose JobStatus is not COMPLETED or REMOVED, raises QueueError and
        nothing changes.
        """
        wanted = list(dict.fromkeys(job_ids))  # de-duplicated, order kept
        found = []
        for job_id in wanted:
            cluster, overlay = self._require(job_id)
            status = self.status(job_id)
            if status not in (COMPLETED, REMOVED):
                name = STATUS_NAMES.get(status, repr(status)) if status is not None else "no status"
                raise QueueError(f"job {_describe(job_id)} is {name}: only completed or removed jobs can be retired")
            found.append((job_id, cluster, overlay))
        if not found:
            return
        now = int(self._clock())
        history_rows = []
        emptied: dict[int, int] = {}  # cluster id -> procs retired from it
        for (cluster_id, proc_id), cluster, overlay in found:
            ad = self._merged(cluster, overlay)
            completion = ad.get(_COMPLETION_DATE)
            if type(completion) not in (int, float) or not completion:
                completion = now
                ad[_COMPLETION_DATE] = now
            history_rows.append(
                (cluster_id, proc_id, int(completion), _owner_of(ad.get("Owner")), classads.encode(ad).decode("utf-8"))
            )
            emptied[cluster_id] = emptied.get(cluster_id, 0) + 1
        gone = [cluster_id for cluster_id, n in emptied.items() if n == len(self._clusters[cluster_id].procs)]
        rows = self._dirty_rows()
        with self._transaction(what="retire jobs") as db:
            self._write_dirty(db, rows)
            db.executemany(
                "INSERT INTO history (cluster_id, proc_id, completion_date, owner, ad) VALUES (?, ?, ?, ?, ?)", history_rows
            )
            db.executemany("DELETE FROM procs WHERE cluster_id = ? AND proc_id = ?", [job_id for job_id, _, _ in found])
            db.executemany("DELETE FROM clusters WHERE cluster_id = ?", [(cluster_id,) for cluster_id in gone])
        self._dirty.clear()
        for job_id, cluster, overlay in found:
            self._index_remove(job_id, cluster, overlay)
            del cluster.procs[job_id[1]]
        for cluster_id in gone:
            del self._clusters[cluster_id]
        self._count -= len(found)

    def history(self, constraint: str | None = None, owner: str | None = None, limit: int | None = None) -> Iterator[ClassAd]:
        """Retired jobs' ads, newest first (by CompletionDate, then by retirement order),
        optionally only those matching ``constraint`` and ``owner``, at most ``limit`` of them.

        A bad constraint raises :class:`classads.ClassAdError` at once.  Rows are read a page at
        a time, so the caller may stop early (condor_history -limit) cheaply.
        """
        check = classads.compile_constraint(constraint)
        if limit is not None and (type(limit) is not int or limit < 0):
            raise ValueError(f"limit must be an integer >= 0 or None, not {limit!r}")
        self._check_open()
        return self._history(check, owner, limit)

    def _history(self, check: classads.Constraint, owner: str | None, limit: int | None) -> Iterator[ClassAd]:
        if limit == 0:
            return
        produced = 0
        position: tuple[int, int] | None = None  # (completion_date, rowid) of the last row read
        where = [] if owner is None else ["owner = ?"]
        params_base: list[object] = [] if owner is None else [owner]
        while True:
            clauses = list(where)
            params = list(params_base)
            if position is not None:
                clauses.append("(completion_date, rowid) < (?, ?)")
                params.extend(position)
            sql = "SELECT completion_date, rowid, cluster_id, proc_id, ad FROM history"
            if clauses:
                sql += " WHERE " + " AND ".join(clauses)
            sql += " ORDER BY completion_date DESC, rowid DESC LIMIT ?"
            params.append(_HISTORY_PAGE)
            try:
                page = self._conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                raise self._fail("cannot read the history", e) from e
            for completion, rowid, cluster_id, proc_id, text in page:
                ad = self._decode(self._stored_bytes(text, f"history of job {cluster_id}.{proc_id}"), f"history of job {cluster_id}.{proc_id}")
                if check.matches(ad):
                    yield ad
                    produced += 1
                    if limit is not None and produced >= limit:
                        return
            if len(page) < _HISTORY_PAGE:
                return
            position = (page[-1][0], page[-1][1])


def _describe(job_id: object) -> str:
    try:
        return format_job_id(job_id)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return repr(job_id)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise QueueError(f"attribute names must be non-empty strings, not {name!r}")
    return name.lower()


def _check_value(name: str, value: object) -> None:
    """Refuse values that could not be committed, before any of them is applied: a value that
    cannot be encoded would otherwise make every later commit fail."""
    kind = type(value)
    if kind is int or kind is float or kind is bool or value is None or isinstance(value, ExprTree):
        return
    if kind is str:
        if "\x00" in value:  # type: ignore[operator]
            raise QueueError(f"{name}: ClassAd strings cannot contain NUL")
        return
    # Lists, nested ads, absolute times, UNDEFINED/ERROR: let classad2 store and print it once
    # (rare values, so the cost does not matter).  classad2 raises odd types for values it
    # cannot hold (SystemError for a dict), hence the broad except.
    scratch = ClassAd()
    try:
        scratch[name] = value
        classads.encode(scratch)
    except Exception as e:
        raise QueueError(f"{name}: cannot store {type(value).__name__} {value!r} in a job ad: {e}") from e
