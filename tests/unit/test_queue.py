"""The schedd's durable job queue: memory + SQLite, batched commits, history, crash safety."""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gwms import classads
from gwms.schedd.queue import (
    COMPLETED,
    HELD,
    IDLE,
    REMOVED,
    RUNNING,
    SCHEMA_VERSION,
    JobQueue,
    QueueError,
    format_job_id,
    parse_job_id,
)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def path(tmp_path):
    return tmp_path / "queue.db"


@pytest.fixture
def queue(path, clock):
    q = JobQueue(path, clock=clock)
    yield q
    q.close()


def cluster_ad(cluster_id, owner="alice", **extra):
    ad = classads.ClassAd()
    ad["ClusterId"] = cluster_id
    ad["Owner"] = owner
    ad["Cmd"] = "/bin/sleep"
    ad["Arguments"] = "60"
    ad["RequestMemory"] = 2048
    ad["CompletionDate"] = 0  # as condor_submit writes it
    ad["Requirements"] = classads.parse_expr('TARGET.OpSys == "LINUX" && TARGET.Memory >= RequestMemory')
    for name, value in extra.items():
        ad[name] = value
    return ad


def proc_ad(proc_id, **extra):
    ad = classads.ClassAd()
    ad["ProcId"] = proc_id
    for name, value in extra.items():
        ad[name] = value
    return ad


def submit(q, n=3, owner="alice", **extra):
    cluster = q.new_cluster()
    return q.submit(cluster_ad(cluster, owner=owner, **extra), [proc_ad(p, Out=f"out.{p}") for p in range(n)])


def crash_copy(path: Path, target: Path) -> Path:
    """What a crash right now would leave on disk: the database file and its WAL, copied
    while the queue is still open (the queue object is then simply abandoned)."""
    target.mkdir()
    for suffix in ("", "-wal"):
        source = Path(str(path) + suffix)
        if source.exists():
            shutil.copyfile(source, target / (path.name + suffix))
    return target / path.name


# ---------------------------------------------------------------------------------------------
# Job ids
# ---------------------------------------------------------------------------------------------


def test_job_id_format_and_parse():
    assert format_job_id((12, 3)) == "12.3"
    assert parse_job_id("12.3") == (12, 3)
    assert parse_job_id(format_job_id((7, 0))) == (7, 0)


@pytest.mark.parametrize("text", ["", "12", "12.", ".3", "1.2.3", "-1.0", "+1.0", " 1.0", "1.0 ", "1_0.0", "a.b", "١.٢"])
def test_parse_job_id_rejects_malformed_ids_with_a_clear_message(text):
    with pytest.raises(ValueError, match=r"invalid job id .*Cluster\.Proc"):
        parse_job_id(text)


# ---------------------------------------------------------------------------------------------
# Submit, get, merge
# ---------------------------------------------------------------------------------------------


def test_submit_get_and_merge_proc_overlay_wins(queue, clock):
    cluster = queue.new_cluster()
    ids = queue.submit(cluster_ad(cluster), [proc_ad(0), proc_ad(1, Arguments="120", Out="out.1")])
    assert ids == [(cluster, 0), (cluster, 1)]
    assert len(queue) == 2 and (cluster, 1) in queue and (cluster, 2) not in queue

    # get(): the proc's value first, then the cluster's, attribute names ignoring case.
    assert queue.get((cluster, 0), "Arguments") == "60"
    assert queue.get((cluster, 1), "Arguments") == "120"
    assert queue.get((cluster, 1), "arguments") == "120"
    assert queue.get((cluster, 1), "Owner") == "alice"
    assert queue.get((cluster, 1), "ProcId") == 1
    assert queue.get((cluster, 1), "NoSuchAttribute") is None
    assert queue.get((cluster, 9), "Owner") is None
    assert repr(queue.get((cluster, 0), "Requirements")) == 'TARGET.OpSys == "LINUX" && TARGET.Memory >= RequestMemory'

    ad = queue.job((cluster, 1))
    assert ad["ClusterId"] == cluster and ad["ProcId"] == 1
    assert ad["Arguments"] == "120" and ad["Out"] == "out.1" and ad["Cmd"] == "/bin/sleep"
    # What submit stamps on the cluster.
    assert ad["QDate"] == ad["EnteredCurrentStatus"] == int(clock.now)
    assert ad["JobStatus"] == IDLE
    assert queue.job((cluster, 0))["Arguments"] == "60"
    assert "Out" not in queue.job((cluster, 0))
    assert queue.job((cluster, 5)) is None
    assert queue.owner((cluster, 0)) == "alice"


