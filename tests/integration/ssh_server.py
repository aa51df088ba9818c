"""A real OpenSSH server on 127.0.0.1 for the ssh grid's tests: an unprivileged account
(``gwms-ssh``) with a home in a temporary directory, a test key pair, strict host key checking
(the factory gets a known_hosts file), and a Python with gwms the account can run (the role of
the software a site installs on its nodes). The recipe is in ../shared/SITES.md."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from gwms.cli.demo import free_port
from gwms.testing.polling import wait_until

from sites import ensure_programs

USER = "gwms-ssh"
ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


class SSHServer:
    def __init__(self, environment: dict[str, str] | None = None) -> None:
        ensure_programs({"/usr/sbin/sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client"})
        self.dir = Path(tempfile.mkdtemp(prefix="gwms-sshd-"))
        self.dir.chmod(0o755)
        self.home = self.dir / "home"
        try:
            pwd.getpwnam(USER)
            _run("usermod", "-d", str(self.home), USER)
        except KeyError:
            _run("useradd", "-M", "-d", str(self.home), "-s", "/bin/sh", USER)
        _run("usermod", "-p", "*", USER)  # no password, but not locked (sshd refuses locked accounts)
        self.uid = pwd.getpwnam(USER).pw_uid
        self.home.mkdir(mode=0o755)
        os.chown(self.home, self.uid, pwd.getpwnam(USER).pw_gid)
        self.host_key = self.dir / "host_key"
        self.client_key = self.dir / "client_key"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.client_key))
        ssh_dir = self.home / ".ssh"
        _run("install", "-d", "-m700", "-o", USER, "-g", USER, str(ssh_dir))
        _run("install", "-m600", "-o", USER, "-g", USER, f"{self.client_key}.pub", str(ssh_dir / "authorized_keys"))
        self.port = free_port()
        host_pub = (self.dir / "host_key.pub").read_text().split()
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.log = self.dir / "sshd.log"
        set_env = " ".join(f"{k}={v}" for k, v in (environment or {}).items())
        (self.dir / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {self.port}\nPidFile {self.dir}/sshd.pid\nHostKey {self.host_key}\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"PermitRootLogin no\nAllowUsers {USER}\nUsePAM no\nLogLevel VERBOSE\nMaxSessions 50\n"
            f"MaxStartups 50\n{'SetEnv ' + set_env if set_env else ''}\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(self.dir / "sshd_config"),
                                         "-E", str(self.log)], stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self._listening, 20, "sshd to listen")
        self.contact = f"{USER}@127.0.0.1:{self.port}"

    def _listening(self) -> bool:
        assert self.process.poll() is None, f"sshd exited: {self.log.read_text() if self.log.exists() else ''}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def logins(self) -> int:
        """How many SSH logins sshd has accepted."""
        return self.log.read_text().count("Accepted publickey for " + USER)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # The account's processes (a glidein left behind by a failed test) go too.
        subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


_node_python: Path | None = None


def python_for_other_users() -> Path:
    """A Python with gwms and its dependencies that any account can run: a venv of the system's
    Python 3 holding a copy of this environment's packages and of this tree's gwms (this
    environment may live where other accounts cannot reach, e.g. under /root)."""
    global _node_python
    if _node_python is not None:
        return _node_python
    ensure_programs({"/usr/bin/python3": "python3"})
    base = Path(tempfile.mkdtemp(prefix="gwms-node-python-"))
    base.chmod(0o755)
    venv = base / "venv"
    _run("/usr/bin/python3", "-m", "venv", "--without-pip", str(venv))
    version = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "%d.%d" % sys.version_info[:2], f"system Python {version} cannot use this environment's packages"
    target = venv / "lib" / f"python{version}" / "site-packages"
    source = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "twisted").is_dir()))
    skip = shutil.ignore_patterns("__pycache__", "pip", "pip-*", "_pytest", "pytest*", "hypothesis*", "ruff*",
                                  "__editable__*", "gwms*", "*.pth")
    shutil.copytree(source, target, ignore=skip, dirs_exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "gwms", target / "gwms", ignore=ignore)
    shutil.copytree(ROOT / "twisted" / "plugins", target / "twisted" / "plugins", ignore=ignore, dirs_exist_ok=True)
    for path in [base, *base.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o044 | (0o011 if path.is_dir() else 0))
    python = venv / "bin" / "python"
    probe = subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", str(python), "-c",
                            "import gwms.startd, twisted, classad2, OpenSSL"], capture_output=True, text=True,
                           cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert probe.returncode == 0, f"{python} does not work for {USER}: {probe.stderr}"
    _node_python = python
    return python
