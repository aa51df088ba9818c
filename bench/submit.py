"""Job queue benchmark: one durable 100,000-proc submit, reopening it, and a schedd-like churn.

Everything goes through ``gwms.schedd.queue.JobQueue`` directly (no daemon, no network):

* ``submit``: build a cluster ad with the attributes condor_submit typically writes, and one
  proc ad per proc (ProcId, Arguments, Out, Err differ per proc), then ``new_cluster()`` +
  ``submit()``; the time includes building and encoding the ads and the fsynced commit.
* ``reopen``: close, then open the file again (loads and decodes every ad).
* ``churn``: a schedd running short jobs on a few slots.  Each reactor "turn" finishes the
  jobs on every slot (a few attribute updates, COMPLETED, retire into the history: durable),
  starts the next idle jobs (RUNNING plus the attributes a shadow records), and commits once.
  Reported as jobs/s; ``churn_commit_per_event`` is the same work committed after every
  single job event instead (two fsyncs per job), the worst case.

Resident memory (VmRSS) is read from /proc/self/status, in the benchmark process (which also
holds the freed heap of the ads it built) and in a fresh process that only opens the queue
(``reopen_in_fresh_process``: the queue's own footprint).  Prints one JSON object.

    python bench/submit.py [--procs 100000] [--churn-jobs 2000] [--slots 8] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gwms import classads
from gwms.schedd.queue import COMPLETED, RUNNING, JobQueue


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def cluster_ad(cluster_id: int) -> classads.ClassAd:
    """About 25 attributes, as condor_submit writes them for a typical vanilla job."""
    ad = classads.parse_new(
        "["
        f"ClusterId = {cluster_id}; "
        'Owner = "alice"; User = "alice@submit.example.org"; AcctGroup = "cms"; '
        'Cmd = "/home/alice/analysis/run.sh"; Iwd = "/home/alice/analysis"; JobUniverse = 5; '
        'In = "/dev/null"; UserLog = "/home/alice/analysis/jobs.log"; '
        "RequestCpus = 1; RequestMemory = 2048; RequestDisk = 1000000; "
        'Requirements = TARGET.OpSys == "LINUX" && TARGET.Arch == "X86_64" && TARGET.Memory >= RequestMemory '
        "&& TARGET.Disk >= RequestDisk && member(TARGET.GLIDEIN_Site, split(DESIRED_Sites)); "
        "Rank = 0; JobPrio = 0; NiceUser = false; "
        'ShouldTransferFiles = "YES"; WhenToTransferOutput = "ON_EXIT"; TransferInput = "input.tar.gz,config.json"; '
        'x509userproxy = "/tmp/x509up_u1000"; DESIRED_Sites = "T2_US_Nebraska,T2_US_Wisconsin,T2_DE_DESY"; '
        "MaxWallTimeMins = 720; CompletionDate = 0; NumJobStarts = 0; JobLeaseDuration = 2400; "
        'Environment = "ANALYSIS_MODE=full CMSSW_VERSION=13_0_1"; '
        "PeriodicRemove = JobStatus == 5 && time() - EnteredCurrentStatus > 86400"
        "]"
    )
    return ad


def proc_ads(cluster_id: int, procs: int) -> list[classads.ClassAd]:
    ads = []
    for proc in range(procs):
        ad = classads.ClassAd()
        ad["ProcId"] = proc
        ad["Arguments"] = f"--seed {1000 + proc} --events 5000 --output out_{cluster_id}_{proc}.root"
        ad["Out"] = f"logs/job.{cluster_id}.{proc}.out"
        ad["Err"] = f"logs/job.{cluster_id}.{proc}.err"
        ads.append(ad)
    return ads


def reopen_only(path: Path) -> dict[str, object]:
    """Open an existing queue in this (fresh) process: its RSS is the queue's own footprint,
    with none of the freed heap the submitting process keeps."""
    rss_before = rss_mib()
    start = time.perf_counter()
    queue = JobQueue(path)
    elapsed = time.perf_counter() - start
    jobs = len(queue)
    rss_after = rss_mib()
    queue.close()
    return {"jobs": jobs, "open_s": round(elapsed, 3), "rss_mib_before_open": rss_before, "rss_mib_after_open": rss_after}


def bench_reopen_fresh_process(path: Path) -> dict[str, object]:
    output = subprocess.run(
        [sys.executable, __file__, "--reopen-only", str(path)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output)


def bench_submit(path: Path, procs: int) -> dict[str, object]:
    rss_before = rss_mib()
    start = time.perf_counter()
    queue = JobQueue(path)
    opened = time.perf_counter()
    cluster = queue.new_cluster()
    ad = cluster_ad(cluster)
    ads = proc_ads(cluster, procs)
    built = time.perf_counter()
    ids = queue.submit(ad, ads)
    done = time.perf_counter()
    assert len(ids) == procs and len(queue) == procs
    del ads  # what the caller built is not the queue's memory
    rss_queued = rss_mib()
    queue.close()
    closed = time.perf_counter()

    reopen_start = time.perf_counter()
    queue = JobQueue(path)
    reopened = time.perf_counter()
    assert len(queue) == procs
    rss_reopened = rss_mib()
    # A sample of what a schedd does next: query the queue.
    t = time.perf_counter()
    idle = len(queue.ids(status=1))
    ids_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    matched = sum(1 for _ in queue.jobs(f"ProcId % 1000 == 7 && Owner == {classads.quote('alice')}"))
    constraint_s = time.perf_counter() - t
    queue.close()
    fresh = bench_reopen_fresh_process(path)
    return {
        "procs": procs,
        "submit_total_s": round(done - start, 3),
        "submit_build_ads_s": round(built - opened, 3),
        "submit_call_s": round(done - built, 3),
        "close_s": round(closed - done, 3),
        "reopen_s": round(reopened - reopen_start, 3),
        "idle_ids_ms": round(ids_ms, 2),
        "constraint_scan_s": round(constraint_s, 3),
        "constraint_matches": matched,
        "idle": idle,
        "db_bytes": path.stat().st_size,
        "rss_mib_before": rss_before,
        "rss_mib_after_submit": rss_queued,
        "rss_mib_after_reopen": rss_reopened,
        "reopen_in_fresh_process": fresh,
    }


def bench_churn_unbatched(path: Path, jobs: int) -> dict[str, object]:
    """The worst case: a schedd that commits after every single job event (two fsyncs per job)."""
    queue = JobQueue(path)
    cluster = queue.new_cluster()
    ids = queue.submit(cluster_ad(cluster), proc_ads(cluster, jobs))
    start = time.perf_counter()
    for job_id in ids:
        queue.set_status(job_id, RUNNING)
        queue.set(job_id, {"RemoteHost": "slot1@wn1.example.org", "NumJobStarts": 1, "JobCurrentStartDate": int(time.time())})
        queue.commit()
        queue.set(job_id, {"RemoteWallClockTime": 12.0, "RemoteUserCpu": 10.5, "ImageSize": 2048, "ExitCode": 0})
        queue.set_status(job_id, COMPLETED)
        queue.retire([job_id])
    elapsed = time.perf_counter() - start
    queue.close()
    return {"jobs": jobs, "commits": 2 * jobs, "elapsed_s": round(elapsed, 3), "jobs_per_s": round(jobs / elapsed, 1)}


def bench_churn(path: Path, jobs: int, slots: int) -> dict[str, object]:
    queue = JobQueue(path)
    cluster = queue.new_cluster()
    queue.submit(cluster_ad(cluster), proc_ads(cluster, jobs))
    idle = queue.ids(status=1)
    running: list[tuple[int, int]] = []
    turns = 0
    updates = 0
    start = time.perf_counter()
    while idle or running:
        turns += 1
        finished = running
        for job_id in finished:  # what a shadow reports at the end of a job
            queue.set(job_id, {"RemoteWallClockTime": 12.0, "RemoteUserCpu": 10.5, "ImageSize": 2048, "ExitCode": 0})
            queue.set_status(job_id, COMPLETED)
            updates += 2
        if finished:
            queue.retire(finished)  # durable; also commits everything pending
        running = idle[:slots]
        idle = idle[slots:]
        for n, job_id in enumerate(running):  # a claim starts the next job
            queue.set_status(job_id, RUNNING)
            queue.set(job_id, {"RemoteHost": f"slot{n + 1}@wn1.example.org", "NumJobStarts": 1, "JobCurrentStartDate": int(time.time())})
            updates += 2
        queue.commit()  # once per reactor turn
    elapsed = time.perf_counter() - start
    assert len(queue) == 0
    history = sum(1 for _ in queue.history(limit=jobs))
    queue.close()
    return {
        "jobs": jobs,
        "slots": slots,
        "turns": turns,
        "update_calls": updates,
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(jobs / elapsed, 1),
        "history_rows": history,
    }


SCHEDD_ONLY = """
[pool]
name = "bench"
collectors = ["127.0.0.1:1"]
[security.READ]
allow = ["*"]
[security.WRITE]
allow_regex = ["fs:.*"]
[schedd]
listen = "127.0.0.1:0"
unix_socket = "{dir}/schedd.sock"
spool = "{dir}/spool"
address_file = "{dir}/schedd.address"
update_interval = 3600
"""


def bench_gwms_submit(directory: Path, procs: int) -> dict[str, object]:
    """End to end: `gwms submit` of one cluster of ``procs`` jobs to a real schedd over its UNIX
    socket (fs authentication); timed from the command's start to its exit, which is after the
    schedd acknowledged the durable commit. Nothing else runs (no collector: its updates fail)."""
    from gwms.cli.demo import start_daemon, wait_for_file

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    config = directory / "schedd.toml"
    config.write_text(SCHEDD_ONLY.format(dir=directory))
    log = directory / "schedd.log"
    proc = start_daemon("schedd", config, log)
    try:
        wait_for_file(directory / "schedd.address", proc, 30, log)
        sub = directory / "big.sub"
        sub.write_text("executable = /bin/true\narguments = $(Process)\noutput = out.$(Process)\n"
                       f"request_memory = 1\nqueue {procs}\n")
        env = {**os.environ, "GWMS_SCHEDD": f"unix:{directory}/schedd.sock"}
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "gwms", "submit", str(sub)], env=env, capture_output=True,
                              text=True)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"gwms submit failed: {done.stderr}")
        return {"procs": procs, "seconds": round(elapsed, 2), "jobs_per_s": round(procs / elapsed),
                "schedd_rss_mib": round(int(next(line.split()[1] for line in Path(f"/proc/{proc.pid}/status")
                                                  .read_text().splitlines() if line.startswith("VmRSS:"))) / 1024, 1),
                "output": done.stdout.strip()}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=100_000)
    parser.add_argument("--churn-jobs", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=None, help="where the database files go (default: a temporary directory)")
    parser.add_argument("--reopen-only", type=Path, default=None, help=argparse.SUPPRESS)  # the fresh-process half
    args = parser.parse_args()
    if args.reopen_only is not None:
        print(json.dumps(reopen_only(args.reopen_only)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "submit": bench_submit(Path(tmp) / "submit.db", args.procs),
            "churn": bench_churn(Path(tmp) / "churn.db", args.churn_jobs, args.slots),
            "churn_commit_per_event": bench_churn_unbatched(Path(tmp) / "unbatched.db", args.churn_jobs),
            "gwms_submit_end_to_end": bench_gwms_submit(Path(tmp), args.procs),
            "targets": {"gwms_submit_end_to_end_seconds": 10},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