def test_job_returns_a_fresh_copy_the_caller_may_change(queue):
    (job_id, *_) = submit(queue)
    ad = queue.job(job_id)
    ad["Owner"] = "mallory"
    ad["Out"] = "elsewhere"
    assert queue.get(job_id, "Owner") == "alice"
    assert queue.job(job_id)["Out"] == "out.0"


def test_submit_keeps_its_own_copies_of_the_callers_ads(queue):
    cluster = queue.new_cluster()
    cad = cluster_ad(cluster)
    pad = proc_ad(0, Out="mine")
    queue.submit(cad, [pad])
    cad["Owner"] = "mallory"
    pad["Out"] = "changed"
    assert queue.get((cluster, 0), "Owner") == "alice"
    assert queue.get((cluster, 0), "Out") == "mine"


def test_proc_attributes_equal_to_the_clusters_are_not_stored_per_proc(queue, path):
    cluster = queue.new_cluster()
    queue.submit(cluster_ad(cluster), [proc_ad(0, Cmd="/bin/sleep", RequestMemory=2048, Out="o")])
    queue.close()
    stored = sqlite3.connect(path).execute("SELECT ad FROM procs").fetchone()[0]
    assert "Cmd" not in stored and "RequestMemory" not in stored
    assert "ProcId" in stored and "Out" in stored


def test_a_proc_may_be_submitted_held(queue):
    cluster = queue.new_cluster()
    queue.submit(cluster_ad(cluster), [proc_ad(0), proc_ad(1, JobStatus=HELD, HoldReason="submitted on hold")])
    assert queue.ids(status=HELD) == [(cluster, 1)]
    assert queue.ids(status=IDLE) == [(cluster, 0)]


def test_submit_proc_order_does_not_matter(queue):
    cluster = queue.new_cluster()
    ids = queue.submit(cluster_ad(cluster), [proc_ad(2), proc_ad(0), proc_ad(1)])
    assert ids == [(cluster, 2), (cluster, 0), (cluster, 1)]
    assert queue.ids() == [(cluster, 0), (cluster, 1), (cluster, 2)]
    assert [job_id for job_id, _ in queue.jobs()] == [(cluster, 0), (cluster, 1), (cluster, 2)]


# ---------------------------------------------------------------------------------------------
# Cluster ids
# ---------------------------------------------------------------------------------------------


def test_cluster_ids_are_never_reused_across_reopen(path):
    q = JobQueue(path)
    first = q.new_cluster()
    q.submit(cluster_ad(first), [proc_ad(0)])
    reserved_only = q.new_cluster()  # handed out, never submitted
    q.set_status((first, 0), COMPLETED)
    q.retire([(first, 0)])  # the queue is empty again
    q.close()

    q = JobQueue(path)
    again = q.new_cluster()
    assert again > reserved_only > first
    q.close()


def test_cluster_ids_are_never_reused_even_without_close(path, tmp_path):
    q = JobQueue(path)
    handed_out = [q.new_cluster() for _ in range(3)]
    crashed = crash_copy(path, tmp_path / "crash")
    q.close()
    q2 = JobQueue(crashed)
    assert q2.new_cluster() > max(handed_out)
    q2.close()


def test_submit_needs_a_cluster_from_new_cluster(queue):
    with pytest.raises(QueueError, match="not handed out by new_cluster"):
        queue.submit(cluster_ad(42), [proc_ad(0)])
    cluster = queue.new_cluster()
    queue.submit(cluster_ad(cluster), [proc_ad(0)])
    with pytest.raises(QueueError, match="already submitted"):
        queue.submit(cluster_ad(cluster), [proc_ad(1)])
    no_id = classads.ClassAd()
    no_id["Owner"] = "alice"
    with pytest.raises(QueueError, match="ClusterId"):
        queue.submit(no_id, [proc_ad(0)])
    assert len(queue) == 1


# ---------------------------------------------------------------------------------------------
# set / commit / durability of committed and uncommitted changes
# ---------------------------------------------------------------------------------------------


