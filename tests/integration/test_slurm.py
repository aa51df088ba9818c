"""Glideins through a real Slurm: `twistd -n gwms-pool` whose factory entry has grid = "slurm",
against a two-node cluster on this host (munged, slurmctld, two slurmd; see slurm_cluster.py).
The frontend asks, the factory runs sbatch, the glideins run as Slurm jobs, join the pool and run
the jobs; the factory follows them with squeue/sacct and removes them with scancel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gwms.testing.polling import wait_until

from test_glideins import history, pool_config, start_pool

pytestmark = pytest.mark.integration


def slurm_pool_config(workdir: Path, walltime: int, nodes: int = 1, max_glideins: int = 2) -> Path:
    """gwms-pool's one-host configuration with one entry, "hpc", on the Slurm cluster."""
    config = pool_config(workdir, entries=False, entry=f"""
[factory.entry.hpc]
grid = "slurm"
partition = "debug"
slurm_options = ["--cpus-per-task=1"]
nodes = {nodes}
worker_dir = "{workdir / 'worker'}"
# As on worker nodes the factory never names: every interface, advertising the address the node
# reaches the collector from.
worker_listen = "0.0.0.0"
python = "{sys.executable}"
attributes = {{ GLIDEIN_Site = "HPC", GLIDEIN_CPUS = 1, GLIDEIN_MaxMemMBs = 512 }}
allowed_frontends = ["/O=gwms/OU=Hosts/CN=localhost"]
max_idle = 2
max_glideins = {max_glideins}
max_walltime = {walltime}
max_idle_time = 1200
failure_backoff = 0

""")
    (workdir / "worker").mkdir()
    return config


def submit(gwms_cli, env: dict[str, str], jobdir: Path, n: int, command: str) -> int:
    jobdir.mkdir(parents=True, exist_ok=True)
    (jobdir / "job.sub").write_text(f"executable = /bin/sh\narguments = \"-c '{command}'\"\n"
                                    "transfer_executable = false\noutput = out.$(Process)\n"
                                    f"request_memory = 100\nrequest_disk = 1000\nqueue {n}\n")
    result = gwms_cli("submit", str(jobdir / "job.sub"), env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1].rstrip("."))


def gwms_jobs(jobs: dict[str, tuple[str, str]], before: set[str] = frozenset()) -> dict[str, tuple[str, str]]:
    """The glideins among Slurm's jobs (the cluster serves the whole session: those of earlier
    tests, in ``before``, are left out)."""
    return {i: v for i, v in jobs.items() if v[0].startswith("gwms-hpc-") and i not in before}


@pytest.fixture
def env_for(slurm):
    def make(config: Path) -> dict[str, str]:
        return {**slurm.env, "GWMS_CONFIG": str(config)}

    return make


