"""Job policy expressions, startd shutdown, and remote submission through the grid-mapfile."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gwms.testing.polling import wait_until
from pool import start_pool


@pytest.fixture
def pool(creds, tmp_path, start_daemon):
    return start_pool(creds, tmp_path, start_daemon, slots=2, cpus=2)


def jobs(gwms_cli, pool, *args):
    out = gwms_cli(*args, "--json", env=pool.env).stdout
    return json.loads(out or "[]")


def test_periodic_hold_with_reason_then_periodic_remove(pool, tmp_path, gwms_cli):
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "p.sub").write_text(
        "executable = /bin/sleep\narguments = 120\ntransfer_executable = false\nlog = p.log\n"
        "periodic_hold = JobStatus == 2 && time() - EnteredCurrentStatus > 1\n"
        'periodic_hold_reason = strcat("ran more than ", 1, " s")\n'
        "periodic_hold_subcode = 42\n"
        "periodic_remove = JobStatus == 5 && time() - EnteredCurrentStatus > 2\n"
        "queue\n")
    assert gwms_cli("submit", str(jobdir / "p.sub"), env=pool.env).returncode == 0
    held = wait_until(lambda: [j for j in jobs(gwms_cli, pool, "q", "1.0") if j["JobStatus"] == 5], 60,
                      "periodic_hold to hold the running job")
    assert held[0]["HoldReason"] == "ran more than 1 s" and held[0]["HoldReasonSubCode"] == 42
    gone = wait_until(lambda: jobs(gwms_cli, pool, "history", "1"), 60, "periodic_remove to remove the held job")
    assert gone[0]["JobStatus"] == 3
    assert "PeriodicRemove" in gone[0]["RemoveReason"]
    import htcondor2

    kinds = [e.type for e in htcondor2.JobEventLog(str(jobdir / "p.log")).events(stop_after=0)]
    assert kinds[:3] == [htcondor2.JobEventType.SUBMIT, htcondor2.JobEventType.EXECUTE,
                         htcondor2.JobEventType.JOB_HELD]
    assert kinds[-1] == htcondor2.JobEventType.JOB_ABORTED


def test_startd_shutdown_evicts_the_job_back_to_idle(pool, tmp_path, gwms_cli):
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "s.sub").write_text("executable = /bin/sleep\narguments = 300\ntransfer_executable = false\n"
                                  "log = s.log\nqueue\n")
    assert gwms_cli("submit", str(jobdir / "s.sub"), env=pool.env).returncode == 0
    wait_until(lambda: [j for j in jobs(gwms_cli, pool, "q", "1.0") if j["JobStatus"] == 2], 60, "the job to run")
    startd = pool.daemons["startd"]
    assert startd.stop() in (0, -15)  # twistd re-raises the signal it stopped on
    assert "Server Shut Down." in startd.log_text()
    idle = wait_until(lambda: [j for j in jobs(gwms_cli, pool, "q", "1.0") if j["JobStatus"] == 1], 30,
                      "the evicted job to be idle again")
    assert idle[0]["NumJobStarts"] == 1 and "shutting down" in idle[0]["LastVacateReason"]
    import htcondor2

    events = list(htcondor2.JobEventLog(str(jobdir / "s.log")).events(stop_after=0))
    assert events[-1].type == htcondor2.JobEventType.JOB_EVICTED
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == "/bin/sleep 300"]


def test_remote_submission_maps_the_dn_through_the_grid_mapfile(pool, creds, tmp_path, gwms_cli):
    import getpass

    schedd = pool.daemons["schedd"].address
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "r.sub").write_text("executable = /bin/echo\narguments = remote\ntransfer_executable = false\n"
                                  "output = r.out\nqueue\n")

    def user_config(name):
        cert, key = creds.users[name]
        path = tmp_path / f"{name}.toml"
        path.write_text(f'[pool]\nca = "{creds.ca}"\ncert = "{cert}"\nkey = "{key}"\n')
        return path

    alice = gwms_cli("submit", str(jobdir / "r.sub"), "--config", str(user_config("alice")), "--schedd", schedd)
    assert alice.returncode == 0, alice.stderr
    waited = gwms_cli("wait", "1", "--timeout", "60", env=pool.env, timeout=80)
    assert "All 1 job(s) done" in waited.stdout
    assert (jobdir / "r.out").read_text() == "remote\n"
    [job] = jobs(gwms_cli, pool, "history", "1")
    assert job["Owner"] == getpass.getuser()
    bob = gwms_cli("submit", str(jobdir / "r.sub"), "--config", str(user_config("bob")), "--schedd", schedd)
    assert bob.returncode == 2 and "has no local account on this submit host" in bob.stderr


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_analyze_says_which_clause_keeps_a_job_idle(pool, tmp_path, gwms_cli):
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "big.sub").write_text("executable = /bin/true\ntransfer_executable = false\n"
                                    "request_memory = 900000\nrequirements = OpSys == \"LINUX\"\nqueue\n")
    assert gwms_cli("submit", str(jobdir / "big.sub"), env=pool.env).returncode == 0
    wait_until(lambda: "slot1@wn1" in gwms_cli("status", env=pool.env).stdout, 30, "the slots to be advertised")
    report = gwms_cli("q", "--analyze", "1.0", env=pool.env)
    assert report.returncode == 0, report.stderr
    assert "RequestMemory" in report.stdout and "2 slots" in report.stdout, report.stdout
    missing = gwms_cli("q", "--analyze", "99.0", env=pool.env)
    assert missing.returncode == 2 and "job 99.0 not found" in missing.stderr
