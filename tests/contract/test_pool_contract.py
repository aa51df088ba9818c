"""Contracts every pool keeps, run against the memory pool and the real-process pool alike.

Each submit description drives both: the real pool runs the script, the memory pool's fake jobs
read the ``+Fake...`` attributes (``gwms.testing.processes``) that say what the script does."""

from __future__ import annotations

import htcondor2
import pytest

COMPLETED, REMOVED, RUNNING, HELD, IDLE = 4, 3, 2, 5, 1

EXIT_SCRIPT = """#!/bin/sh
echo "$@"
exit $(( $1 % 3 ))
"""

TEN_JOBS = """
executable = exit_mod.sh
arguments = $(Process)
+FakeExitCode = $(Process) % 3
+FakeRunTime = 1
output = out.$(Process)
error = err.$(Process)
log = jobs.log
queue 10
"""

SLOW_SCRIPT = """#!/bin/sh
sleep {seconds}
echo "$@"
"""

SLOW_JOB = """
executable = slow.sh
arguments = done
+FakeRunTime = {seconds}
output = slow.out
log = slow.log
queue {n}
"""

# Matches no slot anywhere: it stays idle for as long as the test wants.
NEVER_MATCHES = """
executable = slow.sh
requirements = false
log = idle.log
queue
"""


def _slow_files(seconds: float) -> dict[str, str]:
    return {"slow.sh": SLOW_SCRIPT.format(seconds=seconds)}


def _status(driver, cluster: int, proc: int = 0) -> int | None:
    for job in driver.queue(cluster):
        if job["ProcId"] == proc:
            return job["JobStatus"]
    return None


def test_ten_jobs_complete_with_their_exit_codes(make_pool):
    driver = make_pool(slots=4)
    user = driver.users[0]
    cluster = driver.submit(user, TEN_JOBS, {"exit_mod.sh": EXIT_SCRIPT})

    driver.wait_until(lambda: not driver.queue(cluster), 60, f"cluster {cluster} to leave the queue")
    history = driver.history(cluster)
    assert sorted((j["ProcId"], j["JobStatus"], j["ExitCode"], j["ExitBySignal"]) for j in history) == \
        [(i, COMPLETED, i % 3, False) for i in range(10)]
    assert all(j["Owner"] == user and j["NumJobStarts"] == 1 for j in history)
    iwd = driver.iwd(cluster)
    assert [(iwd / f"out.{i}").read_text() for i in range(10)] == [f"{i}\n" for i in range(10)]
    assert all((iwd / f"err.{i}").read_text() == "" for i in range(10))
    events = list(htcondor2.JobEventLog(str(iwd / "jobs.log")).events(stop_after=0))
    terminated = sorted((e.proc, e["ReturnValue"]) for e in events if e.type == htcondor2.JobEventType.JOB_TERMINATED)
    assert terminated == [(i, i % 3) for i in range(10)]
    # The sandboxes go too (the real startd removes them in a thread, a moment later).
    driver.wait_until(lambda: not driver.sandboxes(), 10, "the startd to remove the sandboxes")


# Long on its first run (so that it is still running when held), short once it has run before.
# The fake job reads the same fact from the job ad the startd got.
ONCE_LONG_SCRIPT = """#!/bin/sh
if grep -q '^NumJobStarts = 0$' "$_CONDOR_JOB_AD"; then sleep 60; fi
echo "$@"
"""

ONCE_LONG_JOB = """
executable = once_long.sh
arguments = done
+FakeRunTime = ifThenElse(NumJobStarts > 0, 1, 60)
output = once_long.out
log = once_long.log
queue
"""

# How long a running job may take to notice a hold today: the shadow looks at a kill request
# only when its WAIT_JOB long poll (20 s) returns. See test_a_hold_reaches_a_running_job_at_once.
HOLD_LATENCY = 30