def test_set_and_commit_survive_reopen(path, clock):
    q = JobQueue(path, clock=clock)
    job_id, other = submit(q, n=2)
    q.set(job_id, {"RemoteHost": "slot1@wn1", "NumJobStarts": 1, "Rank": classads.parse_expr("TARGET.Memory / 1024")})
    q.set_status(job_id, RUNNING, now=1_700_000_100)
    q.commit()
    q.close()

    q = JobQueue(path, clock=clock)
    assert q.get(job_id, "RemoteHost") == "slot1@wn1"
    assert q.get(job_id, "NumJobStarts") == 1
    assert repr(q.get(job_id, "Rank")) == "TARGET.Memory / 1024"
    assert q.get(job_id, "JobStatus") == RUNNING
    assert q.get(job_id, "EnteredCurrentStatus") == 1_700_000_100
    assert q.get(other, "RemoteHost") is None
    assert q.ids(status=RUNNING) == [job_id]
    q.close()


def test_uncommitted_changes_do_not_survive_a_crash(path, tmp_path):
    q = JobQueue(path)
    job_id, other = submit(q, n=2)
    q.set(job_id, {"Attempt": 1})
    q.commit()
    q.set(job_id, {"Attempt": 2})  # pending
    q.set_status(other, HELD, "pending hold")  # pending
    crashed = crash_copy(path, tmp_path / "crash")  # the schedd dies here

    after = JobQueue(crashed)
    assert after.get(job_id, "Attempt") == 1
    assert after.get(other, "JobStatus") == IDLE
    assert after.get(other, "HoldReason") is None
    assert after.ids(status=HELD) == []
    after.close()
    q.close()


def test_close_commits_what_is_pending(path):
    q = JobQueue(path)
    (job_id,) = submit(q, n=1)
    q.set(job_id, {"Attempt": 7})
    q.close()
    q = JobQueue(path)
    assert q.get(job_id, "Attempt") == 7
    q.close()


def test_commit_with_nothing_pending_writes_nothing(queue, path):
    submit(queue)
    wal = Path(str(path) + "-wal")
    size = wal.stat().st_size
    queue.commit()
    queue.commit()
    assert wal.stat().st_size == size


def test_set_none_removes_and_masks_the_clusters_value(queue):
    (job_id, other, _) = submit(queue)
    queue.set(job_id, {"Extra": "x"})
    queue.set(job_id, {"Extra": None, "Cmd": None})
    assert queue.get(job_id, "Extra") is None
    assert queue.get(job_id, "Cmd") is None  # masked with UNDEFINED
    assert queue.get(other, "Cmd") == "/bin/sleep"
    assert "Extra" not in queue.job(job_id)


def test_set_refuses_bad_changes_and_applies_none_of_them(queue):
    (job_id, *_) = submit(queue)
    with pytest.raises(QueueError, match="ProcId cannot be changed"):
        queue.set(job_id, {"A": 1, "ProcId": 5})
    with pytest.raises(QueueError, match="clusterid cannot be changed"):
        queue.set(job_id, {"clusterid": 5})
    with pytest.raises(QueueError, match="JobStatus 9"):
        queue.set(job_id, {"A": 1, "JobStatus": 9})
    with pytest.raises(QueueError, match="NUL"):
        queue.set(job_id, {"A": 1, "B": "nul\x00byte"})
    with pytest.raises(QueueError, match="cannot store"):
        queue.set(job_id, {"A": 1, "B": object()})
    with pytest.raises(QueueError, match="no job 99.0"):
        queue.set((99, 0), {"A": 1})
    assert queue.get(job_id, "A") is None
    assert queue.get(job_id, "ProcId") == 0


# ---------------------------------------------------------------------------------------------
# Status indexes
# ---------------------------------------------------------------------------------------------


