"""The slurm grid plugin, with a fake command runner: no Slurm is ever run."""

from __future__ import annotations

import os
import stat

import pytest
from twisted.internet import defer
from zope.interface.verify import verifyObject

from gwms.factory.grid import FINISHED, HELD, QUEUED, RUNNING, GlideinSubmission, GridStatus
from gwms.interfaces import IGridSubmitter
from gwms.plugins import grid_slurm
from gwms.plugins.grid_slurm import SlurmCommandError, SlurmGridSubmitter, map_state, parse_job_id, parse_squeue


class FakeRunner:
    def __init__(self, *answers):
        self.calls = []
        self.answers = list(answers)

    def __call__(self, argv, timeout):
        self.calls.append(list(argv))
        answer = self.answers.pop(0) if self.answers else (0, "", "")
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


ENTRY = {"name": "e1", "contact": "debug", "account": "acct", "qos": "low", "max_walltime": 3659.9}


@pytest.fixture
def setup(tmp_path):
    cred = tmp_path / "pilot.token"
    cred.write_bytes(b"secret")
    startup = tmp_path / "glidein_startup.sh"
    startup.write_text("#!/bin/sh\n")

    def make(*answers):
        runner = FakeRunner(*answers)
        return SlurmGridSubmitter(None, tmp_path / "work" / "slurm", startup, runner), runner, cred

    return make


def test_interface(setup):
    sub, _, _ = setup()
    assert sub.name == "slurm"
    verifyObject(IGridSubmitter, sub)


def test_submit_command_line_script_and_credential(setup, tmp_path):
    sub, runner, cred = setup((0, "12345\n", ""), (0, "12346;cluster1\n", ""))
    gs = [GlideinSubmission("g1", ("-v", "std", "-name", "a b"), cred), GlideinSubmission("g2", (), None)]
    assert result_of(sub.submit(ENTRY, gs)) == {"g1": "12345", "g2": "12346"}
    d = tmp_path / "work" / "slurm" / "e1"
    assert runner.calls[0] == [
        "sbatch", "--parsable", "--job-name=gwms-g1", "--time=60",
        f"--output={d}/g1.out", f"--error={d}/g1.err",
        "--partition=debug", "--account=acct", "--qos=low", f"{d}/g1.sh"]
    staged = d / "g1.credential"
    assert staged.read_bytes() == b"secret"
    assert stat.S_IMODE(os.stat(staged).st_mode) == 0o600
    script = (d / "g1.sh").read_text()
    assert f"exec sh {tmp_path}/glidein_startup.sh -v std -name 'a b' -credential {staged} -workdir \"$workdir\"" in script
    assert '${TMPDIR:-' in script
    assert "-credential" not in (d / "g2.sh").read_text()
    assert not (d / "g2.credential").exists()


def test_submit_minimal_entry_and_walltime_floor(setup):
    sub, runner, _ = setup((0, "7\n", ""))
    result_of(sub.submit({"name": "e", "max_walltime": 20}, [GlideinSubmission("g", (), None)]))
    argv = runner.calls[0]
    assert "--time=1" in argv
    assert not any(a.startswith(("--partition", "--account", "--qos")) for a in argv)


@pytest.mark.parametrize("out", ["", "Submitted batch job 5\n", "abc;x\n", "1\n2\n"])
def test_submit_broken_output_not_submitted(setup, tmp_path, out):
    sub, runner, cred = setup((0, out, "some warning"), (0, "99\n", ""))
    gs = [GlideinSubmission("bad", (), cred), GlideinSubmission("good", (), cred)]
    assert result_of(sub.submit(ENTRY, gs)) == {"good": "99"}
    d = tmp_path / "work" / "slurm" / "e1"
    assert not (d / "bad.credential").exists() and not (d / "bad.sh").exists()


def test_submit_failing_sbatch_not_submitted(setup):
    sub, runner, cred = setup((1, "", "sbatch: error: invalid partition"),
                              SlurmCommandError(["sbatch"], None, "no answer in 60s"))
    gs = [GlideinSubmission("a", (), cred), GlideinSubmission("b", (), cred)]
    assert result_of(sub.submit(ENTRY, gs)) == {}


