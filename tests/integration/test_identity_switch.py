"""Identity switching on a real startd running as root: each job runs as its user's account
(setuid, or behind the stock gLExec-like helper), cannot read another job's sandbox nor the
pilot credential, leaves no process behind; the none switch takes one user's jobs only unless
allow_shared_identity. The test users are created as in test_pool_users."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from gwms.testing.polling import wait_until

from pool import start_pool
from users import USERS, as_user, ensure_user, needs_root_and_users

pytestmark = needs_root_and_users

ALICE_DN = "/O=gwms/OU=Users/CN=alice"
BOB_DN = "/O=gwms/OU=Users/CN=bob"


@pytest.fixture(scope="session")
def accounts():
    return {user: ensure_user(user) for user in USERS}


class Users:
    """Each test user's job directory (theirs, 0700) under ``shared``, and the gwms CLI as them."""

    def __init__(self, shared: Path, accounts: dict) -> None:
        self.shared = shared
        self.accounts = accounts
        self.socket = shared / "schedd.sock"
        self.dirs = {}
        for user, pw in accounts.items():
            home = shared / user
            home.mkdir(mode=0o700)
            os.chown(home, pw.pw_uid, pw.pw_gid)
            self.dirs[user] = home

    def write(self, user: str, name: str, text: str, mode: int = 0o644) -> Path:
        path = self.dirs[user] / name
        path.write_text(text)
        path.chmod(mode)
        os.chown(path, self.accounts[user].pw_uid, self.accounts[user].pw_gid)
        return path

    def gwms(self, user: str, *args: str, timeout: float = 60):
        return as_user(user, *args, socket=self.socket, cwd=self.dirs[user], timeout=timeout)

    def submit(self, user: str, name: str, text: str) -> int:
        self.write(user, name, text)
        result = self.gwms(user, "submit", name)
        assert result.returncode == 0, result.stderr
        return int(re.search(r"submitted to cluster (\d+)", result.stdout).group(1))

    def status(self, user: str, cluster: int) -> int | None:
        jobs = json.loads(self.gwms(user, "q", str(cluster), "--json").stdout or "[]")
        return jobs[0]["JobStatus"] if jobs else None

    def wait(self, user: str, cluster: int, timeout: float = 40) -> dict:
        done = self.gwms(user, "wait", str(cluster), "--timeout", str(timeout), timeout=timeout + 20)
        assert "done" in done.stdout, (done.stdout, done.stderr)
        (job,) = json.loads(self.gwms(user, "history", str(cluster), "--json").stdout)
        return job


@pytest.fixture
def users(shared, accounts):
    return Users(shared, accounts)


def _pids_of(argv: list[str], uid: int | None = None) -> list[int]:
    """Live processes whose command line is exactly ``argv`` (and, if given, of ``uid``)."""
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read() != wanted:
                    continue
            st = os.stat(f"/proc/{name}")
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and (uid is None or st.st_uid == uid):
            found.append(int(name))
    return found


BOB_JOB = """#!/bin/sh
echo "bob's secret" > secret.txt
exec sleep 120
"""

# $1 bob's sandbox, $2 the pilot credential, $3 bob's job's pid, $4 a file outside for a planted link
ALICE_JOB = """#!/bin/sh
id -u
id -un
ls "$1" && echo "LISTED bob's sandbox"
cat "$1/secret.txt" && echo "READ bob's secret"
cat "$2" && echo "READ the pilot credential"
kill -9 "$3" && echo "KILLED bob's job"
setsid sleep 3137 < /dev/null > /dev/null 2>&1 &
ln -s "$4" planted-link
echo result > result.txt
echo finished
"""