def test_status_indexes_follow_set_status_and_set(queue):
    a = submit(queue, n=3, owner="alice")
    b = submit(queue, n=2, owner="bob")
    assert queue.ids(status=IDLE) == a + b
    assert queue.ids(owner="bob") == b
    assert queue.count_by_status() == {IDLE: 5, RUNNING: 0, REMOVED: 0, COMPLETED: 0, HELD: 0, 6: 0, 7: 0}

    queue.set_status(a[0], RUNNING)
    queue.set_status(b[1], HELD, "no proxy")
    queue.set(a[2], {"JobStatus": RUNNING})  # set() keeps the index right too
    assert queue.ids(status=RUNNING) == [a[0], a[2]]
    assert queue.ids(status=RUNNING, owner="alice") == [a[0], a[2]]
    assert queue.ids(status=RUNNING, owner="bob") == []
    assert queue.ids(status=HELD) == [b[1]]
    assert queue.ids(status=IDLE) == [a[1], b[0]]
    assert queue.count_by_status(owner="alice")[RUNNING] == 2
    assert queue.count_by_status(owner="bob") == {IDLE: 1, RUNNING: 0, REMOVED: 0, COMPLETED: 0, HELD: 1, 6: 0, 7: 0}

    queue.set(b[0], {"Owner": "carol"})  # a proc-level Owner moves the job in the owner index
    assert queue.ids(owner="carol") == [b[0]]
    assert queue.ids(owner="bob") == [b[1]]
    assert queue.owner(b[0]) == "carol"

    queue.set_status(a[0], IDLE)  # back to the cluster's value
    assert queue.ids(status=IDLE, owner="alice") == [a[0], a[1]]
    assert queue.ids() == a + b
    assert sum(queue.count_by_status().values()) == len(queue) == 5


def test_status_indexes_are_rebuilt_on_open(path):
    q = JobQueue(path)
    a = submit(q, n=2, owner="alice")
    q.set_status(a[1], HELD, "why")
    q.close()
    q = JobQueue(path)
    assert q.ids(status=HELD) == [a[1]]
    assert q.ids(status=IDLE, owner="alice") == [a[0]]
    assert q.count_by_status()[HELD] == 1
    q.close()


def test_set_status_records_reasons_as_htcondor_names_them(queue, clock):
    (job_id, removed, _) = submit(queue)
    queue.set_status(job_id, HELD, "proxy expired", now=1_700_000_010)
    ad = queue.job(job_id)
    assert ad["JobStatus"] == HELD and ad["HoldReason"] == "proxy expired"
    assert ad["EnteredCurrentStatus"] == 1_700_000_010 and ad["LastJobStatus"] == IDLE

    clock.now = 1_700_000_020
    queue.set_status(job_id, IDLE, "proxy renewed")
    ad = queue.job(job_id)
    assert ad["JobStatus"] == IDLE and ad["ReleaseReason"] == "proxy renewed"
    assert ad["LastHoldReason"] == "proxy expired" and "HoldReason" not in ad
    assert ad["EnteredCurrentStatus"] == 1_700_000_020 and ad["LastJobStatus"] == HELD

    queue.set_status(removed, REMOVED, "via condor_rm (by user alice)")
    assert queue.get(removed, "RemoveReason") == "via condor_rm (by user alice)"
    with pytest.raises(QueueError, match="status 0"):
        queue.set_status(job_id, 0)


# ---------------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------------


def test_jobs_with_constraint_sees_each_procs_own_attributes(queue):
    cluster = queue.new_cluster()
    procs = [
        proc_ad(0, Arguments="a0", Site="X"),  # shadows nothing
        proc_ad(1),  # must not see proc 0's Site or Arguments
        proc_ad(2, Cmd="/bin/other"),  # shadows the cluster's Cmd
        proc_ad(3),  # must see the cluster's Cmd again
        proc_ad(4, Site="Y"),
    ]
    queue.submit(cluster_ad(cluster), procs)
    assert [j for j, _ in queue.jobs('Site == "X"')] == [(cluster, 0)]
    assert [j for j, _ in queue.jobs("Site =?= undefined")] == [(cluster, 1), (cluster, 2), (cluster, 3)]
    assert [j for j, _ in queue.jobs('Arguments == "60"')] == [(cluster, p) for p in (1, 2, 3, 4)]
    assert [j for j, _ in queue.jobs('Cmd == "/bin/sleep"')] == [(cluster, p) for p in (0, 1, 3, 4)]
    assert [j for j, _ in queue.jobs("ProcId >= 3")] == [(cluster, 3), (cluster, 4)]
    matched = dict(queue.jobs('Cmd == "/bin/other"'))
    assert matched[(cluster, 2)]["ProcId"] == 2 and matched[(cluster, 2)]["Owner"] == "alice"
    assert len(list(queue.jobs())) == 5