def test_bad_glidein_id_refused(setup):
    sub, runner, _ = setup()
    assert result_of(sub.submit(ENTRY, [GlideinSubmission("../x", (), None)])) == {}
    assert runner.calls == []


@pytest.mark.parametrize("out,expected", [("12345", "12345"), ("12345;cluster\n", "12345"), ("  42 \n", "42"),
                                          ("", None), ("x", None), ("1\n2", None), (";c", None)])
def test_parse_job_id(out, expected):
    assert parse_job_id(out) == expected


@pytest.mark.parametrize("state,reason,expected", [
    ("PENDING", "Priority", GridStatus(QUEUED)),
    ("CONFIGURING", "None", GridStatus(QUEUED)),
    ("RUNNING", "None", GridStatus(RUNNING)),
    ("COMPLETING", "None", GridStatus(RUNNING)),
    ("PENDING", "JobHeldAdmin", GridStatus(HELD, None, "PENDING: JobHeldAdmin")),
    ("PENDING", "JobHeldUser", GridStatus(HELD, None, "PENDING: JobHeldUser")),
    ("SUSPENDED", "None", GridStatus(HELD, None, "SUSPENDED")),
    ("REQUEUE_HOLD", "JobHeldAdmin", GridStatus(HELD, None, "REQUEUE_HOLD: JobHeldAdmin")),
    *[(s, "None", GridStatus(FINISHED, None, s)) for s in (
        "COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE")],
    ("WEIRD", "None", None),
])
def test_state_mapping(state, reason, expected):
    assert map_state(state, reason) == expected


def test_parse_squeue_odd_lines_skipped():
    out = "1|RUNNING|None\n\ngarbage\n2|PENDING\n3|BOGUS|None\n4|PENDING|Resources\n5|a|b|c\n|RUNNING|None\n"
    assert parse_squeue(out) == {"1": GridStatus(RUNNING), "4": GridStatus(QUEUED)}


def test_query_one_call_for_many(setup):
    sub, runner, _ = setup((0, "11|RUNNING|None\n12|PENDING|Priority\n13|FAILED|NonZeroExitCode\nodd\n", ""))
    answer = result_of(sub.query(ENTRY, ["11", "12", "13", "14"]))
    assert runner.calls == [["squeue", "--noheader", "--format=%i|%T|%r", "--jobs=11,12,13,14"]]
    assert answer == {"11": GridStatus(RUNNING), "12": GridStatus(QUEUED), "13": GridStatus(FINISHED, None, "FAILED")}
    assert "14" not in answer  # unknown to squeue: the factory treats it as finished


def test_query_empty_runs_nothing(setup):
    sub, runner, _ = setup()
    assert result_of(sub.query(ENTRY, [])) == {}
    assert runner.calls == []


def test_query_failing_command_fails_with_stderr(setup):
    sub, runner, _ = setup((1, "", "slurm_load_jobs error: Unable to contact slurm controller"))
    with pytest.raises(SlurmCommandError, match="Unable to contact"):
        result_of(sub.query(ENTRY, ["1"]))


def test_remove_one_scancel(setup):
    sub, runner, _ = setup((0, "", ""))
    assert result_of(sub.remove(ENTRY, ["1", "2", "3"])) is None
    assert runner.calls == [["scancel", "1", "2", "3"]]


def test_remove_failure(setup):
    sub, runner, _ = setup((1, "", "scancel: error: Kill job error"))
    with pytest.raises(SlurmCommandError, match="Kill job error"):
        result_of(sub.remove(ENTRY, ["1"]))


@pytest.mark.parametrize("restarted", [False, True])
def test_forget_removes_staged_files(setup, tmp_path, restarted):
    sub, runner, cred = setup((0, "77\n", ""))
    result_of(sub.submit(ENTRY, [GlideinSubmission("g1", (), cred)]))
    d = tmp_path / "work" / "slurm" / "e1"
    (d / "g1.out").write_text("out")
    if restarted:
        sub = SlurmGridSubmitter(None, sub.work_dir, sub.startup_script, runner)
    result_of(sub.forget(ENTRY, ["77"]))
    assert list(d.iterdir()) == []


def test_default_runner_real_process():
    from twisted.internet import reactor  # noqa: F401  (not run: only checks construction)
    run = grid_slurm.default_runner(reactor)
    assert callable(run)
