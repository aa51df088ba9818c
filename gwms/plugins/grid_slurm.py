"""The ``slurm`` grid: each glidein is one Slurm batch job, submitted with ``sbatch``, followed
with one ``squeue`` (and, for jobs Slurm has already purged, one ``sacct``) per entry per cycle,
removed with ``scancel``.

:class:`SlurmBatch` holds the command lines and the parsing of their output; it runs them
through a runner, so the same code drives a local Slurm (this module's
:class:`SlurmGridSubmitter`) and a remote one over SSH (``gwms.plugins.grid_ssh``).

The job script carries glidein_startup.sh and the credential (``gwms.plugins.glidein_job``): the
worker nodes need no file system shared with the factory. The plugin keeps a glidein's files
under ``<factory work_dir>/slurm/<entry>/``: ``<glidein id>.sh`` (the job script, mode 0600: it
holds the credential), ``<glidein id>.out``/``.err`` (the job's output, written there by Slurm:
the factory's log area), ``<glidein id>.jobid``. The grid id is Slurm's job id.

The job's ``--time`` is the entry's ``max_walltime`` in whole minutes (at least one), and the
glidein is told that limit (``-batch_time_limit``): it retires and ends before Slurm would kill
it, so its jobs go back to their schedds and it removes its files.

Entry keys: ``partition``, ``account``, ``qos``, ``slurm_options`` (more sbatch options),
``nodes`` (one glidein per node of a multi-node job, started with srun), ``worker_dir``.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from gwms.factory.grid import FINISHED, HELD, QUEUED, RUNNING, GlideinSubmission, GridStatus
from gwms.interfaces import IGridSubmitter
from gwms.plugins.commands import DEFAULT_TIMEOUT, CommandError, Runner, checked, reactor_runner
from gwms.plugins.glidein_job import job_script
from gwms.plugins.grid_local import REMOVE_GRACE

log = Logger()

# Slurm job states (squeue %T, sacct State) -> gwms grid states.
STATE_MAP: dict[str, str] = {
    "PENDING": QUEUED,
    "CONFIGURING": QUEUED,
    "REQUEUED": QUEUED,
    "REQUEUE_FED": QUEUED,
    "RESIZING": QUEUED,
    "RUNNING": RUNNING,
    "COMPLETING": RUNNING,
    "STAGE_OUT": RUNNING,
    "SIGNALING": RUNNING,
    "SUSPENDED": HELD,
    "STOPPED": HELD,
    "REQUEUE_HOLD": HELD,
    "SPECIAL_EXIT": HELD,
    "RESV_DEL_HOLD": HELD,
    "COMPLETED": FINISHED,
    "FAILED": FINISHED,
    "TIMEOUT": FINISHED,
    "CANCELLED": FINISHED,
    "NODE_FAIL": FINISHED,
    "PREEMPTED": FINISHED,
    "OUT_OF_MEMORY": FINISHED,
    "BOOT_FAIL": FINISHED,
    "DEADLINE": FINISHED,
    "REVOKED": FINISHED,
}

# A PENDING job with one of these reasons will never start by itself: it is held.
HELD_REASONS = ("JobHeldUser", "JobHeldAdmin", "held")

# What squeue says when none of the ids it was asked about is still known.
UNKNOWN_JOBS = "Invalid job id specified"
# What scancel says of a job already gone or not in the state it was asked to act on.
SCANCEL_BENIGN = ("Invalid job id specified", "already completing or completed", "Job/step already completing")
# What sacct says on a cluster without slurmdbd; `sacct -c` then reads the job completion log.
NO_ACCOUNTING = "accounting storage is disabled"


def parse_job_id(output: str) -> str | None:
    """The job id from ``sbatch --parsable`` ("12345" or "12345;cluster"), or None."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if len(lines) != 1:
        return None
    job_id = lines[0].split(";", 1)[0].strip()
    return job_id if job_id.isascii() and job_id.isdigit() else None