def test_jobs_by_owner_and_constraint(queue):
    a = submit(queue, n=2, owner="alice")
    b = submit(queue, n=2, owner="bob")
    queue.set_status(b[1], HELD, "x")
    assert [j for j, _ in queue.jobs(owner="bob")] == b
    assert [j for j, _ in queue.jobs("JobStatus == 5")] == [b[1]]
    assert [j for j, _ in queue.jobs("JobStatus == 5", owner="alice")] == []
    assert [j for j, _ in queue.jobs("  ")] == a + b


def test_bad_constraint_raises_classad_error(queue):
    submit(queue)
    with pytest.raises(classads.ClassAdError):
        queue.jobs("Owner == ")
    with pytest.raises(classads.ClassAdError):
        queue.history("(((")


# ---------------------------------------------------------------------------------------------
# Retire and history
# ---------------------------------------------------------------------------------------------


def test_retire_moves_jobs_to_history_newest_first(path, clock):
    q = JobQueue(path, clock=clock)
    a = submit(q, n=3, owner="alice")
    b = submit(q, n=1, owner="bob")
    for job_id in a:
        q.set_status(job_id, COMPLETED)
    clock.now += 10
    q.retire([a[0]])
    clock.now += 10
    q.retire([a[2], a[1]])
    q.set_status(b[0], REMOVED, "by bob")
    q.set(b[0], {"CompletionDate": 1_600_000_000})  # already set: kept
    q.retire(b)

    assert len(q) == 0 and q.ids() == [] and a[0] not in q
    assert q.job(a[0]) is None
    newest_first = [(ad["ClusterId"], ad["ProcId"]) for ad in q.history()]
    assert newest_first == [a[1], a[2], a[0], b[0]]  # same second: the later retirement first
    first = next(q.history(owner="alice"))
    assert first["CompletionDate"] == int(clock.now) and first["JobStatus"] == COMPLETED and first["Out"] == "out.1"
    assert [ad["ProcId"] for ad in q.history(owner="bob")] == [0]
    assert next(q.history(owner="bob"))["CompletionDate"] == 1_600_000_000
    assert [ad["ProcId"] for ad in q.history("ProcId >= 1", owner="alice")] == [1, 2]
    assert [ad["ProcId"] for ad in q.history('RemoveReason == "by bob"')] == [0]
    assert len(list(q.history(limit=2))) == 2
    assert list(q.history(limit=0)) == []
    assert [ad["ProcId"] for ad in q.history("ProcId == 2", limit=1)] == [2]
    q.close()

    # Durable, and the emptied clusters are gone from the live queue for good.
    q = JobQueue(path, clock=clock)
    assert len(q) == 0
    assert [(ad["ClusterId"], ad["ProcId"]) for ad in q.history()] == [a[1], a[2], a[0], b[0]]
    q.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM clusters").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM procs").fetchone()[0] == 0
    db.close()


def test_history_pages_through_many_rows_in_order(queue, clock):
    ids = submit(queue, n=600)
    for job_id in ids:
        queue.set_status(job_id, COMPLETED)
    for start in range(0, 600, 100):  # six retirements, a second apart
        clock.now += 1
        queue.retire(ids[start : start + 100])
    procs = [ad["ProcId"] for ad in queue.history()]
    assert len(procs) == 600
    assert procs[:100] == list(range(599, 499, -1))
    assert procs[-1] == 0
    assert [ad["ProcId"] for ad in queue.history("ProcId % 100 == 0", limit=3)] == [500, 400, 300]


def test_retire_refuses_live_or_unknown_jobs_and_changes_nothing(queue):
    a = submit(queue, n=2)
    queue.set_status(a[0], COMPLETED)
    with pytest.raises(QueueError, match="Idle: only completed or removed"):
        queue.retire(a)
    with pytest.raises(QueueError, match="no job 77.0"):
        queue.retire([a[0], (77, 0)])
    assert len(queue) == 2 and list(queue.history()) == []


def test_retire_commits_pending_changes_in_the_same_transaction(path, tmp_path):
    q = JobQueue(path)
    a = submit(q, n=2)
    q.set(a[1], {"Note": "pending"})
    q.set_status(a[0], COMPLETED)
    q.retire([a[0]])
    crashed = JobQueue(crash_copy(path, tmp_path / "crash"))
    assert crashed.get(a[1], "Note") == "pending"
    crashed.close()
    q.close()


# ---------------------------------------------------------------------------------------------
# kill -9
# ---------------------------------------------------------------------------------------------

