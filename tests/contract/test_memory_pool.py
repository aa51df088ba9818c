"""The memory pool and its fake jobs themselves: a whole job's life on a clock, in no real time."""

from __future__ import annotations

import signal
from pathlib import Path

import htcondor2
import pytest
from twisted.internet.testing import MemoryReactorClock

from gwms import classads
from gwms.protocols.client import Address
from gwms.protocols.messages import CommandError, ConnectionFailed
from gwms.testing.network import MemoryNetwork, memory_client_security, memory_config
from gwms.testing.pool import MemoryPool, PoolTimeout
from gwms.testing.processes import FAKE_PEAK_RSS_KB, FakeJobProcess, fake_output_content

EPOCH = 1_700_000_000

ONE_JOB = """
executable = /bin/echo
transfer_executable = false
arguments = hello world
+FakeRunTime = 30
+FakeExitCode = 7
+FakeOutputs = "result.txt"
output = job.out
error = job.err
log = job.log
queue
"""


@pytest.fixture
def clock():
    clock = MemoryReactorClock()
    clock.advance(EPOCH)
    return clock


@pytest.fixture
def pool(clock, tmp_path):
    with MemoryPool(clock, tmp_path / "pool", slots=2) as pool:
        yield pool


def test_a_jobs_whole_life_on_the_clock(pool, clock):
    cluster = pool.submit("alice", ONE_JOB)
    job = f"{cluster}.0"
    submitted = clock.seconds()
    seen: list[int | None] = []

    def completed() -> bool:
        status = pool.status(job)
        if not seen or seen[-1] != status:
            seen.append(status)
        return status == 4

    pool.run_until(completed, 120, f"{job} to complete")
    assert seen == [1, 2, 4]  # Idle, Running, Completed
    [done] = pool.history()
    assert (done["Owner"], done["ExitCode"], done["ExitBySignal"], done["NumJobStarts"]) == ("alice", 7, False, 1)
    assert done["RemoteWallClockTime"] == pytest.approx(30, abs=1)  # the fake's run time, on the clock
    assert done["CompletionDate"] - done["JobStartDate"] == pytest.approx(30, abs=1)
    assert done["RemoteUserCpu"] > 0 and done["ResidentSetSize"] == FAKE_PEAK_RSS_KB
    assert clock.seconds() - submitted < 60  # matched at once on the schedd's RESCHEDULE

    iwd = pool.iwds[cluster]
    assert (iwd / "job.out").read_text() == "hello world\n"
    assert (iwd / "job.err").read_text() == ""
    assert (iwd / "result.txt").read_bytes() == fake_output_content(done, "result.txt")
    events = list(htcondor2.JobEventLog(str(iwd / "job.log")).events(stop_after=0))
    assert [e.type for e in events] == [htcondor2.JobEventType.SUBMIT, htcondor2.JobEventType.EXECUTE,
                                        htcondor2.JobEventType.JOB_TERMINATED]
    assert events[2]["ReturnValue"] == 7
    assert events[2].timestamp - events[1].timestamp == pytest.approx(30, abs=1)
    assert not list((pool.workdir / "execute").iterdir())  # the sandbox is gone
    assert [s.state for s in pool.startd.slots.values()] == ["Unclaimed", "Unclaimed"]


def test_jobs_go_over_the_network_with_authorization(pool):
    pool.submit("alice", ONE_JOB)
    assert pool.calls[("schedd", "SUBMIT")] == 1 and pool.calls[("negotiator", "RESCHEDULE")] == 0
    pool.advance(1)
    assert pool.calls[("negotiator", "RESCHEDULE")] == 1
    assert pool.matches == 1 and pool.calls[("startd", "REQUEST_CLAIM")] == 1
    allowed = {(d, who, cmd) for d, who, cmd, _level, ok, _rule in pool.audit if ok}
    assert ("collector", "negotiator", "QUERY_PRIVATE") in allowed
    assert ("startd", "schedd", "REQUEST_CLAIM") in allowed
    with pytest.raises(CommandError) as e:
        pool.submit("mallory", ONE_JOB)  # not in the pool's users: no WRITE
    assert e.value.code == "PERMISSION_DENIED"
    assert ("schedd", "mallory", "NEW_CLUSTER", "WRITE", False, "'mallory' is not listed for WRITE") in pool.audit


def test_a_reused_claim_costs_one_activation_and_one_transaction_per_job(pool):
    transactions = []
    pool.queue._conn.set_trace_callback(lambda sql: transactions.append(sql) if sql.startswith("BEGIN") else None)
    cluster = pool.submit("alice", "executable = /bin/true\ntransfer_executable = false\n+FakeRunTime = 10\n"
                                   "queue 6\n")
    pool.run_until(lambda: not pool.query(f"ClusterId == {cluster}"), 120, "the jobs to complete")
    assert [j["ExitCode"] for j in pool.history()] == [0] * 6
    assert pool.calls[("startd", "REQUEST_CLAIM")] == 2  # two slots, each claimed once
    assert pool.calls[("startd", "ACTIVATE_CLAIM")] == 6  # each activation replaced the job before
    assert pool.calls[("startd", "DEACTIVATE_CLAIM")] == 0
    assert pool.calls[("startd", "RELEASE_CLAIM")] == 2
    # Per job one transaction marks it running, and it also moved the job before to the
    # history; the last two completions on each claim have their own (plus the submit's).
    assert len(transactions) <= 1 + 6 + 2, len(transactions)
    assert not list((pool.workdir / "execute").iterdir())


