"""Real twistd daemons on 127.0.0.1 with credentials from a test CA."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gwms.credentials import ca as ca_tools
from gwms.credentials import tokens, x509
from gwms.cli.demo import twistd_command
from gwms.testing.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]


class Credentials:
    def __init__(self, base: Path) -> None:
        self.dir = base / "creds"
        ca_tools.init_ca(self.dir, name="gwms test CA")
        self.ca = self.dir / "ca.pem"
        self.host_cert, self.host_key = ca_tools.issue_host(self.dir, "localhost")
        self.users = {u: ca_tools.issue_user(self.dir, u) for u in ("alice", "bob", "mallory")}
        self.signing_key = self.dir / "pool.key"
        tokens.generate_signing_key(self.signing_key)
        self.other_dir = base / "other-ca"
        ca_tools.init_ca(self.other_dir, name="some other CA")
        self.other_user = ca_tools.issue_user(self.other_dir, "alice")

    def user(self, name: str) -> x509.Credential:
        cert, key = self.users[name]
        return x509.load_credential(cert, key)

    def proxy(self, name: str, path: Path, hours: float = 12, limited: bool = False,
              now: dt.datetime | None = None) -> Path:
        cred = x509.create_proxy(self.user(name), hours=hours, limited=limited, key_bits=2048, now=now)
        x509.write_credential(path, cred)
        return path

    def token(self, subject: str, scopes: list[str], key: Path | None = None, hours: float = 1,
              issuer: str = "itest") -> str:
        return tokens.create_token(tokens.load_signing_key(key or self.signing_key), subject, issuer,
                                   scopes, hours * 3600)


@pytest.fixture(scope="session")
def creds(tmp_path_factory) -> Credentials:
    return Credentials(tmp_path_factory.mktemp("pki"))


class Daemon:
    """A ``twistd -n gwms-<role>`` child process; ``address`` once it listens. Every instance
    is recorded, so that the fixture stops restarted daemons too."""

    started: list["Daemon"] = []

    def __init__(self, role: str, config: Path, workdir: Path, address_name: str | None = None) -> None:
        Daemon.started.append(self)
        self.role = role
        self.config = config
        self.workdir = workdir
        self.log = workdir / f"{address_name or role}.log"
        self.address_file = workdir / f"{address_name or role}.address"
        self.address_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(self.log),
             f"gwms-{role}", "--config", str(config)],
            cwd=workdir, stdin=subprocess.DEVNULL, start_new_session=True)
        self.address = self._wait_for_address(30)
        self.host, _, port = self.address.rpartition(":")
        self.port = int(port)

    def _wait_for_address(self, seconds: float) -> str:
        def listening() -> str:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.role} exited with {self.process.returncode}:\n{self.log_text()}")
            return self.address_file.read_text().strip() if self.address_file.exists() else ""

        return wait_until(listening, seconds, f"{self.role} to listen ({self.log})")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"

    def kill9(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def restart(self) -> "Daemon":
        return Daemon(self.role, self.config, self.workdir, self.address_file.name[:-len(".address")])

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def start_daemon():
    before = len(Daemon.started)

    def start(role: str, config: Path, workdir: Path, address_name: str | None = None) -> Daemon:
        return Daemon(role, config, workdir, address_name)

    yield start
    for d in Daemon.started[before:]:
        d.stop()
    del Daemon.started[before:]


def run_gwms(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The gwms command line, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "gwms", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def gwms_cli():
    return run_gwms


@pytest.fixture
def shared():
    """A world-traversable directory (pytest's tmp_path is root's only) for what other users
    must reach: a schedd's socket, their job directories, a startd's execute directory."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="gwms-users-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


# -- real site programs (installed by the test setup when missing) ------------------------------


@pytest.fixture(scope="session")
def slurm():
    """A two-node Slurm cluster on this host (slurm_cluster.py), for the whole session."""
    from slurm_cluster import SlurmCluster

    cluster = SlurmCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ssh_server(slurm):
    """An sshd on 127.0.0.1 for an unprivileged account whose sessions reach the Slurm cluster."""
    from ssh_server import SSHServer

    server = SSHServer({"SLURM_CONF": str(slurm.conf)})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def node_python(ssh_server):
    """A Python with gwms that the ssh account can run (ssh_server.python_for_other_users)."""
    import shutil

    from ssh_server import python_for_other_users

    python = python_for_other_users()
    yield python
    shutil.rmtree(python.parents[2], ignore_errors=True)
