"""The slurm grid plugin, with a fake command runner: no Slurm is ever run (the job scripts it
writes are run, under /bin/sh, with a fake glidein_startup.sh)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from gwms.config import ConfigError, parse_config
from gwms.factory.grid import (
    FINISHED,
    HELD,
    QUEUED,
    RUNNING,
    GlideinSubmission,
    GridStatus,
)
from gwms.interfaces import IGridSubmitter
from gwms.plugins import GRID_SUBMITTERS, load_plugin
from gwms.plugins.commands import CommandError, CommandResult
from gwms.plugins.grid_slurm import (
    SlurmBatch,
    SlurmGridSubmitter,
    check_entry,
    glidein_arguments,
    map_state,
    parse_job_id,
    parse_sacct,
    parse_squeue,
    time_limit_minutes,
)

SQUEUE = ["squeue", "--noheader", "--states=all", "--format=%i|%T|%r"]
SACCT = ["sacct", "--noheader", "--parsable2", "--format=JobIDRaw,State,ExitCode"]
SACCT_C = ["sacct", "-c", "--noheader", "--parsable2", "--format=JobIDRaw,State,ExitCode"]
INVALID_IDS = "slurm_load_jobs error: Invalid job id specified\n"
NO_ACCOUNTING = "sacct: error: Slurm accounting storage is disabled\n"


def ok(stdout: str = "", stderr: str = "") -> CommandResult:
    return CommandResult(0, stdout, stderr)


def failed(stderr: str, code: int = 1, stdout: str = "") -> CommandResult:
    return CommandResult(code, stdout, stderr)


class FakeRunner:
    """A runner that answers from a script of CommandResults (or raises an exception given
    instead), recording each command line; an unscripted call answers exit 0, no output."""

    def __init__(self, *answers: CommandResult | Exception) -> None:
        self.calls: list[list[str]] = []
        self.timeouts: list[float] = []
        self.stdins: list[bytes | None] = []
        self.answers = list(answers)

    def __call__(self, argv: Any, timeout: float, stdin: bytes | None) -> defer.Deferred[CommandResult]:
        self.calls.append(list(argv))
        self.timeouts.append(timeout)
        self.stdins.append(stdin)
        answer = self.answers.pop(0) if self.answers else ok()
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def result_of(d: defer.Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def messages(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events]


ENTRY = {"name": "e1", "partition": "debug", "account": "acct", "qos": "low", "max_walltime": 3659.9}

# Prints its arguments, one per line, and the credential it was given.
FAKE_STARTUP = b"""#!/bin/sh
for a in "$@"; do printf 'arg=%s\\n' "$a"; done
prev=
for a in "$@"; do
    if [ "$prev" = -credential ]; then printf 'credential=%s\\n' "$(cat "$a")"; fi
    prev=$a