def map_state(state: str, reason: str = "", exit_code: int | None = None) -> GridStatus | None:
    """A Slurm (state, reason) as a GridStatus, or None for an unknown state. sacct writes
    "CANCELLED by 0": the first word is the state."""
    words = state.strip().upper().split()
    state = words[0] if words else ""
    reason = reason.strip()
    if reason in ("None", "(null)"):
        reason = ""
    grid_state = STATE_MAP.get(state)
    if grid_state is None:
        return None
    if grid_state == QUEUED and any(r.lower() in reason.lower() for r in HELD_REASONS):
        return GridStatus(HELD, None, f"{state}: {reason}")
    if grid_state == HELD:
        return GridStatus(HELD, None, f"{state}: {reason}" if reason else state)
    if grid_state == FINISHED:
        if exit_code is None and state == "COMPLETED":
            exit_code = 0  # Slurm says COMPLETED only for exit code 0
        return GridStatus(FINISHED, exit_code, state)
    return GridStatus(grid_state)


def _split(output: str, fields: int, what: str) -> list[list[str]]:
    rows = []
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.strip().split("|")]
        if len(parts) != fields or not parts[0]:
            log.warn("{what}: odd line skipped: {line!r}", what=what, line=line[:300])
            continue
        rows.append(parts)
    return rows


def parse_squeue(output: str) -> dict[str, GridStatus]:
    """Parse ``squeue --noheader --format=%i|%T|%r`` output; odd lines are logged and skipped."""
    out: dict[str, GridStatus] = {}
    for job_id, state, reason in _split(output, 3, "squeue"):
        status = map_state(state, reason)
        if status is None:
            log.warn("squeue: unknown state {state!r} for job {job}, skipped", state=state[:100], job=job_id[:100])
            continue
        out[job_id] = status
    return out


def parse_sacct(output: str) -> dict[str, GridStatus]:
    """Parse ``sacct --noheader --parsable2 --format=JobIDRaw,State,ExitCode`` output: one line
    per job and per step ("123.batch", skipped); ExitCode is "code:signal"."""
    out: dict[str, GridStatus] = {}
    for job_id, state, exit_code in _split(output, 3, "sacct"):
        if not (job_id.isascii() and job_id.isdigit()):
            continue  # a step, or an array/het job id gwms never submits
        code_text = exit_code.split(":", 1)[0]
        # isascii: int() refuses some characters isdigit() accepts ("²").
        status = map_state(state, "", int(code_text) if code_text.isascii() and code_text.isdigit() else None)
        if status is None:
            log.warn("sacct: unknown state {state!r} for job {job}, skipped", state=state[:100], job=job_id[:100])
            continue
        out[job_id] = status
    return out