def test_setuid_runs_each_job_as_its_owner_isolated_and_leaves_nothing_behind(
        creds, tmp_path, start_daemon, shared, users, accounts):
    alice, bob = accounts["gwms-alice"], accounts["gwms-bob"]
    pilot = shared / "pilot.pem"
    pilot.write_text("THE PILOT'S CREDENTIAL\n")
    pilot.chmod(0o600)
    victim = shared / "victim.txt"
    victim.write_text("must survive the sandbox's removal\n")
    execute = shared / "execute"
    mapfile = tmp_path / "worker-grid-mapfile"
    mapfile.write_text(f'"{ALICE_DN}" gwms-alice\n"{BOB_DN}" gwms-bob\n')
    pool = start_pool(creds, tmp_path, start_daemon, slots=2, cpus=2, socket_dir=shared, execute_dir=execute,
                      startd_extra=f'identity_switch = "setuid"\npilot_credential = "{pilot}"\n'
                                   f'grid_mapfile = "{mapfile}"\n')
    assert stat.S_IMODE(execute.stat().st_mode) in (0o755, 0o711) and execute.stat().st_uid == 0

    users.write("gwms-bob", "bob.sh", BOB_JOB, 0o755)
    bob_cluster = users.submit("gwms-bob", "bob.sub", "executable = bob.sh\nlog = bob.log\nqueue\n")
    bob_secret = wait_until(lambda: next(iter(execute.glob("dir_*/secret.txt")), None), 40,
                            "bob's job to write its secret")
    bob_box = bob_secret.parent
    assert (bob_box.stat().st_uid, stat.S_IMODE(bob_box.stat().st_mode)) == (bob.pw_uid, 0o700)
    assert bob_secret.stat().st_uid == bob.pw_uid
    (bob_pid,) = wait_until(lambda: _pids_of(["sleep", "120"], bob.pw_uid), 10, "bob's job's sleep")

    users.write("gwms-alice", "alice.sh", ALICE_JOB, 0o755)
    cluster = users.submit("gwms-alice", "alice.sub", (
        f'executable = alice.sh\narguments = "{bob_box} {pilot} {bob_pid} {victim}"\n'
        "transfer_output_files = result.txt\noutput = alice.out\nerror = alice.err\nlog = alice.log\nqueue\n"))
    job = users.wait("gwms-alice", cluster)
    out = (users.dirs["gwms-alice"] / "alice.out").read_text()
    err = (users.dirs["gwms-alice"] / "alice.err").read_text()
    assert out.splitlines() == [str(alice.pw_uid), "gwms-alice", "finished"], (out, err)
    assert err.count("Permission denied") >= 3 and "Operation not permitted" in err, err
    assert job["ExitCode"] == 0 and job["RemoteAccount"] == "gwms-alice"
    # Its output file, written as alice, came back (the starter, root, read it).
    assert (users.dirs["gwms-alice"] / "result.txt").read_text() == "result\n"
    # Nothing of the job is left: its daemonized sleep was killed across the change of uid.
    assert _pids_of(["sleep", "3137"]) == []
    assert "leftover_processes_killed=1" in pool.daemons["startd"].log_text()
    # Its sandbox is gone, without following the link it planted.
    wait_until(lambda: list(execute.iterdir()) == [bob_box], 10, "alice's sandbox to be removed")
    assert victim.read_text() == "must survive the sandbox's removal\n" and pilot.exists()
    # bob's job runs on, untouched.
    assert _pids_of(["sleep", "120"], bob.pw_uid) == [bob_pid]
    assert users.status("gwms-bob", bob_cluster) == 2
    assert users.gwms("gwms-bob", "rm", str(bob_cluster)).returncode == 0
    wait_until(lambda: not _pids_of(["sleep", "120"], bob.pw_uid), 20, "bob's job to be killed")
    wait_until(lambda: list(execute.iterdir()) == [], 10, "bob's sandbox to be removed")
    del pool


def test_none_takes_one_users_jobs_unless_shared_identity_is_allowed(
        creds, tmp_path, start_daemon, shared, users, gwms_cli):
    pool = start_pool(creds, tmp_path, start_daemon, slots=1, cpus=1, socket_dir=shared,
                      execute_dir=shared / "execute")
    job = "executable = /usr/bin/id\narguments = -un\ntransfer_executable = false\noutput = id.out\nqueue\n"
    first = users.submit("gwms-alice", "id.sub", job)
    assert users.wait("gwms-alice", first)["ExitCode"] == 0
    second = users.submit("gwms-bob", "id.sub", job)
    # The startd's account is alice's now: its slot takes her jobs only, bob's waits, through
    # three more negotiation cycles.
    negotiator = pool.daemons["negotiator"]
    cycles = negotiator.log_text().count("cycle: ")
    wait_until(lambda: negotiator.log_text().count("cycle: ") >= cycles + 3, 30, "three negotiation cycles")
    assert users.status("gwms-bob", second) == 1
    (slot,) = json.loads(gwms_cli("status", "--json", env=pool.env).stdout)
    assert 'TARGET.Owner is "gwms-alice"' in str(slot["Start"])

    startd = pool.daemons["startd"]
    startd.stop()
    pool.config.write_text(pool.config.read_text().replace(
        "[startd]\n", "[startd]\nallow_shared_identity = true\n", 1))
    pool.daemons["startd"] = startd.restart()
    third = users.submit("gwms-alice", "id.sub", job)
    for user, cluster in (("gwms-bob", second), ("gwms-alice", third)):  # both on the one startd
        assert users.wait(user, cluster)["ExitCode"] == 0
    assert (users.dirs["gwms-bob"] / "id.out").read_text() == "root\n"  # as the startd's user
    log = pool.daemons["startd"].log_text()
    assert log.count("each job can read, change and kill the other users' files and processes") == 1


GLEXEC_JOB = """#!/bin/sh
id -un
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH GREETING=$GREETING"
pwd
setsid sleep 3138 < /dev/null > /dev/null 2>&1 &
"""


