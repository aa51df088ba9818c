"""Job throughput: N `/bin/true` jobs on a pool of real daemons, from submit to all completed.

Starts collector, negotiator, schedd and a startd with 8 slots on 127.0.0.1 (mutual TLS between
the daemons, fs authentication for the submitting user), submits one cluster of N jobs with
`gwms submit`, and polls the queue until it is empty. Prints JSON: jobs per second, and the
schedd's resident memory per running job (sampled while the slots are busy).

    python bench/throughput.py [--jobs 2000] [--slots 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and of every live descendant (the startd's launcher and its wrappers
    live as long as the startd, so their time is never reaped into the startd's)."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += tree_cpu_seconds(int(child))
            except (FileNotFoundError, ProcessLookupError):
                pass  # ended between the listing and the read
    return total


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Creds:
    def __init__(self, base: Path) -> None:
        from gwms.credentials.ca import init_ca, issue_host

        init_ca(base / "creds")
        self.ca = base / "creds" / "ca.pem"
        self.host_cert, self.host_key = issue_host(base / "creds", "localhost")


def run_rounds(config: Path, schedd_pid: int, rounds: int, submit: Callable[[], None]) -> dict[str, object]:
    """``rounds`` times: submit, then poll the schedd until the queue is empty. Polls from
    this process over one connection (a `gwms q` per poll would start a Python interpreter
    each time and take CPU from the pool being measured). Returns each round's seconds and
    submit time, and (running jobs, schedd RSS) samples."""
    from twisted.internet import defer, task

    from gwms.client import ScheddClient, default_schedd_address
    from gwms.config import load_config
    from gwms.protocols.client import ClientSecurity

    host_config = load_config(config)
    out: dict[str, list] = {"seconds": [], "submit_s": [], "samples": []}

    @defer.inlineCallbacks
    def poll(reactor: object) -> object:
        schedd = ScheddClient(reactor, default_schedd_address(host_config),
                              ClientSecurity.from_config(load_config(config)))
        for _ in range(rounds):
            started = time.perf_counter()
            submit()  # blocking: nothing else runs in this process meanwhile
            out["submit_s"].append(round(time.perf_counter() - started, 3))
            while time.perf_counter() - started < 900:
                counts = yield schedd.summary()
                if counts["Running"]:
                    out["samples"].append((counts["Running"], rss_kb(schedd_pid)))
                if not counts["Count"]:
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            out["seconds"].append(time.perf_counter() - started)
        schedd.close()

    try:
        task.react(poll, [])
    except SystemExit as e:  # react() always exits; only a failure matters here
        if e.code not in (0, None):
            raise
    return out


def memory_per_running_job(n: int, jobdir: Path, env: dict[str, str], schedd_pid: int) -> dict[str, object]:
    """The schedd's resident memory growth per running job: N long jobs on N slots."""
    def queue() -> list[dict[str, object]]:
        q = subprocess.run([sys.executable, "-m", "gwms", "q", "--allusers", "--json"], env=env,
                           capture_output=True, text=True)
        return json.loads(q.stdout or "[]")

    (jobdir / "sleep.sub").write_text(f"executable = /bin/sleep\narguments = 900\ntransfer_executable = false\n"
                                      f"request_memory = 1\nrequest_disk = 1024\nqueue {n}\n")
    baseline = rss_kb(schedd_pid)
    subprocess.run([sys.executable, "-m", "gwms", "submit", str(jobdir / "sleep.sub")], env=env, check=True,
                   capture_output=True)
    after_submit = rss_kb(schedd_pid)
    t0 = time.perf_counter()
    running = 0
    while time.perf_counter() - t0 < 300:
        running = sum(1 for j in queue() if j.get("JobStatus") == 2)
        if running >= n:
            break
        time.sleep(1)  # a benchmark's polling interval
    with_running = rss_kb(schedd_pid)
    subprocess.run([sys.executable, "-m", "gwms", "rm", "--constraint", "true"], env=env, capture_output=True)
    return {"running_jobs": running, "schedd_rss_kb_idle_queue": after_submit, "schedd_rss_kb_baseline": baseline,
            "schedd_rss_kb_running": with_running,
            "schedd_kb_per_running_job": round((with_running - after_submit) / max(running, 1), 1),
            "target_kb_per_running_job": 200}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="submit and run the jobs this many times on the same pool; the figure is the median "
                             "(a shared 2-core machine's speed varies by tens of per cent from minute to minute)")
    parser.add_argument("--profile", metavar="ROLE", default="",
                        help="run this daemon under cProfile; the statistics go to ROLE.prof in the work directory")
    parser.add_argument("--memory-jobs", type=int, default=0,
                        help="instead: run this many long jobs at once and report the schedd's memory per running job")
    args = parser.parse_args()
    if args.memory_jobs:
        args.slots = args.memory_jobs

    from gwms.cli.demo import twistd_command, wait_for_file
    from pool import write_config

    work = Path(tempfile.mkdtemp(prefix="gwms-throughput-"))
    creds = Creds(work)
    procs = {}

    def start(role: str, config: Path, name: str | None = None) -> str:
        name = name or role
        profile = [f"--profile={work / role}.prof", "--profiler=cprofile", "--savestats"] if role == args.profile else []
        procs[role] = subprocess.Popen(
            [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(work / f"{name}.log"), *profile,
             f"gwms-{role}", "--config", str(config)], stdin=subprocess.DEVNULL, start_new_session=True)
        return wait_for_file(work / f"{name}.address", procs[role], 30, work / f"{name}.log")

    options = dict(slots=args.slots, cpus=args.slots, negotiator_interval=5, periodic_interval=300)
    (work / "grid-mapfile").write_text("")
    first = write_config(work / "collector.toml", creds, work, "127.0.0.1:9618", "127.0.0.1:0", **options)
    collector = start("collector", first)
    config = write_config(work / "pool.toml", creds, work, collector, collector, **options)
    for role in ("negotiator", "schedd"):
        start(role, config)
    start("startd", config, "startd-wn1")
    jobdir = work / "jobs"
    jobdir.mkdir()
    (jobdir / "true.sub").write_text(f"executable = /bin/true\ntransfer_executable = false\n"
                                     f"request_memory = 1\nqueue {args.jobs}\n")
    env = {**os.environ, "GWMS_CONFIG": str(config)}
    result: dict[str, object] = {"jobs": args.jobs, "slots": args.slots}
    if args.memory_jobs:
        try:
            result = memory_per_running_job(args.memory_jobs, jobdir, env, procs["schedd"].pid)
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(timeout=60)
            print(json.dumps(result, indent=2))
        return
    try:
        cpu0 = {role: tree_cpu_seconds(p.pid) for role, p in procs.items()}
        rounds = run_rounds(config, procs["schedd"].pid, args.rounds, lambda: subprocess.run(
            [sys.executable, "-m", "gwms", "submit", str(jobdir / "true.sub")], env=env, check=True,
            capture_output=True))
        rates = [round(args.jobs / seconds, 1) for seconds in rounds["seconds"]]
        samples = rounds["samples"]
        result["submit_s"] = rounds["submit_s"]
        result["jobs_per_s"] = statistics.median(rates)
        result["rounds_jobs_per_s"] = rates
        # CPU per job, per daemon and its descendants (the startd's launcher, wrappers and jobs)
        result["cpu_ms_per_job"] = {
            role: round((tree_cpu_seconds(p.pid) - cpu0[role]) * 1000 / (args.jobs * args.rounds), 2)
            for role, p in procs.items()}
        result["schedd_rss_kb"] = rss_kb(procs["schedd"].pid)
        if samples:
            running, rss = max(samples)
            result["schedd_rss_kb_while_running"] = rss
            result["running_jobs_sampled"] = running
        hist = subprocess.run([sys.executable, "-m", "gwms", "history", "--allusers", "--json"], env=env,
                              capture_output=True, text=True)
        done = json.loads(hist.stdout or "[]")
        result["completed"] = sum(1 for j in done if j.get("JobStatus") == 4 and j.get("ExitCode") == 0)
        result["submitted"] = args.jobs * args.rounds
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=30)
        result["targets"] = {"jobs_per_s": 330}
        if args.profile:
            result["profile"] = str(work / f"{args.profile}.prof")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