def test_hold_a_running_job_release_it_and_it_completes_remove_an_idle_one(make_pool):
    driver = make_pool(slots=2)
    user = driver.users[0]
    running = driver.submit(user, ONCE_LONG_JOB, {"once_long.sh": ONCE_LONG_SCRIPT})
    idle = driver.submit(user, NEVER_MATCHES, _slow_files(0))
    job, idle_job = f"{running}.0", f"{idle}.0"

    driver.wait_until(lambda: _status(driver, running) == RUNNING, 30, f"{job} to run")
    assert driver.act(user, "hold", [job], reason="contract: hold it").done == [job]
    driver.wait_until(lambda: _status(driver, running) == HELD, HOLD_LATENCY, f"{job} to be held")
    [held] = driver.queue(running)
    assert held["HoldReason"] == "contract: hold it" and held["HoldReasonCode"] == 1

    assert driver.act(user, "release", [job]).done == [job]
    driver.wait_until(lambda: not driver.queue(running), 30, f"{job} to run again and complete")
    [done] = driver.history(running)
    assert (done["JobStatus"], done["ExitCode"], done["NumJobStarts"]) == (COMPLETED, 0, 2)
    assert (driver.iwd(running) / "once_long.out").read_text() == "done\n"
    kinds = [e.type for e in htcondor2.JobEventLog(str(driver.iwd(running) / "once_long.log")).events(stop_after=0)]
    assert kinds.index(htcondor2.JobEventType.JOB_HELD) < kinds.index(htcondor2.JobEventType.JOB_RELEASED) \
        < kinds.index(htcondor2.JobEventType.JOB_TERMINATED)

    assert _status(driver, idle) == IDLE
    assert driver.act(user, "remove", [idle_job]).done == [idle_job]
    driver.wait_until(lambda: not driver.queue(idle), 30, f"{idle_job} to leave the queue")
    [removed] = driver.history(idle)
    assert removed["JobStatus"] == REMOVED
    kinds = [e.type for e in htcondor2.JobEventLog(str(driver.iwd(idle) / "idle.log")).events(stop_after=0)]
    assert htcondor2.JobEventType.JOB_ABORTED in kinds


def test_a_hold_reaches_a_running_job_at_once(make_pool):
    driver = make_pool(slots=1)
    user = driver.users[0]
    cluster = driver.submit(user, ONCE_LONG_JOB, {"once_long.sh": ONCE_LONG_SCRIPT})
    job = f"{cluster}.0"
    driver.wait_until(lambda: _status(driver, cluster) == RUNNING, 30, f"{job} to run")
    assert driver.act(user, "hold", [job]).done == [job]
    driver.wait_until(lambda: _status(driver, cluster) == HELD, 5, f"{job} to be held")
    assert driver.act(user, "release", [job]).done == [job]
    driver.wait_until(lambda: not driver.queue(cluster), 30, f"{job} to run again on the only slot")


def test_a_user_cannot_remove_another_users_job(make_pool):
    if len(make_pool.users) < 2:
        pytest.skip(f"the {make_pool.kind} pool has one user ({make_pool.users[0]}); "
                    "tests/integration/test_pool_users.py covers this with real accounts")
    driver = make_pool(slots=1)
    alice, bob = driver.users[:2]
    cluster = driver.submit(bob, NEVER_MATCHES, _slow_files(0))
    job = f"{cluster}.0"

    refused = driver.act(alice, "remove", [job])
    assert (refused.done, refused.refused) == ([], [job])
    assert _status(driver, cluster) == IDLE
    assert driver.act(alice, "hold", [job]).refused == [job]
    assert _status(driver, cluster) == IDLE

    assert driver.act(bob, "remove", [job]).done == [job]
    driver.wait_until(lambda: not driver.queue(cluster), 30, f"{job} to leave the queue")
    assert [j["JobStatus"] for j in driver.history(cluster)] == [REMOVED]


def test_one_slot_runs_a_users_jobs_one_after_another_on_one_claim(make_pool):
    driver = make_pool(slots=1)
    user = driver.users[0]
    cluster = driver.submit(user, SLOW_JOB.format(seconds=1, n=3), _slow_files(1))

    driver.wait_until(lambda: not driver.queue(cluster), 60, f"cluster {cluster} to leave the queue")
    history = driver.history(cluster)
    assert sorted(j["JobStatus"] for j in history) == [COMPLETED] * 3
    assert len({j["RemoteHost"] for j in history}) == 1
    # One negotiation for three jobs: the schedd ran jobs 2 and 3 on the claim of job 1.
    assert driver.matches() == 1
