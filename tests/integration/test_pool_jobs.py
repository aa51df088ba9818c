"""A static pool of real daemons runs real jobs: submit, negotiate, claim, shadow and starter,
input and output sandbox, exit codes, accounting, the job event log, hold/release/remove."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gwms.testing.polling import wait_until

from pool import start_pool

JOB = """#!/bin/sh
# $1: index. Reads its input file, writes an output file, reports args and environment.
cat "input_$1.txt" > "out_$1.txt"
echo "index=$1 greeting=$GREETING args=$#"
echo "to stderr $1" >&2
exit $(( $1 % 5 ))
"""

SUBMIT = """
executable = job.sh
arguments = "$(Process) 'two words'"
environment = "GREETING=hello_$(Process)"
transfer_input_files = input_$(Process).txt
transfer_output_files = out_$(Process).txt
should_transfer_files = YES
when_to_transfer_output = ON_EXIT
output = job_$(Process).out
error = job_$(Process).err
log = jobs.log
request_memory = 64
queue {n}
"""


@pytest.fixture
def pool(creds, tmp_path, start_daemon):
    return start_pool(creds, tmp_path, start_daemon, slots=4, cpus=4)


def run(gwms_cli, pool, *args, timeout=120):
    result = gwms_cli(*args, env=pool.env, timeout=timeout)
    return result


def test_fifty_jobs_complete_with_outputs_exit_codes_and_accounting(pool, tmp_path, gwms_cli):
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "job.sh").write_text(JOB)
    (jobdir / "job.sh").chmod(0o755)
    n = 50
    for i in range(n):
        (jobdir / f"input_{i}.txt").write_text(f"payload {i}\n" * (i + 1))
    (jobdir / "jobs.sub").write_text(SUBMIT.format(n=n))
    submitted = run(gwms_cli, pool, "submit", str(jobdir / "jobs.sub"))
    assert submitted.returncode == 0, submitted.stderr
    assert f"{n} job(s) submitted to cluster 1." in submitted.stdout

    waited = run(gwms_cli, pool, "wait", "1", "--timeout", "150", timeout=170)
    assert "All 50 job(s) done" in waited.stdout, (waited.stdout, waited.stderr)

    for i in range(n):
        assert (jobdir / f"out_{i}.txt").read_text() == f"payload {i}\n" * (i + 1)
        assert (jobdir / f"job_{i}.out").read_text() == f"index={i} greeting=hello_{i} args=2\n"
        assert (jobdir / f"job_{i}.err").read_text() == f"to stderr {i}\n"

    history = json.loads(run(gwms_cli, pool, "history", "1", "--json").stdout)
    assert len(history) == n
    for job in history:
        assert job["JobStatus"] == 4
        assert job["ExitCode"] == job["ProcId"] % 5
        assert job["ExitBySignal"] is False
        assert job["NumJobStarts"] == 1
        assert job["RemoteWallClockTime"] > 0 and "RemoteUserCpu" in job and "RemoteSysCpu" in job
        assert job["CompletionDate"] >= job["QDate"]

    import htcondor2

    events = list(htcondor2.JobEventLog(str(jobdir / "jobs.log")).events(stop_after=0))
    kinds = [e.type for e in events]
    assert kinds.count(htcondor2.JobEventType.SUBMIT) == n
    assert kinds.count(htcondor2.JobEventType.EXECUTE) == n
    terminated = [e for e in events if e.type == htcondor2.JobEventType.JOB_TERMINATED]
    assert sorted((e.proc, e["ReturnValue"]) for e in terminated) == [(i, i % 5) for i in range(n)]
    # the queue is empty again
    q = json.loads(run(gwms_cli, pool, "q", "--json", "--allusers").stdout)
    assert q == []


HOLD_SUBMIT = """
executable = /bin/sleep
arguments = 300
transfer_executable = false
log = hold.log
queue 2
"""


def test_hold_release_and_remove(pool, tmp_path, gwms_cli):
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "hold.sub").write_text(HOLD_SUBMIT)
    assert run(gwms_cli, pool, "submit", str(jobdir / "hold.sub")).returncode == 0

    def status(job):
        jobs = json.loads(run(gwms_cli, pool, "q", job, "--json").stdout)
        return jobs[0]["JobStatus"] if jobs else None

    wait_until(lambda: status("1.0") == 2, 60, "job 1.0 to run")
    held = run(gwms_cli, pool, "hold", "1.0", "--reason", "testing hold")
    assert "Job 1.0 held" in held.stdout
    wait_until(lambda: status("1.0") == 5, 30, "job 1.0 to be held")
    long = run(gwms_cli, pool, "q", "1.0", "--long").stdout
    assert 'HoldReason = "testing hold"' in long
    assert "Job 1.0 released" in run(gwms_cli, pool, "release", "1.0").stdout
    wait_until(lambda: status("1.0") in (1, 2), 30, "job 1.0 to be released")
    removed = run(gwms_cli, pool, "rm", "1")
    assert "Job 1.0 marked for removal" in removed.stdout and "Job 1.1 marked for removal" in removed.stdout
    wait_until(lambda: status("1") is None, 30, "cluster 1 to leave the queue")
    history = json.loads(run(gwms_cli, pool, "history", "1", "--json").stdout)
    assert sorted(j["JobStatus"] for j in history) == [3, 3]
    # no sleep left behind on the worker
    wait_until(lambda: not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == "/bin/sleep 300"],
               20, "the held and removed jobs' processes to be gone")
    import htcondor2

    kinds = [e.type for e in htcondor2.JobEventLog(str(jobdir / "hold.log")).events(stop_after=0)]
    assert htcondor2.JobEventType.JOB_HELD in kinds and htcondor2.JobEventType.JOB_RELEASED in kinds
    assert htcondor2.JobEventType.JOB_ABORTED in kinds


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


WITNESS_JOB = """#!/bin/sh
echo "start $1" >> "{witness}"
sleep $2
echo "done $1" > "result_$1.txt"
"""

WITNESS_SUBMIT = """
executable = witness.sh
arguments = $(Process) {seconds}
transfer_output_files = result_$(Process).txt
log = witness.log
queue {n}
"""


def test_schedd_killed_with_running_jobs_loses_none_and_runs_none_twice(pool, tmp_path, gwms_cli):
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    witness = tmp_path / "witness.log"
    (jobdir / "witness.sh").write_text(WITNESS_JOB.format(witness=witness))
    (jobdir / "witness.sh").chmod(0o755)
    (jobdir / "w.sub").write_text(WITNESS_SUBMIT.format(n=6, seconds=4))
    assert run(gwms_cli, pool, "submit", str(jobdir / "w.sub")).returncode == 0

    def running():
        jobs = json.loads(run(gwms_cli, pool, "q", "--json", "--allusers").stdout or "[]")
        return sum(1 for j in jobs if j["JobStatus"] == 2)

    wait_until(lambda: running() >= 2, 60, "jobs to start running")
    schedd = pool.daemons["schedd"]
    schedd.kill9()
    pool.daemons["schedd"] = schedd.restart()

    waited = run(gwms_cli, pool, "wait", "1", "--timeout", "120", timeout=150)
    assert "All 6 job(s) done" in waited.stdout, (waited.stdout, waited.stderr)
    starts = [line for line in witness.read_text().splitlines() if line.startswith("start")]
    assert sorted(starts) == sorted(f"start {i}" for i in range(6)), starts  # each ran exactly once
    for i in range(6):
        assert (jobdir / f"result_{i}.txt").read_text() == f"done {i}\n"
    history = json.loads(run(gwms_cli, pool, "history", "1", "--json").stdout)
    assert sorted(j["NumJobStarts"] for j in history) == [1] * 6
    assert all(j["JobStatus"] == 4 and j["ExitCode"] == 0 for j in history)
    import htcondor2

    events = list(htcondor2.JobEventLog(str(jobdir / "witness.log")).events(stop_after=0))
    disconnected = {e.proc for e in events if e.type == htcondor2.JobEventType.JOB_DISCONNECTED}
    reconnected = {e.proc for e in events if e.type == htcondor2.JobEventType.JOB_RECONNECTED}
    assert len(disconnected) >= 2 and disconnected == reconnected  # the running jobs were picked up again


DAEMON_JOB = """#!/bin/sh
# Leaves a child behind that escapes its process group and session.
( setsid sh -c 'GWMS_TEST_ESCAPEE={token} exec sleep 300' & )
echo started
"""


def test_a_job_that_daemonizes_leaves_no_process_behind(pool, tmp_path, gwms_cli):
    import secrets

    token = secrets.token_hex(8)
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "d.sh").write_text(DAEMON_JOB.format(token=token))
    (jobdir / "d.sh").chmod(0o755)
    (jobdir / "d.sub").write_text("executable = d.sh\noutput = d.out\nqueue\n")
    assert run(gwms_cli, pool, "submit", str(jobdir / "d.sub")).returncode == 0
    waited = run(gwms_cli, pool, "wait", "1", "--timeout", "60", timeout=80)
    assert "All 1 job(s) done" in waited.stdout, waited.stderr
    assert (jobdir / "d.out").read_text() == "started\n"

    def escapees():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if f"GWMS_TEST_ESCAPEE={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    wait_until(lambda: not escapees(), 20, "the daemonized child to be killed")


def test_partitionable_slot_is_split_by_job_requests(creds, tmp_path, start_daemon, gwms_cli):
    pool = start_pool(creds, tmp_path, start_daemon, slots=1, partitionable=True, cpus=4)
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "p.sub").write_text("executable = /bin/sleep\narguments = 3\nrequest_cpus = 1\n"
                                  "request_memory = 100\nqueue 4\n")
    assert run(gwms_cli, pool, "submit", str(jobdir / "p.sub")).returncode == 0

    def dynamic_slots():
        out = run(gwms_cli, pool, "status", "--json", "--constraint", 'SlotType == "Dynamic"').stdout
        return json.loads(out or "[]")

    slots = wait_until(lambda: (lambda s: s if len(s) == 4 else None)(dynamic_slots()), 60,
                       "four dynamic slots carved from the partitionable slot")
    assert sorted(s["Name"] for s in slots) == [f"slot1_{i}@wn1" for i in range(1, 5)]
    assert all(s["Cpus"] == 1 and s["Memory"] == 100 for s in slots)
    waited = run(gwms_cli, pool, "wait", "1", "--timeout", "60", timeout=80)
    assert "All 4 job(s) done" in waited.stdout
    history = json.loads(run(gwms_cli, pool, "history", "1", "--json").stdout)
    assert sorted(j["RemoteHost"] for j in history) == [f"slot1_{i}@wn1" for i in range(1, 5)]
