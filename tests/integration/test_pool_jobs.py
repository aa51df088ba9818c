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
