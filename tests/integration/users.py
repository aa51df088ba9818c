"""Real UNIX users for integration tests that run as root: create them, and run the gwms command
line as one of them (``runuser``), against a schedd's UNIX socket (fs authentication). The
``shared`` fixture (conftest) gives them a directory they can all reach."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

USERS = ("gwms-alice", "gwms-bob")

# For a module's pytestmark: these tests need root (to create users and to run daemons that
# act as them) and the tools to create and become users.
needs_root_and_users = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"),
    reason="needs root with useradd and runuser to create test users")


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
        return pwd.getpwnam(name)


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


def as_user(user: str, *args: str, socket: Path, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``gwms ARGS...`` run as ``user`` in ``cwd``, talking to the schedd at ``socket``."""
    python, paths = user_python()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(paths),
           "GWMS_SCHEDD": f"unix:{socket}", "HOME": str(cwd)}
    return subprocess.run(["runuser", "-u", user, "--", python, "-m", "gwms", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)
