"""The ``local`` grid: each glidein runs glidein_startup.sh as a local process in a scratch
directory of its own, under ``<factory work_dir>/local/<entry>/<glidein id>/``.

Everything the plugin knows about a glidein is in that directory, so a restarted factory finds
its glideins again: ``pid`` (the wrapper shell, the leader of the glidein's session),
``exit_code`` (written by the wrapper when glidein_startup.sh ends), ``stdout``/``stderr``
(the glidein's output, as a batch system would keep it), ``credential`` (mode 0600) and
``remove_requested``. The grid id is the glidein id.

A local glidein is ``queued`` until its startd has started (its address file exists: it is
about to join the pool) and ``running`` from then on, so that the frontends' "idle glideins"
mean what they mean at a batch site: glideins that are not yet taking jobs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from gwms.config import HostConfig
from gwms.factory.grid import FINISHED, QUEUED, RUNNING, GlideinSubmission, GridStatus
from gwms.interfaces import IGridSubmitter

log = Logger()

# wait_child PID (POSIX sh, for the wrappers and job scripts that pass signals on to a child):
# waits for the child and leaves its exit status in $rc. A trapped signal interrupts wait
# (status 128+n) though the child lives on: wait again. If the shell reaped the child
# meanwhile, one more wait still gives its real status.
WAIT_CHILD = r'''
wait_child() {
    while :; do
        wait "$1"; rc=$?
        if kill -0 "$1" 2>/dev/null; then continue; fi
        wait "$1" 2>/dev/null; again=$?
        [ "$again" -eq 127 ] || rc=$again
        return
    done
}
'''

# The wrapper: runs glidein_startup.sh in the background, records its own pid (it leads the
# glidein's session), forwards TERM to it, and records the exit code.
WRAPPER = WAIT_CHILD + r'''
dir=$1; shift
sh "$@" > "$dir/stdout" 2> "$dir/stderr" < /dev/null &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
echo "$$" > "$dir/pid.tmp" && mv "$dir/pid.tmp" "$dir/pid"
wait_child "$child"
echo "$rc" > "$dir/exit_code.tmp" && mv "$dir/exit_code.tmp" "$dir/exit_code"
'''

# After a removal, the glidein gets this long to stop its startd (which gives its jobs their
# grace and tells their schedds) before its whole session is killed.
REMOVE_GRACE = 60.0


@implementer(IGridSubmitter)
class LocalGridSubmitter:
    name = "local"

    def __init__(self, reactor: Any, work_dir: Path, startup_script: Path) -> None:
        self.reactor = reactor
        self.work_dir = Path(work_dir)
        self.startup_script = Path(startup_script)
        # The glideins this process started (reaped as they end; a benchmark watches them).
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def from_config(cls, config: HostConfig, reactor: Any) -> "LocalGridSubmitter":
        from gwms.glidein.files import startup_script

        return cls(reactor, config.section("factory")["work_dir"] / "local", startup_script())

    def _dir(self, entry: Mapping[str, Any], grid_id: str) -> Path:
        if "/" in grid_id or grid_id.startswith("."):
            raise ValueError(f"bad glidein id {grid_id!r}")
        return self.work_dir / str(entry["name"]) / grid_id

    def submit(self, entry: Mapping[str, Any], glideins: Sequence[GlideinSubmission]) -> defer.Deferred[dict[str, str]]:
        submitted: dict[str, str] = {}
        for g in glideins:
            d = self._dir(entry, g.glidein_id)
            try:
                d.mkdir(parents=True)
            except FileExistsError:
                submitted[g.glidein_id] = g.glidein_id  # already there: a retry after a restart
                continue
            except OSError as e:
                log.warn("local glidein {id}: cannot make its directory: {error}", id=g.glidein_id, error=str(e))
                continue
            args = list(g.arguments)
            try:
                if g.credential is not None:
                    staged = d / "credential"
                    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        out.write(Path(g.credential).read_bytes())
                    args += ["-credential", str(staged)]
                if "-python" not in args:
                    args += ["-python", sys.executable]  # this host's Python has gwms
                args += ["-workdir", str(d)]
                child = subprocess.Popen(["/bin/sh", "-c", WRAPPER, "gwms-local-glidein", str(d),
                                          str(self.startup_script), *args],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            except OSError as e:
                log.warn("local glidein {id}: cannot start: {error}", id=g.glidein_id, error=str(e))
                shutil.rmtree(d, ignore_errors=True)
                continue
            self.children[g.glidein_id] = child
            submitted[g.glidein_id] = g.glidein_id
        return defer.succeed(submitted)

    def _reap(self) -> None:
        for gid, child in list(self.children.items()):
            if child.poll() is not None:
                del self.children[gid]

    def query(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[dict[str, GridStatus]]:
        self._reap()
        out: dict[str, GridStatus] = {}
        for grid_id in grid_ids:
            status = self._status(self._dir(entry, grid_id))
            if status is not None:
                out[grid_id] = status
        return defer.succeed(out)

    def _status(self, d: Path) -> GridStatus | None:
        if not d.is_dir():
            return None
        try:
            return GridStatus(FINISHED, int((d / "exit_code").read_text().strip()), _last_line(d / "stderr"))
        except (FileNotFoundError, ValueError):
            pass
        pid = _read_pid(d)
        if pid is None:
            return GridStatus(QUEUED)  # the wrapper has not written its pid yet
        if not _alive(pid, d):
            return GridStatus(FINISHED, None, "the glidein's wrapper ended without an exit code")
        if (d / "remove_requested").exists():
            self._escalate(d, pid)
        started = any(p.is_file() for p in d.glob("glide_*/startd.address"))
        return GridStatus(RUNNING if started else QUEUED)

    def remove(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[None]:
        for grid_id in grid_ids:
            d = self._dir(entry, grid_id)
            pid = _read_pid(d) if d.is_dir() else None
            if pid is None or not _alive(pid, d):
                continue
            marker = d / "remove_requested"
            if not marker.exists():
                marker.write_text(f"{time.time()}\n")
            try:
                os.kill(pid, signal.SIGTERM)  # the wrapper forwards it to glidein_startup.sh
            except ProcessLookupError:
                pass
        return defer.succeed(None)

    def _escalate(self, d: Path, pid: int) -> None:
        try:
            asked = float((d / "remove_requested").read_text())
        except (OSError, ValueError):
            return
        if time.time() - asked > REMOVE_GRACE:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def forget(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[None]:
        for grid_id in grid_ids:
            shutil.rmtree(self._dir(entry, grid_id), ignore_errors=True)
        return defer.succeed(None)


def _read_pid(d: Path) -> int | None:
    try:
        return int((d / "pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int, d: Path) -> bool:
    """The pid is still this glidein's wrapper (not a recycled pid): its command line names
    the glidein's directory."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return os.fsencode(str(d)) in cmdline


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""