# The child: reserve, submit (small and big clusters), update and commit, hold, complete and
# retire, printing a line after each acknowledged (returned) durable operation.
CHILD = r"""
import sys
from pathlib import Path
from gwms import classads
from gwms.schedd.queue import JobQueue, COMPLETED, HELD

q = JobQueue(Path(sys.argv[1]))
previous = None
while True:
    c = q.new_cluster()
    print("cluster", c, flush=True)
    n = 3000 if c % 4 == 0 else 25
    ad = classads.ClassAd({"ClusterId": c, "Owner": "crash", "Cmd": "/bin/true", "CompletionDate": 0})
    ids = q.submit(ad, [classads.ClassAd({"ProcId": p, "Arguments": f"{c} {p}"}) for p in range(n)])
    print("acked", c, len(ids), flush=True)
    for k in range(1, 4):
        for job_id in ids:
            q.set(job_id, {"Counter": k, "Note": "x" * (k * 10)})
        q.commit()
        print("committed", c, k, flush=True)
    q.set_status(ids[0], HELD, "crash test")
    q.commit()
    print("held", c, flush=True)
    if previous is not None:
        for job_id in previous:
            q.set_status(job_id, COMPLETED)
        q.retire(previous)
        print("retired", previous[0][0], flush=True)
    previous = ids
"""


def expected_procs(cluster_id: int) -> int:
    return 3000 if cluster_id % 4 == 0 else 25


def test_kill_9_loses_no_acknowledged_change(tmp_path):
    path = tmp_path / "queue.db"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acked: dict[int, int] = {}
    committed: dict[int, int] = {}
    held: set[int] = set()
    retired: set[int] = set()
    highest_seen = 0

    for iteration in range(6):
        where = f"(seed {seed}, iteration {iteration})"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(60, child.kill)  # a hung child fails the test instead of hanging it
        watchdog.start()
        try:
            lines: list[str] = []
            target = rng.randint(1, 45)  # kill after this many lines following the first "acked"
            after_ack = None
            while True:
                line = child.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if after_ack is None and line.startswith("acked"):
                    after_ack = 0
                elif after_ack is not None:
                    after_ack += 1
                if after_ack is not None and after_ack >= target:
                    break
            child.send_signal(signal.SIGKILL)
            rest, errors = child.communicate()
            lines.extend(rest.splitlines(keepends=True))  # printed before the kill: acknowledged too
        finally:
            watchdog.cancel()
        assert child.returncode == -signal.SIGKILL, f"child did not run until killed {where}: {errors}"

        clusters_this_run = []
        for line in lines:
            word, *args = line.split()
            numbers = [int(a) for a in args]
            if word == "cluster":
                clusters_this_run.append(numbers[0])
            elif word == "acked":
                acked[numbers[0]] = numbers[1]
            elif word == "committed":
                committed[numbers[0]] = numbers[1]
            elif word == "held":
                held.add(numbers[0])
            elif word == "retired":
                retired.add(numbers[0])
        assert clusters_this_run, f"child printed nothing {where}: {errors}"
        # Cluster ids are never handed out twice, not even across kill -9.
        assert min(clusters_this_run) > highest_seen, where
        highest_seen = max(clusters_this_run)

        q = JobQueue(path)
        try:
            live: dict[int, list[int]] = {}
            for cluster_id, proc_id in q.ids():
                live.setdefault(cluster_id, []).append(proc_id)
            history: dict[int, list[int]] = {}
            for ad in q.history():
                history.setdefault(ad["ClusterId"], []).append(ad["ProcId"])
            assert sum(map(len, live.values())) == len(q) == sum(q.count_by_status().values()), where

            for cluster_id in set(live) | set(history):
                # All or nothing: every cluster present is complete, in exactly one place.
                n = expected_procs(cluster_id)
                assert not (cluster_id in live and cluster_id in history), f"cluster {cluster_id} both live and retired {where}"
                procs = sorted(live.get(cluster_id) or history[cluster_id])
                assert procs == list(range(n)), f"cluster {cluster_id} incomplete {where}"
            for cluster_id, n in acked.items():
                assert n == expected_procs(cluster_id)
                if cluster_id in retired:
                    assert cluster_id in history and cluster_id not in live, f"retired cluster {cluster_id} {where}"
                    continue
                assert cluster_id in live or cluster_id in history, f"acknowledged cluster {cluster_id} lost {where}"
                if cluster_id in live:
                    k = committed.get(cluster_id, 0)
                    for proc_id in (0, n // 2, n - 1):
                        counter = q.get((cluster_id, proc_id), "Counter") or 0
                        assert counter >= k, f"job {cluster_id}.{proc_id}: Counter {counter} < acknowledged {k} {where}"
                        assert q.get((cluster_id, proc_id), "Note") == ("x" * (counter * 10) if counter else None), where
                    if cluster_id in held:
                        assert q.get((cluster_id, 0), "JobStatus") == HELD, f"acknowledged hold of {cluster_id}.0 lost {where}"
            for cluster_id in set(live) | set(history):
                assert cluster_id <= highest_seen, f"cluster {cluster_id} was never handed out {where}"
        finally:
            q.close()
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], where
        db.close()
    assert acked, "no submit was ever acknowledged"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_garbage_file_is_refused_naming_it_and_left_untouched(path):
    garbage = bytes(random.Random(1).randrange(256) for _ in range(10_000))
    path.write_bytes(garbage)
    with pytest.raises(QueueError, match=str(path)) as error:
        JobQueue(path)
    assert "not a readable SQLite database" in str(error.value)
    assert path.read_bytes() == garbage