def test_a_partitionable_slot_is_carved_into_one_dynamic_slot_per_job(clock, tmp_path):
    with MemoryPool(clock, tmp_path / "p", slots=4, partitionable=True) as pool:
        cluster = pool.submit("bob", "executable = /bin/true\ntransfer_executable = false\nrequest_memory = 100\n"
                                     "+FakeRunTime = 50\nqueue 4\n")
        dynamic = pool.run_until(lambda: [s for s in pool.startd.slots.values() if s.slot_type == "Dynamic"]
                                 if len(pool.startd.slots) == 5 else None, 60, "four dynamic slots")
        assert sorted((s.name, s.cpus, s.memory) for s in dynamic) == \
            [(f"slot1_{i}@wn1.memory", 1, 100) for i in range(1, 5)]
        pool.run_until(lambda: not pool.query(f"ClusterId == {cluster}"), 120, "the jobs to complete")
        assert sorted(j["RemoteHost"] for j in pool.history()) == [f"slot1_{i}@wn1.memory" for i in range(1, 5)]


def test_run_until_says_what_it_waited_for_and_where_the_pool_is(pool):
    cluster = pool.submit("bob", ONE_JOB.replace("queue", "requirements = false\nqueue"))
    with pytest.raises(PoolTimeout) as e:
        pool.run_until(lambda: not pool.query(), 10, "the queue to empty")
    message = str(e.value)
    assert "after 10 clock seconds waiting for the queue to empty" in message
    assert f"{cluster}.0 Idle" in message and "slot1@wn1.memory Unclaimed/Idle" in message


def test_the_memory_connector_refuses_addresses_nobody_listens_on(clock):
    network = MemoryNetwork(clock)
    failures = []
    network.connector(clock, Address.parse("nowhere.memory:1"), "READ",
                      memory_client_security(memory_config(), "x")).addErrback(failures.append)
    assert failures and failures[0].check(ConnectionFailed)
    assert "nothing listens there" in failures[0].getErrorMessage()


# -- FakeJobProcess on its own ----------------------------------------------------------------

def _fake(clock, tmp_path: Path, **attributes) -> FakeJobProcess:
    job = classads.ClassAd()
    job["ClusterId"], job["ProcId"] = 3, 1
    for name, value in attributes.items():
        job[name] = classads.parse_expr(value) if isinstance(value, str) else value
    return FakeJobProcess(clock, None, job, ["/bin/job", "a", "b"], {}, tmp_path, None, tmp_path / "out",
                          tmp_path / "err", "marker")


def _result(d):
    results = []

    def keep(result):
        results.append(result)
        return result  # the Deferred keeps its result for the next caller

    d.addBoth(keep)
    return results[0] if results else None


def test_fake_job_runs_for_its_time_on_the_clock_and_exits(clock, tmp_path):
    job = _fake(clock, tmp_path, FakeRunTime=5, FakeExitCode=3, FakeOutputs='"x.txt, y.txt"', FakeStderr='"oops\\n"')
    job.start()
    assert job.pid is not None and job.pid > 2**22  # no real process can have it
    assert (tmp_path / "out").read_text() == "a b\n" and (tmp_path / "err").read_text() == "oops\n"
    clock.advance(4)
    assert not job.finished.called and job.usage().wall == 4
    clock.advance(1)
    result = _result(job.finished)
    assert (result.exit_code, result.exit_signal, result.exec_error) == (3, None, None)
    assert result.usage.wall == 5 and 0 < result.usage.user_cpu < 5
    assert (tmp_path / "x.txt").read_bytes() == b"output x.txt of job 3.1\n"
    assert (tmp_path / "y.txt").exists()
    with pytest.raises(RuntimeError):
        job.start()


def test_fake_job_dies_of_sigterm_on_kill(clock, tmp_path):
    job = _fake(clock, tmp_path, FakeRunTime=100)
    job.start()
    killed = job.kill(grace=10)
    assert not killed.called  # as the real one: the result comes on a later reactor turn
    clock.advance(0)
    assert (_result(killed).exit_code, _result(killed).exit_signal) == (None, signal.SIGTERM)
    assert _result(job.finished) is _result(killed)
    assert _result(job.kill(5)).exit_signal == signal.SIGTERM  # already over


def test_fake_job_that_ignores_sigterm_is_killed_after_the_grace(clock, tmp_path):
    job = _fake(clock, tmp_path, FakeRunTime=100, FakeIgnoreSigterm=True)
    job.start()
    first = job.kill(grace=30)
    clock.advance(10)
    assert not first.called
    second = job.kill(grace=5)  # can only shorten the grace
    clock.advance(5)
    assert _result(first).exit_signal == _result(second).exit_signal == signal.SIGKILL
    assert _result(first).usage.wall == 15