@pytest.fixture(scope="module")
def short_limit(slurm, tmp_path_factory):
    """A pool whose entry has a one-minute Slurm limit, much shorter than its glideins' idle time
    (1200 s), with three jobs submitted: started by the module's first test and checked by its
    last, so that the other tests run while its glideins live out their minute."""
    from types import SimpleNamespace

    from conftest import Daemon, run_gwms

    workdir = tmp_path_factory.mktemp("short-limit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(slurm.conf))
        before = set(slurm.jobs())
        config = slurm_pool_config(workdir, walltime=60)
        pool = start_pool(Daemon, config, workdir)
        try:
            env = {**slurm.env, "GWMS_CONFIG": str(config)}
            cluster = submit(run_gwms, env, workdir / "jobs", 3, "echo ran on $(hostname)")
            yield SimpleNamespace(pool=pool, env=env, before=before, cluster=cluster, workdir=workdir, glideins={})
        finally:
            pool.stop()


def test_glideins_submitted_with_sbatch_join_the_pool_and_run_the_jobs(slurm, short_limit, gwms_cli):
    env, before = short_limit.env, short_limit.before
    done = wait_until(lambda: (h := history(gwms_cli, env, short_limit.cluster)) and len(h) == 3 and h, 90,
                      "the jobs to complete in Slurm glideins")
    assert sorted((j["ProcId"], j["JobStatus"], j["ExitCode"]) for j in done) == [(i, 4, 0) for i in range(3)]
    assert all(j["RemoteHost"].split("@")[1].startswith("hpc-") for j in done), done
    glideins = gwms_jobs(slurm.jobs(), before)
    assert glideins, "no glidein was a Slurm job"
    assert {j["RemoteHost"].split("@")[1] for j in done} <= {name[len("gwms-"):] for name, _ in glideins.values()}
    # The factory asked for a one-minute limit and one CPU.
    for job_id in glideins:
        shown = slurm.command("scontrol", "show", "job", job_id).stdout
        assert "TimeLimit=00:01:00" in shown and "NumCPUs=1" in shown, shown
    short_limit.glideins.update(glideins)


def test_a_glidein_cancelled_with_scancel_is_seen_by_the_factory_and_leaves_the_pool(
        slurm, tmp_path, start_daemon, gwms_cli, env_for, monkeypatch):
    config = slurm_pool_config(tmp_path, walltime=3600, max_glideins=1)
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    before = set(slurm.jobs())
    pool = start_pool(start_daemon, config, tmp_path)
    env = env_for(config)
    cluster = submit(gwms_cli, env, tmp_path / "jobs", 1, "sleep 300")

    def running_job() -> dict | None:
        queue = json.loads(gwms_cli("q", "--json", env=env).stdout or "[]")
        return next((j for j in queue if j["ClusterId"] == cluster and j["JobStatus"] == 2), None)

    job = wait_until(running_job, 90, "the job to run in a Slurm glidein")
    glidein_name = job["RemoteHost"].split("@")[1]
    [job_id] = [i for i, (name, state) in gwms_jobs(slurm.jobs(), before).items() if state == "RUNNING"]
    assert slurm.jobs()[job_id][0] == f"gwms-{glidein_name}"
    # Listening on every interface, the glidein's startd advertises where it reaches the collector from.
    status = ["status", "--json", "--pool", pool.address]
    [slot] = [ad for ad in json.loads(gwms_cli(*status, env=env).stdout) if glidein_name in ad.get("Name", "")]
    assert slot["MyAddress"].startswith("127.0.0.1:"), slot["MyAddress"]
    # An operator cancels it: Slurm TERMs every process of the job, users' job included, and
    # KILLs what is left 5 s (KillWait) later.
    assert slurm.command("scancel", job_id).returncode == 0
    # The factory's next squeue says CANCELLED.
    wait_until(lambda: f"glidein {glidein_name} at hpc finished" in pool.log_text(), 60,
               "the factory to see the scancel")
    line = next(line for line in pool.log_text().splitlines() if f"glidein {glidein_name} at hpc finished" in line)
    assert "CANCELLED" in line
    # Its slot leaves the pool, the job does not stay on it, and the node keeps nothing.
    wait_until(lambda: not any(glidein_name in ad.get("Name", "")
                               for ad in json.loads(gwms_cli(*status, env=env).stdout or "[]")), 60,
               "the cancelled glidein's slot to leave the pool")
    wait_until(lambda: (r := running_job()) is None or r["RemoteHost"] != job["RemoteHost"], 60,
               "the job to leave the cancelled glidein")
    wait_until(lambda: list((tmp_path / "worker").iterdir()) == [], 30, "the node's glidein directory to go")


def test_a_multi_node_slurm_job_starts_one_glidein_per_node(slurm, tmp_path, start_daemon, gwms_cli, env_for,
                                                             monkeypatch):
    config = slurm_pool_config(tmp_path, walltime=3600, nodes=2, max_glideins=1)
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    before = set(slurm.jobs())
    pool = start_pool(start_daemon, config, tmp_path)
    env = env_for(config)
    # Two jobs that overlap: each needs a slot of its own, one per node.
    cluster = submit(gwms_cli, env, tmp_path / "jobs", 2, "sleep 4; echo $_CONDOR_SLOT")
    done = wait_until(lambda: (h := history(gwms_cli, env, cluster)) and len(h) == 2 and h, 90,
                      "the jobs to complete on the two nodes' glideins")
    hosts = sorted(j["RemoteHost"].split("@")[1] for j in done)
    [job_id] = gwms_jobs(slurm.jobs(), before)  # one Slurm job for both glideins
    glidein = slurm.jobs()[job_id][0][len("gwms-"):]
    assert hosts == [f"{glidein}-n0", f"{glidein}-n1"], hosts
    shown = slurm.command("scontrol", "show", "job", job_id).stdout
    assert "NumNodes=2" in shown and "NodeList=n[1-2]" in shown, shown
    area = tmp_path / "run" / "factory" / "slurm" / "hpc"
    outputs = sorted(p.name for p in area.glob(f"{glidein}.node*.out"))
    assert outputs == [f"{glidein}.node0.out", f"{glidein}.node1.out"]
    assert all(f"glidein {glidein}-n{n} " in (area / f"{glidein}.node{n}.out").read_text() for n in (0, 1))
    # The factory removes its glideins gently (TERM to the batch shell, passed on by srun to
    # both nodes' glideins), so they end by themselves: Slurm says COMPLETED, not CANCELLED.
    pool.stop()
    assert slurm.jobs()[job_id][1] == "COMPLETED", slurm.jobs()[job_id]
    assert "glideins did not end in time" not in pool.log_text()


def test_a_slurm_time_limit_shorter_than_the_idle_time_still_ends_the_glideins_cleanly(slurm, short_limit):
    glideins, pool, workdir = short_limit.glideins, short_limit.pool, short_limit.workdir
    assert glideins, "the module's first test did not see the glideins run"
    # The glideins end at the limit less their stop margin (45 s), cleanly: COMPLETED, not TIMEOUT.
    finished = wait_until(lambda: (c := gwms_jobs(slurm.completed(), short_limit.before))
                          and set(glideins) <= set(c) and c, 90, "the Slurm glideins to end")
    assert {finished[i][1] for i in glideins} == {"COMPLETED"}, finished
    # The factory saw them finish with exit code 0 and forgot their files; the node is clean.
    wait_until(lambda: pool.log_text().count("finished (exit code 0) COMPLETED") >= len(glideins), 30,
               "the factory to see the glideins finish")
    assert list((workdir / "worker").iterdir()) == []
    area = workdir / "run" / "factory" / "slurm" / "hpc"
    wait_until(lambda: not list(area.glob("*.sh")), 30, "the factory to forget the glideins' files")
    log = pool.log_text()
    assert "TIMEOUT" not in log and "CANCELLED" not in log
