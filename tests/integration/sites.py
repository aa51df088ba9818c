"""The real site programs the site tests run against (Slurm with munge, sshd, Squid): installed
with apt-get when missing (CI runs as root), started in a temporary directory, stopped by pid.
Recipes measured on these machines: ../shared/SITES.md."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------
# Squid (SITES.md): a caching HTTP proxy on 127.0.0.1, everything in a directory of its own.

SQUID_CONF = """\
http_port 127.0.0.1:{port}
visible_hostname test-squid
pid_filename {dir}/squid.pid
cache_effective_user proxy
cache_dir ufs {dir}/cache 100 16 256
cache_mem {cache_mem} MB
access_log stdio:{dir}/access.log squid
cache_log {dir}/cache.log
cache_store_log none
netdb_filename none
pinger_enable off
coredump_dir {dir}
logfile_rotate 0
shutdown_lifetime 1 seconds
http_access allow localhost
http_access deny all
refresh_pattern . 0 20% 4320
"""


@dataclass(frozen=True)
class SquidRequest:
    """One line of Squid's native access.log."""

    result: str  # TCP_MISS, TCP_HIT (from the disk cache), TCP_MEM_HIT, TCP_REFRESH_UNMODIFIED, ...
    status: int
    method: str
    url: str
    hierarchy: str  # HIER_DIRECT/<origin> when Squid went to the origin, HIER_NONE/- when it did not


class Squid:
    """A running Squid: ``url`` to use as http_proxy, its access.log and its disk cache."""

    def __init__(self, directory: Path, port: int, process: subprocess.Popen[bytes]) -> None:
        self.dir = directory
        self.url = f"http://127.0.0.1:{port}"
        self.process = process
        self.access_log = directory / "access.log"
        self.cache_log = directory / "cache.log"
        self.cache_dir = directory / "cache"

    def requests(self) -> list[SquidRequest]:
        """What access.log holds so far (a line is written when its reply is complete)."""
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text().splitlines():
            # time elapsed client result/status bytes method URL user hierarchy/peer type
            fields = line.split()
            result, _, status = fields[3].partition("/")
            out.append(SquidRequest(result, int(status), fields[5], fields[6], fields[8]))
        return out

    def swap_files_ending_with(self, body: bytes) -> list[Path]:
        """The cache_dir's swap files (metadata, reply headers, then the body) whose body is ``body``."""
        return [p for p in sorted(self.cache_dir.glob("*/*/*"))
                if p.is_file() and p.stat().st_size > len(body) and p.read_bytes().endswith(body)]

    def stop(self) -> None:
        """TERM by pid, then KILL if it does not go (Squid takes about 2 s to shut down)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _listening_on(port: int) -> bool:
    """Something listens on 127.0.0.1:port (read from /proc, so no connection shows in a log)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(fields[1] == wanted and fields[3] == "0A" for fields in map(str.split, table))


@contextmanager
def running_squid(memory_cache: bool = True) -> Iterator[Squid]:
    """A Squid on a free port of 127.0.0.1 (installed if missing) with a 100 MB ufs disk cache,
    and a 16 MB memory cache unless ``memory_cache`` is false (then every hit is read from the
    swap files, TCP_HIT). Stopped by pid on exit, whatever happened; its directory is removed,
    unless the block failed (then it stays for its logs)."""
    import tempfile

    from gwms.cli.demo import free_port
    from gwms.testing.polling import wait_until

    ensure_programs({"squid": "squid"})
    # Not under pytest's tmp_path: Squid drops to the proxy user, who cannot enter root's 0700 dirs.
    directory = Path(tempfile.mkdtemp(prefix="gwms-squid-"))
    process: subprocess.Popen[bytes] | None = None
    squid: Squid | None = None
    failed = True
    try:
        directory.chmod(0o755)
        port = free_port()
        conf = directory / "squid.conf"
        conf.write_text(SQUID_CONF.format(port=port, dir=directory, cache_mem=16 if memory_cache else 0))
        subprocess.run(["chown", "-R", "proxy:proxy", str(directory)], check=True)
        made = subprocess.run(["squid", "-N", "-z", "-f", str(conf)], check=False, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        assert made.returncode == 0, f"squid -z failed:\n{made.stderr}"
        process = subprocess.Popen(["squid", "-N", "-f", str(conf)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        squid = Squid(directory, port, process)

        def accepting() -> bool:
            log = squid.cache_log.read_text(errors="replace") if squid.cache_log.exists() else ""
            if process.poll() is not None:
                raise AssertionError(f"squid exited with {process.returncode}:\n{log[-3000:]}")
            # Squid says "Accepting" a moment before it calls listen(): look for the socket itself.
            return "Accepting HTTP Socket connections at" in log and _listening_on(port)

        wait_until(accepting, 20, f"squid to listen on 127.0.0.1:{port}")
        yield squid
        failed = False
    finally:
        if squid is not None:
            squid.stop()
        elif process is not None:
            process.kill()
            process.wait()
        if not failed:
            shutil.rmtree(directory, ignore_errors=True)
