"""Several UNIX users on one submit host: each acts only on their own jobs, and the schedd does
their file work with their rights (it runs as root; the test creates the users)."""

from __future__ import annotations

import json
import os

from pool import start_pool
from users import USERS, as_user, ensure_user, needs_root_and_users

pytestmark = needs_root_and_users


def test_one_user_cannot_touch_anothers_jobs_and_files_are_read_with_the_owners_rights(
        creds, tmp_path, start_daemon, shared):
    accounts = {u: ensure_user(u) for u in USERS}
    pool = start_pool(creds, tmp_path, start_daemon, slots=2, cpus=2, socket_dir=shared)
    socket = shared / "schedd.sock"
    homes = {}
    for user, pw in accounts.items():
        home = shared / user
        home.mkdir(mode=0o700)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        homes[user] = home
    alice = homes["gwms-alice"]
    (alice / "sleep.sub").write_text("executable = /bin/sleep\narguments = 120\ntransfer_executable = false\n"
                                     "log = sleep.log\nqueue\n")
    secret = tmp_path / "root-only.txt"
    secret.write_text("not for alice")
    secret.chmod(0o600)
    (alice / "steal.sub").write_text(f"executable = /bin/cat\ntransfer_executable = false\n"
                                     f"transfer_input_files = {secret}\narguments = root-only.txt\n"
                                     f"output = stolen.txt\nqueue\n")
    for f in ("sleep.sub", "steal.sub"):
        os.chown(alice / f, accounts["gwms-alice"].pw_uid, accounts["gwms-alice"].pw_gid)

    submitted = as_user("gwms-alice", "submit", "sleep.sub", socket=socket, cwd=alice)
    assert submitted.returncode == 0, submitted.stderr
    queue = json.loads(as_user("gwms-bob", "q", "--allusers", "--json", socket=socket, cwd=homes["gwms-bob"]).stdout)
    assert [(j["Owner"], j["ClusterId"]) for j in queue] == [("gwms-alice", 1)]

    refused = as_user("gwms-bob", "rm", "1.0", socket=socket, cwd=homes["gwms-bob"])
    assert refused.returncode == 1 and "permission denied (not your job)" in refused.stderr
    held = as_user("gwms-bob", "hold", "1", socket=socket, cwd=homes["gwms-bob"])
    assert held.returncode == 1
    still = json.loads(as_user("gwms-alice", "q", "--json", socket=socket, cwd=alice).stdout)
    assert [j["JobStatus"] for j in still] in ([1], [2])
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    denials = [e for e in audit if e["identity"] == "gwms-bob" and not e["allowed"]]
    assert any("may not remove jobs of other users (1.0)" in e["rule"] for e in denials)
    assert any("may not hold jobs of other users" in e["rule"] for e in denials)

    # The schedd reads input files as alice: a root-only file puts the job on hold, not in her sandbox.
    assert as_user("gwms-alice", "submit", "steal.sub", socket=socket, cwd=alice).returncode == 0

    def steal_status():
        jobs = json.loads(as_user("gwms-alice", "q", "2", "--json", socket=socket, cwd=alice).stdout or "[]")
        return jobs[0] if jobs and jobs[0]["JobStatus"] == 5 else None

    from gwms.testing.polling import wait_until

    job = wait_until(steal_status, 60, "the job reading a root-only file to be held")
    assert "Permission denied" in job["HoldReason"] and str(secret) in job["HoldReason"]
    assert not (alice / "stolen.txt").exists()

    removed = as_user("gwms-alice", "rm", "1", "2", socket=socket, cwd=alice)
    assert removed.returncode == 0 and "Job 1.0 marked for removal" in removed.stdout
    log = alice / "sleep.log"
    assert log.exists() and log.stat().st_uid == accounts["gwms-alice"].pw_uid  # written as alice
    del pool
