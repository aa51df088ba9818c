"""Several UNIX users on one submit host: each acts only on their own jobs, and the schedd does
their file work with their rights (it runs as root; the test creates the users)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pool import start_pool

USERS = ("gwms-alice", "gwms-bob")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"),
                                reason="needs root with useradd and runuser to create test users")


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
        return pwd.getpwnam(name)


@pytest.fixture
def shared(tmp_path):
    """A world-traversable directory for the schedd socket and the users' job directories."""
    base = Path(tempfile.mkdtemp(prefix="gwms-users-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _world_reachable(path: Path) -> bool:
    """Whether any user can reach ``path``: every directory above it has the x bit for others."""
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in path.parents) and path.stat().st_mode & 0o005 == 0o005


def user_python() -> tuple[str, list[str]]:
    """An interpreter other users may run, and the import path that gives it gwms and its
    dependencies. The venv's interpreter may live under /root (pyenv); then the system Python of
    the same version is used with the venv's site-packages."""
    import site
    import sysconfig

    paths = [p for p in os.environ["PYTHONPATH"].split(os.pathsep) if p] + [sysconfig.get_paths()["purelib"]]
    paths += [p for p in site.getsitepackages() if p not in paths]
    if not all(_world_reachable(Path(p)) for p in paths if Path(p).exists()):
        pytest.skip("the source tree or site-packages is not readable by other users")
    if _world_reachable(Path(sys.executable)):
        return sys.executable, paths
    system = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if system.exists():
        return str(system), paths
    pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} that other users may run")


def as_user(user: str, *args: str, socket: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    python, paths = user_python()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(paths),
           "GWMS_SCHEDD": f"unix:{socket}", "HOME": str(cwd)}
    return subprocess.run(["runuser", "-u", user, "--", python, "-m", "gwms", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


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