done
"""


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.cred = tmp_path / "pilot.token"
        self.cred.write_bytes(b"secret-token\n")
        self.startup = tmp_path / "glidein_startup.sh"
        self.startup.write_bytes(FAKE_STARTUP)
        self.work = tmp_path / "work" / "slurm"

    def __call__(self, *answers: CommandResult | Exception) -> tuple[SlurmGridSubmitter, FakeRunner]:
        runner = FakeRunner(*answers)
        return SlurmGridSubmitter(None, self.work, self.startup, runner), runner

    def dir(self, entry: str = "e1") -> Path:
        return self.work / entry


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_interface(setup):
    sub, _ = setup()
    assert sub.name == "slurm"
    verifyObject(IGridSubmitter, sub)


# ------------------------------------------------------------------------------------------
# sbatch: the command line, the job script


def test_sbatch_command_line(setup):
    sub, runner = setup(ok("12345\n"))
    entry = {**ENTRY, "slurm_options": ["--mem=2G", "--constraint=cvmfs"]}
    assert result_of(sub.submit(entry, [GlideinSubmission("g1", ("-v",), setup.cred)])) == {"g1": "12345"}
    d = setup.dir()
    assert runner.calls == [[
        "sbatch", "--parsable", "--job-name=gwms-g1", "--time=60",
        f"--output={d}/g1.out", f"--error={d}/g1.err",
        "--partition=debug", "--account=acct", "--qos=low", "--mem=2G", "--constraint=cvmfs", f"{d}/g1.sh"]]
    assert runner.stdins == [None]
    assert (d / "g1.jobid").read_text() == "12345\n"


def test_sbatch_command_line_of_a_multi_node_entry(setup):
    sub, runner = setup(ok("5\n"))
    result_of(sub.submit({"name": "e1", "nodes": 3, "max_walltime": 7200, "partition": "wide"},
                         [GlideinSubmission("g1", (), setup.cred)]))
    d = setup.dir()
    assert runner.calls == [[
        "sbatch", "--parsable", "--job-name=gwms-g1", "--time=120", f"--output={d}/g1.out", f"--error={d}/g1.err",
        "--nodes=3", "--partition=wide", f"{d}/g1.sh"]]
    script = (d / "g1.sh").read_text()
    assert "srun --nodes=3 --ntasks-per-node=1" in script
    assert f"--output={d}/g1.node%n.out --error={d}/g1.node%n.err" in script
    assert '-name g1-n"$SLURM_NODEID"' in script


def test_sbatch_command_line_of_a_minimal_entry(setup):
    sub, runner = setup(ok("7\n"), ok("8\n"))
    result_of(sub.submit({"name": "e", "max_walltime": 20, "nodes": 1, "partition": None, "slurm_options": []},
                         [GlideinSubmission("g", (), None)]))
    result_of(sub.submit({"name": "e"}, [GlideinSubmission("h", (), None)]))  # no max_walltime: 1 day
    d = setup.dir("e")
    assert runner.calls == [
        ["sbatch", "--parsable", "--job-name=gwms-g", "--time=1", f"--output={d}/g.out", f"--error={d}/g.err",
         f"{d}/g.sh"],
        ["sbatch", "--parsable", "--job-name=gwms-h", "--time=1440", f"--output={d}/h.out", f"--error={d}/h.err",
         f"{d}/h.sh"]]


@pytest.mark.parametrize("walltime,minutes", [(3659.9, 60), (60, 1), (59.9, 1), (0, 1), (86400, 1440), ("7200", 120),
                                              (90061, 1501)])
def test_time_limit_is_whole_minutes_at_least_one(walltime, minutes):
    assert time_limit_minutes({"max_walltime": walltime}) == minutes


def test_glidein_arguments_add_the_batch_time_limit():
    g = GlideinSubmission("g1", ("-name", "g1", "-lifetime", "3659"), None)
    assert glidein_arguments(ENTRY, g) == ["-name", "g1", "-lifetime", "3659", "-batch_time_limit", "3600"]
    assert glidein_arguments({"max_walltime": 20}, g)[-2:] == ["-batch_time_limit", "60"]


def test_the_job_script_is_private_holds_the_credential_and_runs_the_glidein(setup):
    sub, _ = setup(ok("12345\n"), ok("12346;cluster1\n"))
    gs = [GlideinSubmission("g1", ("-v", "std", "-name", "a b", "-x", "it's $HOME"), setup.cred),
          GlideinSubmission("g2", (), None)]
    assert result_of(sub.submit(ENTRY, gs)) == {"g1": "12345", "g2": "12346"}
    d = setup.dir()
    script = d / "g1.sh"
    assert stat.S_IMODE(script.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    text = script.read_text()
    assert "secret-token\n" in text
    assert FAKE_STARTUP.decode() in text
    assert '"${TMPDIR:-/tmp}"' in text
    assert "secret-token" not in (d / "g2.sh").read_text()
    assert not list(d.glob("*.credential"))  # the credential travels inside the script only

    # What Slurm would run on the node.
    node_tmp = setup.tmp_path / "node-tmp"
    node_tmp.mkdir()
    done = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True, check=False, timeout=30,
                          env={"PATH": os.environ.get("PATH", "/bin"), "TMPDIR": str(node_tmp)})
    assert done.returncode == 0, done.stderr
    args = [line[4:] for line in done.stdout.splitlines() if line.startswith("arg=")]
    base = args[-1]
    assert args == ["-v", "std", "-name", "a b", "-x", "it's $HOME", "-batch_time_limit", "3600",
                    "-credential", f"{base}/credential", "-workdir", base]
    assert "credential=secret-token" in done.stdout.splitlines()
    assert list(node_tmp.iterdir()) == []


def test_worker_dir_is_where_the_glidein_makes_its_directory(setup):
    sub, _ = setup(ok("1\n"))
    result_of(sub.submit({**ENTRY, "worker_dir": "/scratch/gwms $USER"}, [GlideinSubmission("g1", (), None)]))
    text = (setup.dir() / "g1.sh").read_text()
    assert "parent='/scratch/gwms $USER'\n" in text
    assert "TMPDIR" not in text


def test_a_failing_sbatch_is_logged_its_files_go_and_the_others_still_go(setup):
    sub, runner = setup(failed("sbatch: error: Batch job submission failed: Invalid partition name specified\n"),
                        CommandError(["sbatch"], None, "no answer in 60s: killed"),
                        ok(""),  # squeue --name: Slurm has no job of b's
                        ok("99\n"))
    gs = [GlideinSubmission("a", (), setup.cred), GlideinSubmission("b", (), setup.cred),
          GlideinSubmission("c", (), setup.cred)]
    with capturedLogs() as events:
        assert result_of(sub.submit(ENTRY, gs)) == {"c": "99"}
    assert len(runner.calls) == 4
    assert runner.calls[2] == ["squeue", "--noheader", "--states=all", "--format=%i", "--name=gwms-b"]
    logged = messages(events)
    assert ("slurm glidein a: sbatch failed: sbatch exited 1: sbatch: error: Batch job submission failed: "
            "Invalid partition name specified") in logged
    assert "slurm glidein b: sbatch failed: sbatch failed: no answer in 60s: killed" in logged
    assert sorted(p.name for p in setup.dir().iterdir()) == ["c.jobid", "c.sh"]


@pytest.mark.parametrize("out", ["", "Submitted batch job 5\n", "abc;x\n", "1\n2\n", "\u0661\u0662\n", "-5\n"])
def test_sbatch_without_a_job_id_is_not_submitted(setup, out):
    sub, runner = setup(ok(out, "some warning"), ok("99\n"))
    gs = [GlideinSubmission("bad", (), setup.cred), GlideinSubmission("good", (), setup.cred)]
    with capturedLogs() as events:
        assert result_of(sub.submit(ENTRY, gs)) == {"good": "99"}
    assert [c[2] for c in runner.calls] == ["--job-name=gwms-bad", "--job-name=gwms-good"]
    (warning,) = [m for m in messages(events) if m.startswith("slurm glidein bad:")]
    assert "gave no job id" in warning and "some warning" in warning
    d = setup.dir()
    assert not (d / "bad.sh").exists() and not (d / "bad.jobid").exists()


def test_bad_glidein_id_refused(setup):
    sub, runner = setup()
    assert result_of(sub.submit(ENTRY, [GlideinSubmission("../x", (), None), GlideinSubmission("", (), None),
                                        GlideinSubmission(".hidden", (), None)])) == {}
    assert runner.calls == []


def test_an_unreadable_credential_skips_that_glidein_only(setup):
    sub, runner = setup(ok("3\n"))
    gs = [GlideinSubmission("a", (), setup.tmp_path / "missing.pem"), GlideinSubmission("b", (), setup.cred)]
    with capturedLogs() as events:
        assert result_of(sub.submit(ENTRY, gs)) == {"b": "3"}
    assert [c[2] for c in runner.calls] == ["--job-name=gwms-b"]
    assert any(m.startswith("slurm glidein a: cannot prepare:") for m in messages(events))


def test_a_binary_credential_is_refused(setup):
    sub, runner = setup()
    setup.cred.write_bytes(b"\xff\x00binary")
    with capturedLogs() as events:
        assert result_of(sub.submit(ENTRY, [GlideinSubmission("a", (), setup.cred)])) == {}
    assert runner.calls == []
    assert any("the credential is not text" in m for m in messages(events))


@pytest.mark.parametrize("out,expected", [("12345", "12345"), ("12345;cluster\n", "12345"), ("  42 \n", "42"),
                                          ("\n7\n\n", "7"), ("", None), ("x", None), ("1\n2", None), (";c", None),
                                          ("\u0661\u0662", None), ("12 34", None), ("0x10", None)])
def test_parse_job_id(out, expected):
    assert parse_job_id(out) == expected


# ------------------------------------------------------------------------------------------
# States


@pytest.mark.parametrize("state,reason,expected", [
    ("PENDING", "Priority", GridStatus(QUEUED)),
    ("PENDING", "(null)", GridStatus(QUEUED)),
    ("CONFIGURING", "None", GridStatus(QUEUED)),
    ("REQUEUED", "None", GridStatus(QUEUED)),
    ("RUNNING", "None", GridStatus(RUNNING)),
    ("running", "None", GridStatus(RUNNING)),
    ("COMPLETING", "None", GridStatus(RUNNING)),
    ("PENDING", "JobHeldAdmin", GridStatus(HELD, None, "PENDING: JobHeldAdmin")),
    ("PENDING", "JobHeldUser", GridStatus(HELD, None, "PENDING: JobHeldUser")),
    ("SUSPENDED", "None", GridStatus(HELD, None, "SUSPENDED")),
    ("REQUEUE_HOLD", "JobHeldAdmin", GridStatus(HELD, None, "REQUEUE_HOLD: JobHeldAdmin")),
    ("COMPLETED", "None", GridStatus(FINISHED, 0, "COMPLETED")),
    *[(s, "None", GridStatus(FINISHED, None, s)) for s in (
        "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")],
    ("CANCELLED by 0", "", GridStatus(FINISHED, None, "CANCELLED")),
    ("WEIRD", "None", None),
    ("", "None", None),
])
def test_state_mapping(state, reason, expected):
    assert map_state(state, reason) == expected


def test_state_mapping_keeps_an_exit_code():
    assert map_state("FAILED", "", 1) == GridStatus(FINISHED, 1, "FAILED")
    assert map_state("COMPLETED", "", 0) == GridStatus(FINISHED, 0, "COMPLETED")


def test_parse_squeue_odd_lines_skipped():
    out = "1|RUNNING|None\n\ngarbage\n2|PENDING\n3|BOGUS|None\n4|PENDING|Resources\n5|a|b|c\n|RUNNING|None\n"
    with capturedLogs() as events:
        assert parse_squeue(out) == {"1": GridStatus(RUNNING), "4": GridStatus(QUEUED)}
    logged = messages(events)
    assert "squeue: odd line skipped: 'garbage'" in logged
    assert "squeue: unknown state 'BOGUS' for job 3, skipped" in logged


def test_parse_squeue_survives_hostile_output():
    huge = "9|RUNNING|" + "x" * 1_000_000
    out = "\n".join([
        " 1 | RUNNING | None ",  # padded
        "\x00\xff\ufffd garbage \x1b[31m",
        "2|PENDING|Priority|extra|fields",
        "3|RUNNING",
        huge,
        "4|" + "Z" * 100_000 + "|None",
        "Y" * 100_000 + "|BOGUS|None",
        "5|PENDING|JobHeldAdmin\r",
        "|||",
        "6||None",
    ])
    with capturedLogs() as events:
        assert parse_squeue(out) == {"1": GridStatus(RUNNING), "9": GridStatus(RUNNING),
                                     "5": GridStatus(HELD, None, "PENDING: JobHeldAdmin")}
    assert all(len(m) < 1000 for m in messages(events))  # a huge line is not logged whole


@pytest.mark.parametrize("out,expected", [
    ("12|COMPLETED|0:0\n12.batch|COMPLETED|0:0\n12.extern|COMPLETED|0:0\n", {"12": GridStatus(FINISHED, 0, "COMPLETED")}),
    ("13|CANCELLED by 0|0:15\n13.batch|CANCELLED|0:15\n", {"13": GridStatus(FINISHED, 0, "CANCELLED")}),
    ("14|FAILED|1:0\n14.0|FAILED|1:0\n", {"14": GridStatus(FINISHED, 1, "FAILED")}),
    ("15|TIMEOUT|0:0\n", {"15": GridStatus(FINISHED, 0, "TIMEOUT")}),
    ("16|RUNNING|0:0\n", {"16": GridStatus(RUNNING)}),
    ("17|NODE_FAIL|\n", {"17": GridStatus(FINISHED, None, "NODE_FAIL")}),
    ("18|FAILED|x:y\n", {"18": GridStatus(FINISHED, None, "FAILED")}),
    ("19|FAILED|\u00b2:0\n", {"19": GridStatus(FINISHED, None, "FAILED")}),
    ("20|BOGUS|0:0\n", {}),
    ("garbage\n21|COMPLETED\n22|COMPLETED|0:0|x\n\n|COMPLETED|0:0\n23_1|COMPLETED|0:0\n23+0|COMPLETED|0:0\n", {}),
    ("", {}),
])
def test_parse_sacct(out, expected):
    assert parse_sacct(out) == expected


# ------------------------------------------------------------------------------------------
# query


def test_query_one_squeue_for_many_then_one_sacct_for_those_it_lost(setup):
    sub, runner = setup(ok("11|RUNNING|None\n12|PENDING|Priority\n13|FAILED|NonZeroExitCode\nodd\n"),
                        ok("14|COMPLETED|0:0\n14.batch|COMPLETED|0:0\n"))
    answer = result_of(sub.query(ENTRY, ["11", "12", "13", "14", "15"]))
    assert runner.calls == [[*SQUEUE, "--jobs=11,12,13,14,15"], [*SACCT, "--jobs=14,15"]]
    assert answer == {"11": GridStatus(RUNNING), "12": GridStatus(QUEUED), "13": GridStatus(FINISHED, None, "FAILED"),
                      "14": GridStatus(FINISHED, 0, "COMPLETED")}
    assert "15" not in answer  # unknown to both: the factory treats it as finished


def test_query_all_in_squeue_runs_no_sacct(setup):
    sub, runner = setup(ok("1|RUNNING|None\n2|PENDING|Resources\n"))
    assert result_of(sub.query(ENTRY, ["1", "2"])) == {"1": GridStatus(RUNNING), "2": GridStatus(QUEUED)}
    assert runner.calls == [[*SQUEUE, "--jobs=1,2"]]


def test_query_drops_ids_it_did_not_ask_about(setup):
    sub, runner = setup(ok("1|RUNNING|None\n666|RUNNING|None\n"),
                        ok("2|COMPLETED|0:0\n777|FAILED|1:0\n"))
    assert result_of(sub.query(ENTRY, ["1", "2"])) == {"1": GridStatus(RUNNING),
                                                       "2": GridStatus(FINISHED, 0, "COMPLETED")}
    assert runner.calls == [[*SQUEUE, "--jobs=1,2"], [*SACCT, "--jobs=2"]]


def test_query_takes_only_finished_jobs_from_sacct(setup):
    # A job squeue no longer lists but sacct says runs: squeue is the authority on live jobs.
    sub, runner = setup(ok(""), ok("3|RUNNING|0:0\n4|PENDING|0:0\n5|CANCELLED by 1000|0:0\n"))
    assert result_of(sub.query(ENTRY, ["3", "4", "5"])) == {"5": GridStatus(FINISHED, 0, "CANCELLED")}
    assert runner.calls == [[*SQUEUE, "--jobs=3,4,5"], [*SACCT, "--jobs=3,4,5"]]


def test_query_with_ids_squeue_no_longer_knows_asks_sacct_for_all(setup):
    sub, runner = setup(failed(INVALID_IDS), ok("1|COMPLETED|0:0\n2|OUT_OF_MEMORY|0:125\n"))
    answer = result_of(sub.query(ENTRY, ["1", "2", "3"]))
    assert runner.calls == [[*SQUEUE, "--jobs=1,2,3"], [*SACCT, "--jobs=1,2,3"]]
    assert answer == {"1": GridStatus(FINISHED, 0, "COMPLETED"), "2": GridStatus(FINISHED, 0, "OUT_OF_MEMORY")}


def test_query_without_accounting_storage_uses_the_completion_log_from_then_on(setup):
    sub, runner = setup(ok("1|RUNNING|None\n"), failed(NO_ACCOUNTING), ok("2|COMPLETED|0:0\n"),
                        ok(""), ok("3|FAILED|2:0\n"))
    with capturedLogs() as events:
        assert result_of(sub.query(ENTRY, ["1", "2"])) == {"1": GridStatus(RUNNING),
                                                           "2": GridStatus(FINISHED, 0, "COMPLETED")}
        assert result_of(sub.query(ENTRY, ["3"])) == {"3": GridStatus(FINISHED, 2, "FAILED")}
    assert runner.calls == [[*SQUEUE, "--jobs=1,2"], [*SACCT, "--jobs=2"], [*SACCT_C, "--jobs=2"],
                            [*SQUEUE, "--jobs=3"], [*SACCT_C, "--jobs=3"]]
    assert not [m for m in messages(events) if "sacct" in m]


def test_query_when_sacct_does_not_answer_warns_once_and_stops_asking(setup):
    sub, runner = setup(ok(""), failed("sacct: error: Problem talking to the database: Connection refused\n"),
                        ok("2|RUNNING|None\n"), failed(INVALID_IDS))
    with capturedLogs() as events:
        assert result_of(sub.query(ENTRY, ["1"])) == {}
        assert result_of(sub.query(ENTRY, ["1", "2"])) == {"2": GridStatus(RUNNING)}
        assert result_of(sub.query(ENTRY, ["2"])) == {}
    assert runner.calls == [[*SQUEUE, "--jobs=1"], [*SACCT, "--jobs=1"], [*SQUEUE, "--jobs=1,2"],
                            [*SQUEUE, "--jobs=2"]]
    (warning,) = [m for m in messages(events) if "sacct" in m]
    assert "Problem talking to the database: Connection refused" in warning


def test_query_when_the_completion_log_fails_too_gives_sacct_up(setup):
    sub, runner = setup(ok(""), failed(NO_ACCOUNTING), failed("sacct: error: no job completion log plugin\n"),
                        ok(""))
    with capturedLogs() as events:
        assert result_of(sub.query(ENTRY, ["1"])) == {}
        assert result_of(sub.query(ENTRY, ["1"])) == {}
    assert runner.calls == [[*SQUEUE, "--jobs=1"], [*SACCT, "--jobs=1"], [*SACCT_C, "--jobs=1"], [*SQUEUE, "--jobs=1"]]
    assert len([m for m in messages(events) if "sacct does not answer" in m]) == 1


def test_query_empty_runs_nothing(setup):
    sub, runner = setup()
    assert result_of(sub.query(ENTRY, [])) == {}
    assert runner.calls == []


def test_query_failing_squeue_fails_with_its_stderr(setup):
    sub, runner = setup(failed("slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"))
    with pytest.raises(CommandError, match="squeue exited 1: slurm_load_jobs error: Unable to contact") as e:
        result_of(sub.query(ENTRY, ["1"]))
    assert e.value.exit_code == 1
    assert runner.calls == [[*SQUEUE, "--jobs=1"]]  # no sacct after a failed squeue


def test_query_squeue_timing_out_fails(setup):
    sub, _ = setup(CommandError(["squeue"], None, "no answer in 60s: killed"))
    with pytest.raises(CommandError, match="no answer in 60s"):
        result_of(sub.query(ENTRY, ["1"]))


def test_commands_get_the_plugins_timeout():
    runner = FakeRunner(ok("1|RUNNING|None\n"), ok(""))
    batch = SlurmBatch(runner, timeout=12.5)
    result_of(batch.query(["1"]))
    result_of(batch.remove(["1"]))
    assert runner.timeouts == [12.5, 12.5, 12.5]


# ------------------------------------------------------------------------------------------
# remove and forget


def test_remove_signals_running_glideins_batch_shell_and_cancels_pending_ones(setup):
    sub, runner = setup(ok(), ok())
    assert result_of(sub.remove(ENTRY, ["1", "2", "3"])) is None
    # TERM to the batch shell alone: the glidein's startd gives its jobs back before it exits;
    # Slurm's own cancel would TERM the users' jobs too.
    assert runner.calls == [["scancel", "--batch", "--signal=TERM", "--state=RUNNING", "1", "2", "3"],
                            ["scancel", "--state=PENDING", "1", "2", "3"]]


@pytest.mark.parametrize("stderr", [
    "scancel: error: Kill job error on job id 1: Invalid job id specified\n",
    "scancel: error: Kill job error on job id 1: Job/step already completing or completed\n",
    "scancel: error: Kill job error on job id 1: Invalid job id specified\n"
    "scancel: error: Kill job error on job id 2: Invalid job id specified\n",
])
def test_remove_of_jobs_already_gone_or_in_another_state_is_no_error(setup, stderr):
    sub, runner = setup(failed(stderr), failed(stderr))
    assert result_of(sub.remove(ENTRY, ["1", "2"])) is None
    assert len(runner.calls) == 2


def test_a_glidein_still_running_after_the_grace_is_cancelled_outright():
    from twisted.internet.task import Clock

    from gwms.plugins.grid_local import REMOVE_GRACE

    clock = Clock()
    runner = FakeRunner()
    batch = SlurmBatch(runner, clock=clock)
    result_of(batch.remove(["7", "8"]))
    runner.calls.clear()
    runner.answers = [ok("7|RUNNING|None\n8|RUNNING|None\n")]
    result_of(batch.query(["7", "8"]))
    assert runner.calls == [[*SQUEUE, "--jobs=7,8"]]  # within the grace: nothing more
    clock.advance(REMOVE_GRACE + 1)
    runner.calls.clear()
    runner.answers = [ok("7|RUNNING|None\n8|COMPLETED|None\n")]
    result_of(batch.query(["7", "8"]))
    assert runner.calls == [[*SQUEUE, "--jobs=7,8"], ["scancel", "7"]]
    assert batch.removing == {"7": 0.0}
    runner.calls.clear()
    runner.answers = [ok("7|CANCELLED|None\n")]
    result_of(batch.query(["7"]))
    assert runner.calls == [[*SQUEUE, "--jobs=7"]] and batch.removing == {}


def test_remove_nothing_runs_nothing(setup):
    sub, runner = setup()
    assert result_of(sub.remove(ENTRY, [])) is None
    assert runner.calls == []


def test_remove_failure_carries_stderr(setup):
    sub, _ = setup(failed("scancel: error: Kill job error on job id 1: Access/permission denied\n"))
    with pytest.raises(CommandError, match="scancel exited 1: scancel: error: Kill job error on job id 1: Access"):
        result_of(sub.remove(ENTRY, ["1"]))


@pytest.mark.parametrize("restarted", [False, True])
def test_forget_removes_the_glideins_files(setup, restarted):
    sub, runner = setup(ok("77\n"), ok("78\n"))
    result_of(sub.submit({**ENTRY, "nodes": 2}, [GlideinSubmission("g1", (), setup.cred),
                                                 GlideinSubmission("g2", (), setup.cred)]))
    d = setup.dir()
    for name in ("g1.out", "g1.err", "g1.node0.out", "g1.node1.err", "g2.out"):
        (d / name).write_text("output")
    if restarted:
        sub = SlurmGridSubmitter(None, sub.work_dir, sub.startup_script, runner)
    result_of(sub.forget(ENTRY, ["77", "12345"]))  # 12345: not one of ours, nothing to do
    assert sorted(p.name for p in d.iterdir()) == ["g2.jobid", "g2.out", "g2.sh"]
    result_of(sub.forget(ENTRY, ["78"]))
    assert list(d.iterdir()) == []


# ------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("entry", [{"nodes": 1}, {"nodes": 4, "slurm_options": ["--mem=2G", "-C", "-Ccvmfs"]}, {}])
def test_check_entry_accepts(entry):
    check_entry("site.toml", "e1", entry)


@pytest.mark.parametrize("entry,message", [
    ({"nodes": 0}, "nodes must be at least 1"),
    ({"nodes": -2}, "nodes must be at least 1"),
    ({"slurm_options": ["mem=2G"]}, "'mem=2G' is not an sbatch option"),
    ({"slurm_options": ["--mem=2G", ""]}, "'' is not an sbatch option"),
    ({"slurm_options": ["--comment=x\n#SBATCH --uid=0"]}, "is not an sbatch option"),
])
def test_check_entry_refuses(entry, message):
    with pytest.raises(ConfigError, match=f"site.toml: \\[factory.entry.e1\\] .*{message}"):
        check_entry("site.toml", "e1", entry)


CONFIG = """
[factory]
work_dir = "{work}"
[factory.entry.cluster]
grid = "slurm"
partition = "debug"
account = "gwms"
nodes = {nodes}
slurm_options = {options}
max_walltime = 7200
[factory.entry.other]
grid = "local"
slurm_options = ["not-checked: not a slurm entry"]
"""


def slurm_config(tmp_path: Path, nodes: int = 1, options: str = '["--mem=2G"]'):
    return parse_config(CONFIG.format(work=tmp_path / "factory", nodes=nodes, options=options), "site.toml",
                        base=tmp_path)


def test_from_config(tmp_path):
    from gwms.glidein.files import startup_script

    runner = FakeRunner(ok("31\n"))
    sub = SlurmGridSubmitter.from_config(slurm_config(tmp_path), None, runner)
    assert sub.work_dir == tmp_path / "factory" / "slurm"
    assert sub.startup_script == startup_script()
    config = slurm_config(tmp_path)
    entry = {**config.section("factory")["entry"]["cluster"], "name": "cluster"}
    assert result_of(sub.submit(entry, [GlideinSubmission("g1", (), None)])) == {"g1": "31"}
    d = tmp_path / "factory" / "slurm" / "cluster"
    assert runner.calls == [["sbatch", "--parsable", "--job-name=gwms-g1", "--time=120", f"--output={d}/g1.out",
                             f"--error={d}/g1.err", "--partition=debug", "--account=gwms", "--mem=2G", f"{d}/g1.sh"]]
    assert startup_script().read_text() in (d / "g1.sh").read_text()


@pytest.mark.parametrize("nodes,options,message", [(0, '["--mem=2G"]', "nodes must be at least 1"),
                                                   (1, '["mem=2G"]', "is not an sbatch option")])
def test_from_config_refuses_a_bad_entry(tmp_path, nodes, options, message):
    with pytest.raises(ConfigError, match=f"site.toml: \\[factory.entry.cluster\\] .*{message}"):
        SlurmGridSubmitter.from_config(slurm_config(tmp_path, nodes, options), None)


class SpawnRecorder(MemoryReactorClock):
    """Records the commands spawned through it, and makes them fail to start."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[list[str]] = []

    def spawnProcess(self, proto: Any, executable: str, args: Any = (), env: Any = None, path: Any = None,
                     uid: Any = None, gid: Any = None, usePTY: bool = False, childFDs: Any = None) -> Any:
        self.spawned.append(list(args))
        raise FileNotFoundError(2, "No such file or directory", executable)