def time_limit_minutes(entry: Mapping[str, Any]) -> int:
    """The job's --time: the entry's max_walltime in whole minutes, at least one."""
    return max(1, int(float(entry.get("max_walltime", 86400.0)) // 60))


def glidein_arguments(entry: Mapping[str, Any], g: GlideinSubmission) -> list[str]:
    """glidein_startup.sh's arguments for a Slurm job: the factory's, and the time limit."""
    return [*g.arguments, "-batch_time_limit", str(60 * time_limit_minutes(entry))]


class SlurmBatch:
    """sbatch, squeue, sacct and scancel through ``runner`` (local, or over SSH)."""

    def __init__(self, runner: Runner, timeout: float = DEFAULT_TIMEOUT, clock: Any = None) -> None:
        self.runner = runner
        self.timeout = timeout
        self.clock = clock
        self.removing: dict[str, float] = {}  # job id -> when it was asked to stop
        self.sacct_completion_log = False  # no slurmdbd: sacct -c reads the job completion log
        self.sacct_unavailable = False

    def sbatch_argv(self, entry: Mapping[str, Any], glidein_id: str, script: str, out_dir: str) -> list[str]:
        """The sbatch command for one glidein's job script; its output goes to ``out_dir``."""
        nodes = int(entry.get("nodes", 1) or 1)
        argv = ["sbatch", "--parsable", f"--job-name=gwms-{glidein_id}", f"--time={time_limit_minutes(entry)}",
                f"--output={out_dir}/{glidein_id}.out", f"--error={out_dir}/{glidein_id}.err"]
        if nodes > 1:
            argv.append(f"--nodes={nodes}")
        for key, option in (("partition", "--partition"), ("account", "--account"), ("qos", "--qos")):
            value = entry.get(key)
            if value:
                argv.append(f"{option}={value}")
        argv += [str(o) for o in entry.get("slurm_options") or ()]
        argv.append(script)
        return argv

    @staticmethod
    def script(entry: Mapping[str, Any], g: GlideinSubmission, startup: bytes, credential: bytes | None,
               out_dir: str) -> str:
        """The job script of glidein ``g`` (see gwms.plugins.glidein_job)."""
        nodes = int(entry.get("nodes", 1) or 1)
        worker_dir = entry.get("worker_dir")
        parent = shlex.quote(worker_dir) if worker_dir else '"${TMPDIR:-/tmp}"'
        node_output = (f"{out_dir}/{g.glidein_id}.node%n.out", f"{out_dir}/{g.glidein_id}.node%n.err")
        return job_script(g.glidein_id, startup, glidein_arguments(entry, g), credential, parent, nodes,
                          node_output if nodes > 1 else None)

    @defer.inlineCallbacks
    def sbatch(self, argv: Sequence[str], stdin: bytes | None = None, job_name: str | None = None) -> Any:
        """Run sbatch (``argv`` may stage its script from ``stdin`` first); fires with the job
        id, or fails with CommandError.

        An sbatch that gave no answer (killed past its time, or "Socket timed out" talking to
        slurmctld) may still have submitted the job: with ``job_name``, one squeue for that name
        finds it, so the glidein is followed rather than left running unknown to the factory."""
        try:
            result = yield checked(self.runner, argv, self.timeout, stdin)
        except CommandError as e:
            if job_name is None or not (e.exit_code is None or "timed out" in e.stderr):
                raise
            found = yield self._find_by_name(job_name)
            if found is None:
                raise
            log.warn("slurm: sbatch did not answer ({error}), but Slurm has job {job} named {name}: following it",
                     error=str(e), job=found, name=job_name)
            return found
        job_id = parse_job_id(result.stdout)
        if job_id is None:
            raise CommandError(argv, result.exit_code, f"gave no job id: stdout {result.stdout[:300]!r}, "
                                                       f"stderr {result.stderr[:300]!r}")
        return job_id

    @defer.inlineCallbacks
    def _find_by_name(self, job_name: str) -> Any:
        """The id of the one job Slurm knows by ``job_name``, or None."""
        argv = ["squeue", "--noheader", "--states=all", "--format=%i", f"--name={job_name}"]
        try:
            result = yield checked(self.runner, argv, self.timeout)
        except CommandError:
            return None
        ids = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        return ids[0] if len(ids) == 1 and ids[0].isascii() and ids[0].isdigit() else None

    @defer.inlineCallbacks
    def query(self, grid_ids: Sequence[str]) -> Any:
        """{job id: GridStatus} for those Slurm still knows: one squeue for all of them, then
        one sacct for those squeue no longer lists (finished more than MinJobAge ago)."""
        ids = [str(i) for i in grid_ids]
        if not ids:
            return {}
        argv = ["squeue", "--noheader", "--states=all", "--format=%i|%T|%r", f"--jobs={','.join(ids)}"]
        result = yield defer.maybeDeferred(self.runner, argv, self.timeout, None)
        if result.exit_code != 0:
            if UNKNOWN_JOBS not in result.stderr:
                raise CommandError(argv, result.exit_code, result.stderr or result.stdout)
            statuses: dict[str, GridStatus] = {}  # none of them is in squeue any more
        else:
            statuses = parse_squeue(result.stdout)
        wanted = set(ids)
        statuses = {k: v for k, v in statuses.items() if k in wanted}
        missing = [i for i in ids if i not in statuses]
        if missing:
            finished = yield self._sacct(missing)
            statuses.update({k: v for k, v in finished.items() if k in wanted and v.state == FINISHED})
        if self.removing:
            try:
                yield self._escalate(ids, statuses)
            except CommandError as e:
                log.warn("slurm: {error}", error=str(e))
        return statuses

    @defer.inlineCallbacks
    def _sacct(self, ids: Sequence[str]) -> Any:
        if self.sacct_unavailable:
            return {}
        while True:
            argv = ["sacct", *(["-c"] if self.sacct_completion_log else []), "--noheader", "--parsable2",
                    "--format=JobIDRaw,State,ExitCode", f"--jobs={','.join(ids)}"]
            result = yield defer.maybeDeferred(self.runner, argv, self.timeout, None)
            if result.exit_code == 0:
                return parse_sacct(result.stdout)
            if NO_ACCOUNTING in result.stderr + result.stdout and not self.sacct_completion_log:
                self.sacct_completion_log = True
                continue
            # Without accounting or a completion log, a job squeue no longer lists has simply
            # ended; the factory takes an absent job for a finished one.
            log.warn("slurm: sacct does not answer ({error}); jobs squeue no longer lists count as finished",
                     error=(result.stderr or result.stdout).strip()[:300])
            self.sacct_unavailable = True
            return {}

    @defer.inlineCallbacks
    def remove(self, grid_ids: Sequence[str]) -> Any:
        """Remove glideins the way a startd wants: a running one gets TERM in its batch shell
        alone (the job script hands it to the glidein, whose startd gives its jobs back to their
        schedds and exits), not Slurm's TERM to every process, which would kill the users' jobs
        under it; a pending one is cancelled. One that still runs REMOVE_GRACE later is
        cancelled outright (by :meth:`query`)."""
        ids = [str(i) for i in grid_ids]
        if not ids:
            return None
        yield self._scancel(["scancel", "--batch", "--signal=TERM", "--state=RUNNING", *ids])
        yield self._scancel(["scancel", "--state=PENDING", *ids])
        now = self._now()
        for i in ids:
            self.removing.setdefault(i, now)
        return None

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.monotonic()

    @defer.inlineCallbacks
    def _scancel(self, argv: Sequence[str]) -> Any:
        """Run scancel; a job that is already gone, or not in the state asked for, is no error."""
        result = yield defer.maybeDeferred(self.runner, list(argv), self.timeout, None)
        if result.exit_code == 0:
            return None
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if lines and all(any(benign in line for benign in SCANCEL_BENIGN) for line in lines):
            return None
        raise CommandError(argv, result.exit_code, result.stderr or result.stdout)

    @defer.inlineCallbacks
    def _escalate(self, ids: Sequence[str], statuses: Mapping[str, GridStatus]) -> Any:
        """Of the glideins just queried (``ids``: one entry's; the others' are left alone), cancel
        outright those asked to stop more than REMOVE_GRACE ago that still run."""
        now = self._now()
        asked = [i for i in ids if i in self.removing]
        for i in asked:
            if i not in statuses or statuses[i].state == FINISHED:
                del self.removing[i]
        late = sorted(i for i in asked if i in self.removing and now - self.removing[i] > REMOVE_GRACE)
        if late:
            log.warn("slurm: {n} glideins still run {grace:g}s after they were asked to stop: scancel",
                     n=len(late), grace=REMOVE_GRACE)
            yield self._scancel(["scancel", *late])


def check_entry(source: str, name: str, entry: Mapping[str, Any]) -> None:
    """Refuse, at start-up, an entry the Slurm plugin could not submit for."""
    from gwms.config import ConfigError

    nodes = entry.get("nodes")
    if nodes is not None and int(nodes) < 1:  # not `or 1`: that would take 0 for 1
        raise ConfigError(f"{source}: [factory.entry.{name}] nodes must be at least 1")
    for option in entry.get("slurm_options") or ():
        if not str(option).startswith("-") or "\n" in str(option):
            raise ConfigError(f"{source}: [factory.entry.{name}] slurm_options: {option!r} is not an sbatch option")


def entries_of(config: Any, grid: str) -> dict[str, Mapping[str, Any]]:
    """The factory's entries that use ``grid``."""
    return {name: entry for name, entry in config.section("factory")["entry"].items() if entry["grid"] == grid}


@implementer(IGridSubmitter)
class SlurmGridSubmitter:
    name = "slurm"

    def __init__(self, reactor: Any, work_dir: Path, startup_script: Path,
                 runner: Runner | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.reactor = reactor
        self.work_dir = Path(work_dir)
        self.startup_script = Path(startup_script)
        self.batch = SlurmBatch(runner if runner is not None else reactor_runner(reactor), timeout, reactor)
        self._glidein_of: dict[str, str] = {}  # job id -> glidein id (this process's submissions)

    @classmethod
    def from_config(cls, config: Any, reactor: Any, runner: Runner | None = None) -> "SlurmGridSubmitter":
        from gwms.glidein.files import startup_script

        for name, entry in entries_of(config, cls.name).items():
            check_entry(config.source, name, entry)
        return cls(reactor, config.section("factory")["work_dir"] / "slurm", startup_script(), runner)

    def _dir(self, entry: Mapping[str, Any]) -> Path:
        name = str(entry["name"])
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad entry name {name!r}")
        return self.work_dir / name

    @staticmethod
    def _check_id(glidein_id: str) -> None:
        if "/" in glidein_id or glidein_id.startswith(".") or not glidein_id:
            raise ValueError(f"bad glidein id {glidein_id!r}")

    def _prepare(self, entry: Mapping[str, Any], g: GlideinSubmission, startup: bytes) -> Path:
        """Write the glidein's job script (mode 0600: it holds the credential); returns its path."""
        self._check_id(g.glidein_id)
        d = self._dir(entry)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        credential = Path(g.credential).read_bytes() if g.credential is not None else None
        text = self.batch.script(entry, g, startup, credential, str(d))
        script = d / f"{g.glidein_id}.sh"
        script.unlink(missing_ok=True)
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        return script

    @defer.inlineCallbacks
    def submit(self, entry: Mapping[str, Any], glideins: Sequence[GlideinSubmission]) -> Any:
        submitted: dict[str, str] = {}
        try:
            startup = self.startup_script.read_bytes()  # once for the whole batch
        except OSError as e:
            log.warn("slurm entry {entry}: cannot read {path}: {error}", entry=entry.get("name"),
                     path=str(self.startup_script), error=str(e))
            return submitted
        for g in glideins:
            try:
                script = self._prepare(entry, g, startup)
            except (OSError, ValueError) as e:
                log.warn("slurm glidein {id}: cannot prepare: {error}", id=g.glidein_id, error=str(e))
                continue
            argv = self.batch.sbatch_argv(entry, g.glidein_id, str(script), str(self._dir(entry)))
            try:
                job_id = yield self.batch.sbatch(argv, job_name=f"gwms-{g.glidein_id}")
            except CommandError as e:
                log.warn("slurm glidein {id}: sbatch failed: {error}", id=g.glidein_id, error=str(e))
                self._cleanup(entry, g.glidein_id)
                continue
            self._glidein_of[job_id] = g.glidein_id
            try:
                (self._dir(entry) / f"{g.glidein_id}.jobid").write_text(job_id + "\n")
            except OSError as e:
                log.warn("slurm glidein {id}: cannot record job id: {error}", id=g.glidein_id, error=str(e))
            submitted[g.glidein_id] = job_id
        return submitted

    def query(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[dict[str, GridStatus]]:
        return self.batch.query(grid_ids)

    def remove(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[None]:
        return self.batch.remove(grid_ids)

    def forget(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[None]:
        d = self._dir(entry)
        for grid_id in grid_ids:
            glidein_id = self._glidein_of.pop(str(grid_id), None)
            if glidein_id is None:
                glidein_id = self._find_glidein(d, str(grid_id))
            if glidein_id is not None:
                self._cleanup(entry, glidein_id)
        return defer.succeed(None)

    @staticmethod
    def _find_glidein(d: Path, grid_id: str) -> str | None:
        """After a restart: the glidein whose job id file names ``grid_id``."""
        try:
            for p in d.glob("*.jobid"):
                if p.read_text().strip() == grid_id:
                    return p.name[: -len(".jobid")]
        except OSError:
            pass
        return None

    def _cleanup(self, entry: Mapping[str, Any], glidein_id: str) -> None:
        d = self._dir(entry)
        paths = [d / (glidein_id + suffix) for suffix in (".sh", ".out", ".err", ".jobid")]
        paths += list(d.glob(f"{glidein_id}.node*.out")) + list(d.glob(f"{glidein_id}.node*.err"))
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn("slurm glidein {id}: cannot remove {path}: {error}", id=glidein_id, path=str(path),
                         error=str(e))