def test_fake_job_with_a_bad_attribute_fails_like_a_command_that_cannot_run(clock, tmp_path):
    job = _fake(clock, tmp_path, FakeRunTime='"soon"')
    job.start()
    clock.advance(0)
    result = _result(job.finished)
    assert result.exit_code == 126 and "FakeRunTime must be a non-negative number" in result.exec_error
    assert "FakeRunTime" in (tmp_path / "err").read_text()


def test_fake_job_checks_its_arguments_as_the_real_one(clock, tmp_path):
    with pytest.raises(ValueError):
        FakeJobProcess(clock, None, classads.ClassAd(), [], {}, tmp_path, None, tmp_path / "o", tmp_path / "e", "m")
    job = _fake(clock, tmp_path)
    with pytest.raises(RuntimeError):
        job.kill()


def test_a_lost_connection_to_the_starter_leaves_the_job_running_while_the_shadow_reconnects(clock, tmp_path):
    from gwms.testing.pool import STARTD_ADDRESS

    with MemoryPool(clock, tmp_path, slots=1) as pool:
        cluster = pool.submit("alice", ONE_JOB.replace("+FakeRunTime = 30", "+FakeRunTime = 120"))
        job = f"{cluster}.0"
        pool.run_until(lambda: pool.status(job) == 2, 120, "the job to run")
        # The network between the schedd and the startd breaks for 60 s: refused, and every open
        # connection dropped. The job keeps running on the startd all along.
        factory = pool.network.listeners[STARTD_ADDRESS]
        pool.network.unlisten(STARTD_ADDRESS)
        pool.network.close_all()
        pool.advance(60)
        assert pool.status(job) == 2
        process = next(c.starter.process for c in pool.startd.claims.values() if c.starter is not None)
        assert not process.finished.called
        pool.network.listen(STARTD_ADDRESS, factory)
        pool.run_until(lambda: pool.status(job) == 4, 300, "the job to complete after the reconnect")
        [done] = pool.history(f"ClusterId == {cluster}")
        assert done["JobStatus"] == 4 and done["NumJobStarts"] == 1 and done["ExitCode"] == 7
        kinds = [e.type for e in htcondor2.JobEventLog(str(pool.iwds[cluster] / "job.log")).events(stop_after=0)]
        assert htcondor2.JobEventType.JOB_DISCONNECTED in kinds and htcondor2.JobEventType.JOB_RECONNECTED in kinds
        assert kinds.count(htcondor2.JobEventType.EXECUTE) == 1


def test_a_job_whose_lease_expires_goes_back_to_idle_and_never_runs_twice_at_once(clock, tmp_path):
    from gwms.testing.pool import STARTD_ADDRESS

    with MemoryPool(clock, tmp_path, slots=1) as pool:
        text = ONE_JOB.replace("+FakeRunTime = 30", "+FakeRunTime = 3000").replace(
            "queue", "job_lease_duration = 100\nqueue")
        cluster = pool.submit("alice", text)
        job = f"{cluster}.0"
        pool.run_until(lambda: pool.status(job) == 2, 120, "the job to run")
        factory = pool.network.listeners[STARTD_ADDRESS]
        pool.network.unlisten(STARTD_ADDRESS)
        pool.network.close_all()
        pool.run_until(lambda: pool.status(job) == 1, 400, "the lease to expire and the job to be idle")
        # By then the startd, which heard from no shadow for the lease, has killed its copy.
        assert not any(c.starter is not None and c.starter.running for c in pool.startd.claims.values())
        kinds = [e.type for e in htcondor2.JobEventLog(str(pool.iwds[cluster] / "job.log")).events(stop_after=0)]
        assert htcondor2.JobEventType.JOB_RECONNECT_FAILED in kinds
        pool.network.listen(STARTD_ADDRESS, factory)


def test_a_failing_shadow_gives_its_job_back_to_the_queue_and_releases_the_claim(pool, monkeypatch):
    from gwms.schedd.shadow import Shadow

    broken = {"on": True}
    real_finish = Shadow.finish

    def finish(self, status):
        if broken["on"]:
            broken["on"] = False
            raise RuntimeError("a bug in the shadow")
        return real_finish(self, status)

    monkeypatch.setattr(Shadow, "finish", finish)
    cluster = pool.submit("alice", "executable = /bin/true\ntransfer_executable = false\n+FakeRunTime = 10\nqueue\n")
    pool.run_until(lambda: not pool.query(f"ClusterId == {cluster}"), 300, "the job to complete after all")
    [done] = pool.history()
    assert done["NumJobStarts"] == 2 and done["LastVacateReason"] == "the shadow failed (see the schedd's log)"
    assert pool.calls[("startd", "RELEASE_CLAIM")] == 2
    assert [s.state for s in pool.startd.slots.values()] == ["Unclaimed", "Unclaimed"]
