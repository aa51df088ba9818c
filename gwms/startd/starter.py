"""The starter: one job in a fresh sandbox, from its input files to its output files.

An object inside the startd (not a process): it receives the input sandbox from the shadow,
starts the job through the identity-switch plugin, tracks its whole process tree
(``gwms.startd.process``), lists and serves the output sandbox, and removes the sandbox.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gwms import classads
from gwms.protocols.transfer import CHUNK, STDERR, STDOUT, TransferError, check_name, sha256_file

log = Logger()


def job_argv(job: classads.ClassAd, sandbox: Path, transferred: set[str]) -> list[str]:
    from gwms.submit import split_arguments

    cmd = str(job.get("Cmd", ""))
    if not cmd:
        raise TransferError("the job has no Cmd")
    name = os.path.basename(cmd)
    executable = str(sandbox / name) if name in transferred else cmd
    return [executable, *split_arguments(str(job.get("Arguments", "")))]


def job_environment(job: classads.ClassAd, sandbox: Path, slot_name: str) -> dict[str, str]:
    from gwms.submit import parse_environment

    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(sandbox), "TMPDIR": str(sandbox)}
    env.update(parse_environment(str(job.get("Environment", ""))))
    env["_CONDOR_SCRATCH_DIR"] = str(sandbox)
    env["_CONDOR_SLOT"] = slot_name
    env["_CONDOR_JOB_AD"] = str(sandbox / ".job.ad")
    return env


def wanted_streams(job: classads.ClassAd) -> set[str]:
    """Which of stdout and stderr the job wants back. One it does not want (HTCondor's default
    of /dev/null) goes to /dev/null on the worker too: no file to create, hash and remove."""
    wanted = set()
    for stream, attr in ((STDOUT, "Out"), (STDERR, "Err")):
        if str(job.get(attr, "/dev/null") or "/dev/null") != "/dev/null":
            wanted.add(stream)
    return wanted


class Starter:
    def __init__(self, reactor: Any, switch: Any, execute_dir: Path, slot_name: str, job: classads.ClassAd,
                 process_factory: Any = None) -> None:
        self.reactor = reactor
        self.process_factory = process_factory
        self.switch = switch
        self.slot_name = slot_name
        self.job = job
        self.sandbox = execute_dir / f"dir_{os.getpid()}_{secrets.token_hex(6)}"
        self.sandbox.mkdir(mode=0o700)
        self.identity = switch.prepare_sandbox(job, self.sandbox)
        self._incoming: dict[str, tuple[Any, Any, int]] = {}  # name -> (file, sha256 state, size so far)
        self.received: dict[str, str] = {}  # complete input files -> sha256
        self.process: Any = None
        self.result: Any = None
        self.output_listing: Any = None  # set by the startd once the job has ended
        self.started_at: float | None = None
        self.streams = wanted_streams(job)
        self.finished: defer.Deferred[Any] = defer.Deferred()
        (self.sandbox / ".job.ad").write_text(classads.format_old(job, sort=False))

    # -- input sandbox ------------------------------------------------------------------------
    def put(self, name: object, offset: int, data: bytes, final: bool, sha256: object, executable: bool) -> None:
        if self.process is not None:
            raise TransferError("the job has started: no more input files")
        name = check_name(name)
        if name in self.received:
            raise TransferError(f"{name} was already received")
        entry = self._incoming.get(name)
        if entry is None:
            if offset != 0:
                raise TransferError(f"{name}: first chunk must start at offset 0, not {offset}")
            mode = 0o700 if executable else 0o600
            fd = os.open(self.sandbox / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            entry = (os.fdopen(fd, "wb"), hashlib.sha256(), 0)
        f, digest, size = entry
        if offset != size:
            raise TransferError(f"{name}: chunk at offset {offset}, expected {size}")
        f.write(data)
        digest.update(data)
        self._incoming[name] = (f, digest, size + len(data))
        if final:
            f.close()
            del self._incoming[name]
            if digest.hexdigest() != sha256:
                (self.sandbox / name).unlink(missing_ok=True)
                raise TransferError(f"{name}: SHA-256 mismatch (expected {sha256}, got {digest.hexdigest()})")
            self.received[name] = digest.hexdigest()

    # -- the job -------------------------------------------------------------------------------
    def start(self) -> None:
        from gwms.startd.process import JobProcess

        factory = self.process_factory or JobProcess
        if self._incoming:
            raise TransferError(f"input files not complete: {', '.join(sorted(self._incoming))}")
        argv = job_argv(self.job, self.sandbox, set(self.received))
        env = job_environment(self.job, self.sandbox, self.slot_name)
        stdin_name = os.path.basename(str(self.job.get("In", "/dev/null")))
        stdin = self.sandbox / stdin_name if stdin_name in self.received else None
        marker = secrets.token_hex(16)
        self.started_at = time.time()
        stdout, stderr = (self.sandbox / s if s in self.streams else Path(os.devnull) for s in (STDOUT, STDERR))
        self.process = factory(self.reactor, self.switch, self.job, argv, env, self.sandbox, stdin,
                               stdout, stderr, marker)
        self.process.start()
        self.process.finished.addBoth(self._ended)

    def _ended(self, result: Any) -> None:
        if isinstance(result, Failure):
            log.failure("job process tracking failed", result)
        self.result = result
        self.finished.callback(result)

    @property
    def running(self) -> bool:
        return self.process is not None and self.result is None

    def kill(self, grace: float) -> defer.Deferred[Any]:
        if self.process is None or self.result is not None:
            return defer.succeed(self.result)
        return self.process.kill(grace)

    # -- output sandbox ------------------------------------------------------------------------
    def outputs(self) -> list[dict[str, Any]]:
        """What goes back: stdout and stderr (if wanted), and TransferOutput's files (or, without it, every
        file the job created or changed at the top of the sandbox, as HTCondor does)."""
        names: list[str] = [s for s in (STDOUT, STDERR) if s in self.streams]
        listed = str(self.job.get("TransferOutput", "") or "")
        wanted = [n.strip() for n in listed.split(",") if n.strip()]
        if wanted:
            names += [os.path.basename(n) for n in wanted]
        else:
            since = self.started_at or 0
            for entry in sorted(os.scandir(self.sandbox), key=lambda e: e.name):
                if entry.name in (STDOUT, STDERR) or entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name in self.received and entry.stat().st_mtime < since:
                    continue
                names.append(entry.name)
        items = []
        for name in dict.fromkeys(names):
            path = self.sandbox / name
            if path.is_file() and not path.is_symlink():
                items.append({"Name": name, "Size": path.stat().st_size, "Sha256": sha256_file(path), "Missing": False})
            else:
                items.append({"Name": name, "Size": 0, "Sha256": "", "Missing": True})
        return items

    def read(self, name: object, offset: int, length: int) -> tuple[bytes, bool]:
        name = check_name(name)
        path = self.sandbox / name
        if path.is_symlink() or not path.is_file():
            raise TransferError(f"no output file {name}")
        length = max(0, min(length, CHUNK))
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
            return data, f.tell() >= os.fstat(f.fileno()).st_size

    def close(self) -> None:
        """Close input files still being received (the startd then removes the sandbox)."""
        for f, _digest, _size in self._incoming.values():
            f.close()
        self._incoming.clear()
