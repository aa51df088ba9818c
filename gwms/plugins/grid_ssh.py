"""The ``ssh`` grid (BOSCO's way): glideins go over SSH to a remote host, and from there to its
batch system (``remote_batch = "slurm"``) or straight into processes of that host (``fork``).

One OpenSSH connection per remote: the plugin keeps a control master (``ssh -M -N``) as a child
of the factory and runs every command through it (``ssh -S <socket> -o ControlMaster=no``), so
submitting a hundred glideins or querying all of them costs no new logins. A master that dies
is started again on the next command. Host keys are checked strictly.

Each glidein's job script (``gwms.plugins.glidein_job``: glidein_startup.sh and the credential,
mode 0600 under umask 077) is staged into the remote work area, ``<remote_dir>/<entry>/``, in
the same round trip that submits it:

- ``slurm``: the script is ``<glidein id>.sh``; sbatch, squeue, sacct and scancel run remotely
  with the same command lines as the local ``slurm`` grid (``gwms.plugins.grid_slurm``). The grid
  id is ``<job id>:<glidein id>``.
- ``fork``: the glidein runs in ``<glidein id>/`` under a wrapper that records its pid and exit
  code there (the ``local`` grid's, run remotely); one remote shell script reports on all of an
  entry's glideins per cycle. The grid id is the glidein id.

Entry keys: ``contact`` (user@host or user@host:port), ``ssh_key``, ``ssh_known_hosts``,
``ssh_options``, ``remote_batch``, ``remote_dir``, and the slurm keys for remote Slurm.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger
from zope.interface import implementer

from gwms.config import ConfigError
from gwms.factory.grid import FINISHED, QUEUED, RUNNING, GlideinSubmission, GridStatus
from gwms.interfaces import IGridSubmitter
from gwms.plugins.commands import DEFAULT_TIMEOUT, CommandError, Runner, checked, reactor_runner
from gwms.plugins.glidein_job import job_script
from gwms.plugins.grid_local import REMOVE_GRACE, WRAPPER
from gwms.plugins.grid_slurm import SlurmBatch, check_entry, entries_of

log = Logger()

CONTACT = re.compile(r"^(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])"
                     r"(?::(?P<port>[0-9]{1,5}))?\Z")
REMOTE_BATCHES = ("fork", "slurm")
MASTER_START_TIMEOUT = 30.0

# Stage stdin as file $2 (mode 0600, directory $1 made 0700), then run the rest of the arguments.
STAGE_AND_RUN = 'umask 077 && mkdir -p -- "$1" && cat > "$2.tmp" && mv -f -- "$2.tmp" "$2" && shift 2 && exec "$@"'

# fork: start the job script $1/job.sh under the wrapper, in a session of its own, detached from
# the SSH channel (which then closes at once).
FORK_START = ('cd -- "$1" || exit 1; '
              'if command -v setsid >/dev/null 2>&1; then s=setsid; else s=; fi; '
              '$s sh -c "$2" gwms-fork-glidein "$1" "$1/job.sh" </dev/null >/dev/null 2>&1 & '
              'echo started')

# fork: one line "<id>|<state>|<exit code>" per glidein directory $1/<id> still there. A removal
# that the glidein has not obeyed after the grace ($2 seconds) is finished with a KILL of its
# whole session.
FORK_STATUS = r'''
base=$1 grace=$2; shift 2
now=$(date +%s)
for id in "$@"; do
    d=$base/$id
    [ -d "$d" ] || continue
    if [ -f "$d/exit_code" ]; then printf '%s|finished|%s\n' "$id" "$(cat "$d/exit_code")"; continue; fi
    if [ ! -f "$d/pid" ]; then printf '%s|queued|\n' "$id"; continue; fi
    pid=$(cat "$d/pid")
    if ! kill -0 "$pid" 2>/dev/null; then printf '%s|lost|\n' "$id"; continue; fi
    if [ -f "$d/remove_requested" ] && [ $((now - $(cat "$d/remove_requested"))) -gt "$grace" ]; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    fi
    if ls "$d"/gwms_glidein_*/glide_*/startd.address >/dev/null 2>&1; then
        printf '%s|running|\n' "$id"
    else
        printf '%s|queued|\n' "$id"
    fi
done
'''

FORK_REMOVE = r'''
base=$1; shift
for id in "$@"; do
    d=$base/$id
    [ -f "$d/pid" ] || continue
    [ -f "$d/remove_requested" ] || date +%s > "$d/remove_requested"
    kill -TERM "$(cat "$d/pid")" 2>/dev/null
done
true
'''


class _MasterProtocol(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.stderr = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.running = True

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-4000:]

    def processEnded(self, reason: Any) -> None:
        self.running = False
        self.ended.callback(None)


class SSHRemote:
    """``user@host[:port]`` through one OpenSSH control master; a :data:`Runner` for commands
    on that host (``run(argv, timeout, stdin)``: argv is quoted for the remote shell)."""

    def __init__(self, reactor: Any, contact: str, key: Path | None = None, known_hosts: Path | None = None,
                 options: Sequence[str] = (), control_dir: Path | None = None, runner: Runner | None = None,
                 ssh: str = "ssh") -> None:
        m = CONTACT.match(contact)
        if m is None:
            raise ValueError(f"ssh contact must be user@host or user@host:port, got {contact!r}")
        self.reactor = reactor
        self.contact = contact
        self.destination = f"{m['user']}@{m['host'].strip('[]')}"
        self.port = int(m["port"] or 22)
        self.key = key
        self.known_hosts = known_hosts
        self.options = list(options)
        self.local: Runner = runner if runner is not None else reactor_runner(reactor)
        self.ssh = ssh
        # Keyed like SSHGridSubmitter.remotes: two remotes sharing a socket would unlink each
        # other's when their masters (re)start.
        self.control_path = str(_control_dir(control_dir) / hashlib.sha256(
            repr((contact, str(key), str(known_hosts), tuple(self.options))).encode()).hexdigest()[:16])
        self._master: Any = None  # (process transport, _MasterProtocol)
        self._adopted = False  # using a master this process did not start (see _ensure_master)
        self._lock = defer.DeferredLock()
        self.home: str | None = None

    def base_argv(self) -> list[str]:
        argv = [self.ssh, "-p", str(self.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ControlPath={self.control_path}", "-o", "ServerAliveInterval=30"]
        if self.key is not None:
            argv += ["-i", str(self.key), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        for option in self.options:
            argv += ["-o", option]
        return argv

    def command_argv(self, argv: Sequence[str]) -> list[str]:
        """The local ssh command running ``argv`` on the remote through the master."""
        return [*self.base_argv(), "-o", "ControlMaster=no", self.destination, "--", shlex.join(argv)]

    def master_argv(self) -> list[str]:
        # In a session of its own: a TERM to the factory's process group (Ctrl-C, a service
        # manager) must not cut the connection the factory still needs to remove its glideins.
        setsid = shutil.which("setsid")
        return [*([setsid] if setsid else []), *self.base_argv(), "-M", "-N", "-o", "ControlPersist=no",
                self.destination]

    def master_running(self) -> bool:
        if self._master is not None:
            return bool(self._master[1].running)
        return self._adopted

    def check_argv(self) -> list[str]:
        return [*self.base_argv(), "-O", "check", self.destination]

    def ensure_master(self) -> defer.Deferred[None]:
        """Start the control master unless it runs; fires once commands can go through it."""
        return self._lock.run(self._ensure_master)

    @defer.inlineCallbacks
    def _ensure_master(self) -> Any:
        if not self.master_running() and self._master is None and os.path.exists(self.control_path):
            # A master an earlier factory process left (killed with -9, say, while its master
            # ran in a session of its own): use it rather than log in again and orphan it.
            result = yield self.local(self.check_argv(), 10.0, None)
            if result.exit_code == 0:
                self._adopted = True
                log.info("ssh: using the running connection to {contact}", contact=self.contact)
        if not self.master_running():
            yield self._start_master()
        if self.home is None:  # also after a `pwd` that failed while the master lived on
            result = yield checked(self.local, self.command_argv(["pwd"]), DEFAULT_TIMEOUT)
            self.home = result.stdout.strip()

    @defer.inlineCallbacks
    def _start_master(self) -> Any:
        try:
            os.unlink(self.control_path)  # a dead master's socket
        except FileNotFoundError:
            pass
        proto = _MasterProtocol()
        argv = self.master_argv()
        transport = self.reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ),
                                              childFDs={0: "w", 1: "r", 2: "r"})
        self._master = (transport, proto)
        deadline = self.reactor.seconds() + MASTER_START_TIMEOUT
        self._adopted = False
        check = self.check_argv()
        while True:
            if not proto.running:
                raise CommandError(argv, None, f"the SSH connection to {self.contact} ended: "
                                               f"{proto.stderr.decode(errors='replace')}")
            if os.path.exists(self.control_path):
                result = yield self.local(check, 10.0, None)
                if result.exit_code == 0:
                    break
            if self.reactor.seconds() > deadline:
                self._stop_master()
                raise CommandError(argv, None, f"no SSH connection to {self.contact} after "
                                               f"{MASTER_START_TIMEOUT:g}s: {proto.stderr.decode(errors='replace')}")
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        log.info("ssh: connected to {contact} (control master pid {pid})", contact=self.contact,
                 pid=getattr(transport, "pid", None))

    @defer.inlineCallbacks
    def run(self, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT, stdin: bytes | None = None) -> Any:
        yield self.ensure_master()
        result = yield self.local(self.command_argv(argv), timeout, stdin)
        if result.exit_code == 255 and self._adopted and not os.path.exists(self.control_path):
            self._adopted = False  # the adopted master has gone: the next command starts one
        if result.exit_code == 255 and not self.master_running():
            # ssh's own failure (the connection dropped): say so rather than blame the command.
            raise CommandError(argv, None, f"SSH connection to {self.contact} lost: {result.stderr.strip()}")
        return result

    def absolute(self, path: str) -> str:
        """A remote path relative to the remote home made absolute (after ensure_master)."""
        if path.startswith("/"):
            return path.rstrip("/") or "/"
        return f"{self.home}/{path}".rstrip("/")

    def _stop_master(self) -> None:
        if self._master is not None:
            transport, proto = self._master
            if proto.running:
                try:
                    transport.signalProcess("TERM")
                except error.ProcessExitedAlready:
                    pass

    def stop(self) -> defer.Deferred[None]:
        """Close the connection (the factory is stopping)."""
        if self._adopted:
            self._adopted = False
            return self.local([*self.base_argv(), "-O", "exit", self.destination], 10.0, None).addBoth(
                lambda _: None)
        if not self.master_running():
            return defer.succeed(None)
        ended = self._master[1].ended
        self._stop_master()
        return ended


def _control_dir(wanted: Path | None) -> Path:
    """A private directory for control sockets, short enough for a UNIX socket path (108
    bytes, of which ssh takes 34 for the name and a temporary suffix): the factory's own when it
    fits, else one under /tmp named after it, so that a restarted factory finds its masters."""
    if wanted is not None and len(str(Path(wanted).absolute())) <= 64:
        wanted.mkdir(mode=0o700, parents=True, exist_ok=True)
        return wanted
    tag = hashlib.sha256(str(Path(wanted).absolute() if wanted is not None else "").encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"gwms-ssh-{os.getuid()}-{tag}"
    try:
        short.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(short)
    # Only a directory of ours that nobody else can enter (not a symlink someone planted).
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077:
        return short
    log.warn("ssh: {dir} is not a private directory of ours: using a new one", dir=str(short))
    return Path(tempfile.mkdtemp(prefix="gwms-ssh-"))


def parse_fork_status(output: str) -> dict[str, GridStatus]:
    out: dict[str, GridStatus] = {}
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3 or not parts[0]:
            if line.strip():
                log.warn("ssh fork status: odd line skipped: {line!r}", line=line[:300])
            continue
        glidein_id, state, code = parts
        if state == "finished":
            out[glidein_id] = GridStatus(FINISHED, int(code) if code.isascii() and code.isdigit() else None, "exited")
        elif state == "lost":
            out[glidein_id] = GridStatus(FINISHED, None, "the glidein's wrapper ended without an exit code")
        elif state == "running":
            out[glidein_id] = GridStatus(RUNNING)
        elif state == "queued":
            out[glidein_id] = GridStatus(QUEUED)
        else:
            log.warn("ssh fork status: unknown state {state!r} for {id}", state=state, id=glidein_id)
    return out


def check_ssh_entry(source: str, name: str, entry: Mapping[str, Any]) -> None:
    where = f"{source}: [factory.entry.{name}]"
    m = CONTACT.match(str(entry.get("contact") or ""))
    if m is None or (m["port"] is not None and not 1 <= int(m["port"]) <= 65535):
        raise ConfigError(f"{where} contact must be user@host or user@host:port (port 1-65535) for the ssh "
                          f"grid, got {entry.get('contact')!r}")
    if entry.get("remote_batch", "fork") not in REMOTE_BATCHES:
        raise ConfigError(f"{where} remote_batch must be one of {', '.join(REMOTE_BATCHES)}, "
                          f"got {entry.get('remote_batch')!r}")
    remote_dir = str(entry.get("remote_dir") or "")
    if not remote_dir or "\n" in remote_dir or ".." in remote_dir.split("/"):
        raise ConfigError(f"{where} remote_dir {remote_dir!r} is not a usable directory")
    check_entry(source, name, entry)


@implementer(IGridSubmitter)
class SSHGridSubmitter:
    name = "ssh"

    def __init__(self, reactor: Any, startup_script: Path, control_dir: Path | None = None,
                 runner: Runner | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.reactor = reactor
        self.startup_script = Path(startup_script)
        self.control_dir = control_dir
        self._socket_dir: Path | None = None  # control_dir, or one under /tmp when that is too long
        self.runner = runner  # the local runner (ssh itself); tests give a fake one
        self.timeout = timeout
        self.remotes: dict[tuple[str, str | None, str | None, tuple[str, ...]], SSHRemote] = {}
        self._batches: dict[int, SlurmBatch] = {}

    @classmethod
    def from_config(cls, config: Any, reactor: Any, runner: Runner | None = None) -> "SSHGridSubmitter":
        from gwms.glidein.files import startup_script

        for name, entry in entries_of(config, cls.name).items():
            check_ssh_entry(config.source, name, entry)
        return cls(reactor, startup_script(), config.section("factory")["work_dir"] / "ssh", runner)

    # -- connections ---------------------------------------------------------------------------
    def remote(self, entry: Mapping[str, Any]) -> SSHRemote:
        """The entry's remote: one per (contact, key, known_hosts, options), shared by entries."""
        key = entry.get("ssh_key")
        known = entry.get("ssh_known_hosts")
        options = tuple(str(o) for o in entry.get("ssh_options") or ())
        ident = (str(entry["contact"]), str(key) if key else None, str(known) if known else None, options)
        if ident not in self.remotes:
            if self._socket_dir is None:  # one directory for all the remotes' sockets
                self._socket_dir = _control_dir(self.control_dir)
            self.remotes[ident] = SSHRemote(self.reactor, ident[0], Path(key) if key else None,
                                            Path(known) if known else None, options, self._socket_dir, self.runner)
        return self.remotes[ident]

    def _batch(self, remote: SSHRemote) -> SlurmBatch:
        if id(remote) not in self._batches:
            self._batches[id(remote)] = SlurmBatch(remote.run, self.timeout, self.reactor)
        return self._batches[id(remote)]

    @defer.inlineCallbacks
    def _area(self, entry: Mapping[str, Any]) -> Any:
        """(remote, the entry's absolute remote work area)."""
        name = str(entry["name"])
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad entry name {name!r}")
        remote = self.remote(entry)
        yield remote.ensure_master()
        return remote, f"{remote.absolute(str(entry.get('remote_dir') or '.gwms'))}/{name}"

    def stop(self) -> defer.Deferred[Any]:
        """Close every connection; remove the control directory if it was made under /tmp."""

        def tidy(result: Any) -> Any:
            if self._socket_dir is not None and self._socket_dir != self.control_dir:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
            return result

        return defer.gatherResults([r.stop() for r in self.remotes.values()]).addBoth(tidy)

    # -- IGridSubmitter ------------------------------------------------------------------------
    @defer.inlineCallbacks
    def submit(self, entry: Mapping[str, Any], glideins: Sequence[GlideinSubmission]) -> Any:
        try:
            remote, area = yield self._area(entry)
        except (CommandError, ValueError) as e:
            log.warn("ssh entry {entry}: cannot reach the remote: {error}", entry=entry.get("name"), error=str(e))
            return {}
        fork = entry.get("remote_batch", "fork") == "fork"
        startup = self.startup_script.read_bytes()
        submitted: dict[str, str] = {}
        for g in glideins:
            if "/" in g.glidein_id or g.glidein_id.startswith(".") or not g.glidein_id:
                log.warn("ssh: bad glidein id {id!r}", id=g.glidein_id)
                continue
            try:
                credential = Path(g.credential).read_bytes() if g.credential is not None else None
                if fork:
                    d = f"{area}/{g.glidein_id}"
                    script = job_script(g.glidein_id, startup, g.arguments, credential, shlex.quote(d))
                    argv = ["sh", "-c", STAGE_AND_RUN, "gwms-stage", d, f"{d}/job.sh",
                            "sh", "-c", FORK_START, "gwms-fork", d, WRAPPER]
                    result = yield checked(remote.run, argv, self.timeout, script.encode())
                    if result.stdout.strip() != "started":
                        raise CommandError(argv, result.exit_code, f"did not start: {result.stdout[:300]!r}")
                    submitted[g.glidein_id] = g.glidein_id
                else:
                    batch = self._batch(remote)
                    path = f"{area}/{g.glidein_id}.sh"
                    script = batch.script(entry, g, startup, credential, area)
                    sbatch = batch.sbatch_argv(entry, g.glidein_id, path, area)
                    job_id = yield batch.sbatch(["sh", "-c", STAGE_AND_RUN, "gwms-stage", area, path, *sbatch],
                                                script.encode(), job_name=f"gwms-{g.glidein_id}")
                    submitted[g.glidein_id] = f"{job_id}:{g.glidein_id}"
            except (CommandError, OSError, ValueError) as e:
                log.warn("ssh glidein {id} to {contact}: not submitted: {error}", id=g.glidein_id,
                         contact=remote.contact, error=str(e))
        return submitted

    @defer.inlineCallbacks
    def query(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> Any:
        ids = [str(i) for i in grid_ids]
        if not ids:
            return {}
        remote, area = yield self._area(entry)
        if entry.get("remote_batch", "fork") == "fork":
            result = yield checked(remote.run, ["sh", "-c", FORK_STATUS, "gwms-status", area,
                                                str(int(REMOVE_GRACE)), *ids], self.timeout)
            wanted = set(ids)
            return {k: v for k, v in parse_fork_status(result.stdout).items() if k in wanted}
        by_job = {grid_id.split(":", 1)[0]: grid_id for grid_id in ids}
        statuses = yield self._batch(remote).query(list(by_job))
        return {by_job[job]: status for job, status in statuses.items() if job in by_job}

    @defer.inlineCallbacks
    def remove(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> Any:
        ids = [str(i) for i in grid_ids]
        if not ids:
            return None
        remote, area = yield self._area(entry)
        if entry.get("remote_batch", "fork") == "fork":
            yield checked(remote.run, ["sh", "-c", FORK_REMOVE, "gwms-remove", area, *ids], self.timeout)
        else:
            yield self._batch(remote).remove([i.split(":", 1)[0] for i in ids])
        return None

    @defer.inlineCallbacks
    def forget(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> Any:
        ids = [str(i) for i in grid_ids]
        if not ids:
            return None
        remote, area = yield self._area(entry)
        if entry.get("remote_batch", "fork") == "fork":
            paths = [f"{area}/{i}" for i in ids if i and "/" not in i and not i.startswith(".")]
        else:
            paths = []
            for grid_id in ids:
                glidein_id = grid_id.split(":", 1)[-1]
                if "/" in glidein_id or glidein_id.startswith(".") or not glidein_id:
                    continue
                paths += [f"{area}/{glidein_id}{suffix}" for suffix in (".sh", ".out", ".err")]
                paths += [f"{area}/{glidein_id}.node{n}.{kind}" for n in range(int(entry.get("nodes", 1) or 1))
                          for kind in ("out", "err")]
        if paths:
            try:
                yield checked(remote.run, ["rm", "-rf", "--", *paths], self.timeout)
            except CommandError as e:
                log.warn("ssh: cannot clean up after {n} glideins at {contact}: {error}", n=len(ids),
                         contact=remote.contact, error=str(e))
        return None