def test_load_plugin_makes_a_slurm_submitter_that_runs_commands_through_the_reactor(tmp_path):
    reactor = SpawnRecorder()
    sub = load_plugin("grid submitter", "slurm", GRID_SUBMITTERS, IGridSubmitter, slurm_config(tmp_path), reactor)
    assert isinstance(sub, SlurmGridSubmitter)
    assert sub.reactor is reactor
    with pytest.raises(CommandError, match="squeue failed: did not run"):
        result_of(sub.query({"name": "cluster"}, ["5"]))
    assert reactor.spawned == [[*SQUEUE, "--jobs=5"]]


def test_load_plugin_refuses_a_bad_slurm_entry(tmp_path):
    with pytest.raises(ConfigError, match="nodes must be at least 1"):
        load_plugin("grid submitter", "slurm", GRID_SUBMITTERS, IGridSubmitter, slurm_config(tmp_path, 0),
                    MemoryReactorClock())


@pytest.mark.parametrize("failure", [
    CommandError(["sbatch"], None, "no answer in 60s: killed"),
    CommandError(["sbatch"], 1, "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"),
])
def test_an_sbatch_that_did_not_answer_but_submitted_is_followed(setup, failure):
    sub, runner = setup(failure, ok("4711\n"))
    with capturedLogs() as events:
        assert result_of(sub.submit(ENTRY, [GlideinSubmission("b", (), setup.cred)])) == {"b": "4711"}
    assert runner.calls[1] == ["squeue", "--noheader", "--states=all", "--format=%i", "--name=gwms-b"]
    assert any("but Slurm has job 4711 named gwms-b: following it" in m for m in messages(events))
    assert (setup.dir() / "b.jobid").read_text() == "4711\n"