def test_glexec_helper_runs_the_job_as_the_mapped_account(creds, tmp_path, start_daemon, shared, users, accounts):
    mapfile = tmp_path / "worker-grid-mapfile"
    mapfile.write_text(f'"{ALICE_DN}" gwms-alice\n"{BOB_DN}" gwms-bob\n')
    execute = shared / "execute"
    pool = start_pool(creds, tmp_path, start_daemon, slots=3, cpus=3, socket_dir=shared, execute_dir=execute,
                      startd_extra=f'identity_switch = "glexec"\ngrid_mapfile = "{mapfile}"\n')
    users.write("gwms-alice", "job.sh", GLEXEC_JOB, 0o755)
    for name in ("alice", "bob"):
        proxy = creds.proxy(name, users.dirs["gwms-alice"] / f"{name}.proxy")
        os.chown(proxy, accounts["gwms-alice"].pw_uid, accounts["gwms-alice"].pw_gid)
    submit = ('executable = job.sh\nenvironment = "LD_LIBRARY_PATH=/opt/lib GREETING=hi {proxy_env}"\n'
              "{inputs}output = {name}.out\nerror = {name}.err\nqueue\n")
    clusters = {
        # By the Owner; the job keeps its environment, even what the helper (root) must not see.
        "plain": users.submit("gwms-alice", "plain.sub", submit.format(name="plain", proxy_env="", inputs="")),
        # By the DN of the (verified) proxy the job brings.
        "alice": users.submit("gwms-alice", "alice.sub", submit.format(
            name="alice", proxy_env="X509_USER_PROXY=alice.proxy", inputs="transfer_input_files = alice.proxy\n")),
        # bob's proxy in alice's job maps to bob, but the sandbox was made for alice: refused.
        "bob": users.submit("gwms-alice", "bob.sub", submit.format(
            name="bob", proxy_env="X509_USER_PROXY=bob.proxy", inputs="transfer_input_files = bob.proxy\n")),
    }
    results = {name: users.wait("gwms-alice", cluster) for name, cluster in clusters.items()}
    read = {name: (users.dirs["gwms-alice"] / f"{name}.out").read_text() for name in clusters}
    for name in ("plain", "alice"):
        assert results[name]["ExitCode"] == 0 and results[name]["RemoteAccount"] == "gwms-alice"
        whoami, env, cwd = read[name].splitlines()
        assert (whoami, env) == ("gwms-alice", "LD_LIBRARY_PATH=/opt/lib GREETING=hi")
        assert Path(cwd).parent == execute
    assert _pids_of(["sleep", "3138"]) == []  # killed, though the helper switched, not the launcher
    assert pool.daemons["startd"].log_text().count("leftover_processes_killed=1") == 2
    assert results["bob"]["ExitCode"] == 126 and read["bob"] == ""
    err = (users.dirs["gwms-alice"] / "bob.err").read_text()
    assert "gwms-glexec: the job maps to 'gwms-bob'" in err and "refusing to run it there" in err
    del pool


PROXY_JOB = """#!/bin/sh
id -un
stat -c '%a %U' "$X509_USER_PROXY"
openssl x509 -noout -subject -nameopt compat -in "$X509_USER_PROXY"
"""


def test_setuid_and_delegation_the_job_gets_its_proxy_as_its_own_account(
        creds, tmp_path, start_daemon, shared, users, accounts):
    alice = accounts["gwms-alice"]
    mapfile = tmp_path / "worker-grid-mapfile"
    mapfile.write_text(f'"{ALICE_DN}" gwms-alice\n')
    start_pool(creds, tmp_path, start_daemon, slots=1, cpus=1, socket_dir=shared, execute_dir=shared / "execute",
               startd_extra=f'identity_switch = "setuid"\ngrid_mapfile = "{mapfile}"\n')
    proxy = creds.proxy("alice", users.dirs["gwms-alice"] / "x509up")
    os.chown(proxy, alice.pw_uid, alice.pw_gid)  # the user's own proxy, 0600: the schedd reads it as her
    users.write("gwms-alice", "proxy.sh", PROXY_JOB, 0o755)
    cluster = users.submit("gwms-alice", "proxy.sub", "executable = proxy.sh\nx509userproxy = x509up\n"
                                                      "output = proxy.out\nerror = proxy.err\nqueue\n")
    job = users.wait("gwms-alice", cluster)
    out = (users.dirs["gwms-alice"] / "proxy.out").read_text().splitlines()
    assert job["ExitCode"] == 0, (out, (users.dirs["gwms-alice"] / "proxy.err").read_text())
    assert out[:2] == ["gwms-alice", "600 gwms-alice"]
    assert out[2].startswith(f"subject={ALICE_DN}/CN=")  # delegated: one proxy level below hers
    assert job["x509UserProxySubject"] == ALICE_DN and job["RemoteAccount"] == "gwms-alice"