def test_damaged_pages_are_refused_naming_the_file(path):
    q = JobQueue(path)
    for _ in range(3):
        submit(q, n=300)
    q.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    page = 4096
    data[2 * page : 6 * page] = bytes(random.Random(2).randrange(256) for _ in range(4 * page))
    path.write_bytes(bytes(data))
    with pytest.raises(QueueError, match=str(path)):
        JobQueue(path)


def test_a_stored_ad_that_does_not_parse_is_named(path):
    q = JobQueue(path)
    cluster = submit(q, n=2)[0][0]
    q.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE procs SET ad = '[ProcId = 1; Out = ' WHERE proc_id = 1")
    db.commit()
    db.close()
    with pytest.raises(QueueError, match=rf"{path}.*job {cluster}\.1 does not parse"):
        JobQueue(path)


def test_unknown_schema_version_is_refused(path):
    JobQueue(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(QueueError, match=rf"{path}.*schema version {SCHEMA_VERSION + 1}"):
        JobQueue(path)


def test_another_sqlite_database_is_not_taken_over(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE accounts (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(QueueError, match="not a gwms job queue"):
        JobQueue(path)
    db = sqlite3.connect(path)
    assert [row[0] for row in db.execute("SELECT name FROM sqlite_master")] == ["accounts"]
    db.close()


def test_a_queue_in_use_by_another_process_is_refused(queue, path):
    submit(queue)
    with pytest.raises(QueueError, match="in use by another process"):
        JobQueue(path)
    assert len(queue) == 3  # the owner carries on


def test_submit_with_duplicate_proc_ids_stores_nothing(path):
    q = JobQueue(path)
    cluster = q.new_cluster()
    with pytest.raises(QueueError, match="ProcId 1 appears more than once"):
        q.submit(cluster_ad(cluster), [proc_ad(0), proc_ad(1), proc_ad(1)])
    assert len(q) == 0 and q.ids() == [] and q.job((cluster, 0)) is None
    q.submit(cluster_ad(cluster), [proc_ad(0)])  # the reserved cluster is still usable
    q.close()
    q = JobQueue(path)
    assert q.ids() == [(cluster, 0)]
    q.close()


@pytest.mark.parametrize(
    "procs, message",
    [
        ([], "no procs"),
        ([classads.ClassAd()], "no ProcId"),
        ([proc_ad(-1)], "ProcId -1"),
        ([proc_ad("0")], "ProcId '0'"),
        ([proc_ad(0, JobStatus=42)], "JobStatus 42"),
        ([proc_ad(0, ClusterId=999_999)], "ClusterId 999999"),
    ],
)
def test_bad_proc_ads_are_refused_and_nothing_is_stored(queue, procs, message):
    cluster = queue.new_cluster()
    with pytest.raises(QueueError, match=message):
        queue.submit(cluster_ad(cluster), procs)
    assert len(queue) == 0


def test_operations_on_a_closed_queue_fail_clearly(path):
    q = JobQueue(path)
    q.close()
    q.close()  # idempotent
    with pytest.raises(QueueError, match="closed"):
        q.new_cluster()
    with pytest.raises(QueueError, match="closed"):
        q.commit()