@pytest.mark.parametrize("found", [ok("1\n2\n"), ok("x\n"), failed("squeue: error: Unable to contact slurm controller")])
def test_an_sbatch_that_did_not_answer_is_not_submitted_unless_one_job_has_its_name(setup, found):
    sub, runner = setup(CommandError(["sbatch"], None, "no answer in 60s: killed"), found)
    assert result_of(sub.submit(ENTRY, [GlideinSubmission("b", (), setup.cred)])) == {}
    assert list(setup.dir().iterdir()) == []


def test_an_sbatch_refused_for_a_plain_reason_is_not_looked_for(setup):
    sub, runner = setup(failed("sbatch: error: invalid partition specified: nope"))
    assert result_of(sub.submit(ENTRY, [GlideinSubmission("b", (), setup.cred)])) == {}
    assert len(runner.calls) == 1


def test_a_query_of_one_entry_leaves_the_removals_of_another_alone():
    from twisted.internet.task import Clock

    from gwms.plugins.grid_local import REMOVE_GRACE

    clock = Clock()
    runner = FakeRunner()
    batch = SlurmBatch(runner, clock=clock)  # one plugin, so one SlurmBatch, for every entry
    result_of(batch.remove(["7"]))  # entry A's glidein
    clock.advance(REMOVE_GRACE + 1)
    runner.calls.clear()
    runner.answers = [ok("9|RUNNING|None\n")]
    result_of(batch.query(["9"]))  # entry B's query: 7 is none of its business
    assert runner.calls == [[*SQUEUE, "--jobs=9"]] and batch.removing == {"7": 0.0}
    runner.answers = [ok("7|RUNNING|None\n")]
    result_of(batch.query(["7"]))  # entry A's: 7 still runs past the grace
    assert runner.calls[-1] == ["scancel", "7"]
