"""The real site programs the site tests run against (Slurm with munge, sshd, Squid): installed
with apt-get when missing (CI runs as root), started in a temporary directory, stopped by pid.
Recipes measured on these machines: ../shared/SITES.md."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_apt_updated = False


def ensure_programs(programs: dict[str, str]) -> None:
    """Make sure each program (name or absolute path) is there, installing its Debian package
    ({program: package}) when it is not; skip the test, saying why, when that cannot be done."""

    def missing() -> list[str]:
        return [p for p in programs if not (Path(p).exists() if p.startswith("/") else shutil.which(p))]

    if not missing():
        return
    packages = sorted({programs[p] for p in missing()})
    if os.geteuid() != 0:
        pytest.skip(f"{', '.join(missing())} missing and installing {' '.join(packages)} needs root")
    if shutil.which("apt-get") is None:
        pytest.skip(f"{', '.join(missing())} missing and there is no apt-get to install {' '.join(packages)}")
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(2):
        if attempt or not _apt_updated:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            _apt_updated = True
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and not missing():
            return
    pytest.skip(f"cannot install {' '.join(packages)}: {(done.stderr or done.stdout).strip()[-500:]}")


def stop_pid_file(pid_file: Path, timeout: float = 10) -> None:
    """Stop the daemon whose pid ``pid_file`` holds (TERM, then KILL) and wait for it to go."""
    from gwms.testing.polling import wait_until

    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie child of ours counts as gone once reaped.
        try:
            return os.waitpid(pid, os.WNOHANG)[0] == pid
        except ChildProcessError:
            return False

    try:
        wait_until(gone, timeout, f"pid {pid} ({pid_file.name}) to exit")
    except AssertionError:
        os.kill(pid, 9)
