"""``gwms demo``: a whole pool on this host, running jobs only in glideins.

The demo writes a one-host configuration (like conf/onehost.toml, with short intervals) into a
directory of its own, starts ``twistd -n gwms-pool`` (collector, negotiator, schedd, glidein
collector, factory with two ``local`` entries, frontend, web server; the credentials are made
on the first start), submits a sample workload (jobs with an input file and output files),
shows live progress (glideins requested, idle and running; jobs idle, running and done), checks
the outputs, prints a summary and shuts the pool down, glideins included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gwms.cli import UsageError

ONEHOST = """\
# A one-host pool, written by `gwms demo` (conf/onehost.toml is the annotated original).
[pool]
name = "demo"
collectors = ["127.0.0.1:{port}"]
audit_log = "run/audit.jsonl"

[security]
methods = ["x509", "token", "fs"]

[security.READ]
authentication = "OPTIONAL"
encryption = "OPTIONAL"
allow = ["*"]

[security.WRITE]
allow_regex = ["fs:.*"]

[security.ADMINISTRATOR]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[security.DAEMON]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[security.NEGOTIATOR]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[security.ADVERTISE_STARTD]
allow = ["/O=gwms/OU=Pilots/CN=glidein"]

[security.ADVERTISE_FACTORY]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[security.ADVERTISE_FRONTEND]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[onehost]
glidein_collector_listen = "127.0.0.1:0"
glidein_collector_address_file = "run/glidein-collector.address"
credentials = "run/credentials"

[collector]
listen = "127.0.0.1:{port}"
address_file = "run/collector.address"

[negotiator]
listen = "127.0.0.1:0"
interval = 10
min_interval = 1
priorities = "run/priorities.json"

[schedd]
listen = "127.0.0.1:0"
unix_socket = "run/schedd.sock"
spool = "run/spool"
address_file = "run/schedd.address"
update_interval = 5

[factory]
name = "demo-factory"
work_dir = "run/factory"
cycle_interval = 2

[factory.entry.siteA]
grid = "local"
attributes = {{ GLIDEIN_Site = "SiteA", GLIDEIN_CPUS = 2, GLIDEIN_MaxMemMBs = 1024 }}
allowed_frontends = ["/O=gwms/OU=Hosts/CN=localhost"]
max_idle = 2
max_glideins = 3
max_walltime = 3600
max_idle_time = {idle}
failure_backoff = 5

[factory.entry.siteB]
grid = "local"
attributes = {{ GLIDEIN_Site = "SiteB", GLIDEIN_CPUS = 1, GLIDEIN_MaxMemMBs = 512 }}
allowed_frontends = ["/O=gwms/OU=Hosts/CN=localhost"]
max_idle = 2
max_glideins = 3
max_walltime = 3600
max_idle_time = {idle}
failure_backoff = 5

[frontend]
name = "demo-frontend"
trusted = ["/O=gwms/OU=Hosts/CN=localhost"]
cycle_interval = 2

[frontend.group.main]
match = 'ifThenElse(isUndefined(MY.DESIRED_Sites), true, stringListMember(TARGET.GLIDEIN_Site, MY.DESIRED_Sites))'
idle_per_entry = 2
"""

JOB_SCRIPT = """#!/bin/sh
# A demo job: reads its input file, works a little, writes a result file and to stdout.
words=$(wc -w < input.txt)
sleep 2
echo "job $1 on $(hostname) in glidein slot $_CONDOR_SLOT: input has $words words" > "result.$1.txt"
echo "job $1 done"
"""

SUBMIT = """\
# The demo workload: {n} jobs, each with an input file and an output file.
executable = demo_job.sh
arguments = $(Process)
transfer_input_files = input.txt
transfer_output_files = result.$(Process).txt
output = job.$(Process).out
error = job.$(Process).err
log = demo.log
request_memory = 100
request_disk = 10000
queue {n}
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="run a whole one-host pool with glideins and a sample workload",
                              description=__doc__)
    p.add_argument("--dir", type=Path, help="where to keep credentials, configuration, jobs and logs "
                                            "(default: a new temporary directory)")
    p.add_argument("--port", type=int, default=0, help="collector port (default: any free port)")
    p.add_argument("--jobs", type=int, default=6, help="how many jobs to submit (default 6)")
    p.add_argument("--idle", type=float, default=30.0,
                   help="seconds a glidein waits for a job before it exits (default 30)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the pool running until Ctrl-C")
    p.set_defaults(func=run)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(directory: Path, port: int = 0, idle: float = 30.0) -> Path:
    """The demo pool's configuration in ``directory``; returns its path. The collector gets a
    fixed port (a free one unless ``port``) so that every tool finds it in [pool] collectors."""
    port = port or free_port()
    (directory / "run").mkdir(parents=True, exist_ok=True)
    config = directory / "onehost.toml"
    config.write_text(ONEHOST.format(port=port, idle=idle))
    return config


def twistd_command() -> list[str]:
    """How to run twistd with this Python (the venv's script if there is one)."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def start_daemon(role: str, config: Path, log_file: Path) -> subprocess.Popen[bytes]:
    """``twistd -n gwms-<role> --config FILE`` as a child process, logging to ``log_file``."""
    return subprocess.Popen(
        [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(log_file),
         f"gwms-{role}", "--config", str(config)],
        stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for_file(path: Path, process: subprocess.Popen[bytes], deadline_s: float, log_file: Path) -> str:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            raise UsageError(f"the daemon exited with status {process.returncode}; see {log_file}:\n"
                             + log_file.read_text()[-2000:] if log_file.exists() else "")
        time.sleep(0.05)
    raise UsageError(f"the daemon did not start listening within {deadline_s:g} s; see {log_file}")


def _gwms(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "gwms", *args], env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise UsageError(f"gwms {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def progress(env: dict[str, str], cluster: int) -> dict[str, int]:
    """Glideins (factory status) and jobs (the queue and the history) right now."""
    factory = json.loads(_gwms(env, "factory", "status", "--json").stdout or "[]")
    totals = [row for row in factory if row["client"] == "(all)"]
    # The history first: a job that ends between the two queries is then missed once, not
    # counted twice.
    done = json.loads(_gwms(env, "history", str(cluster), "--json").stdout or "[]")
    queue = json.loads(_gwms(env, "q", str(cluster), "--json").stdout or "[]")
    return {"requested": sum(int(r["requested"]) for r in totals), "glidein_idle": sum(int(r["idle"]) for r in totals),
            "glidein_running": sum(int(r["running"]) for r in totals),
            "idle": sum(1 for j in queue if j.get("JobStatus") == 1),
            "running": sum(1 for j in queue if j.get("JobStatus") == 2),
            "held": sum(1 for j in queue if j.get("JobStatus") == 5),
            "done": len(done), "ok": sum(1 for j in done if j.get("JobStatus") == 4 and j.get("ExitCode") == 0)}


def glidein_processes(directory: Path) -> list[int]:
    """Processes whose command line names the demo factory's glidein area (glideins and
    their startds)."""
    found = []
    needle = os.fsencode(str(directory / "run" / "factory"))
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def run(args: argparse.Namespace) -> int:
    directory = (args.dir or Path(tempfile.mkdtemp(prefix="gwms-demo-"))).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    print(f"gwms demo: configuration, credentials, jobs and logs in {directory}")
    config = prepare(directory, args.port, args.idle)
    for name in ("collector.address", "schedd.address", "glidein-collector.address"):
        (directory / "run" / name).unlink(missing_ok=True)
    log_file = directory / "run" / "pool.log"
    pool = start_daemon("pool", config, log_file)
    env = {**os.environ, "GWMS_CONFIG": str(config)}
    started = time.monotonic()
    try:
        collector = wait_for_file(directory / "run" / "collector.address", pool, 60, log_file)
        wait_for_file(directory / "run" / "schedd.address", pool, 60, log_file)
        wait_for_file(directory / "run" / "glidein-collector.address", pool, 60, log_file)
        print(f"gwms demo: `twistd -n gwms-pool` is up (pid {pool.pid}); pool collector {collector}; "
              f"a factory with entries siteA and siteB on the local grid; a frontend")
        jobs = directory / "jobs"
        jobs.mkdir(exist_ok=True)
        (jobs / "input.txt").write_text("the quick brown fox jumps over the lazy dog\n")
        (jobs / "demo_job.sh").write_text(JOB_SCRIPT)
        (jobs / "demo_job.sh").chmod(0o755)
        (jobs / "demo.sub").write_text(SUBMIT.format(n=args.jobs))
        submitted = _gwms(env, "submit", str(jobs / "demo.sub")).stdout.strip()
        print(f"$ gwms submit {jobs / 'demo.sub'}\n{submitted}")
        cluster = int(submitted.rstrip(".").rsplit(" ", 1)[-1])
        last = None
        while True:
            now = progress(env, cluster)
            line = (f"[{time.monotonic() - started:5.1f}s] glideins: requested {now['requested']}, "
                    f"idle {now['glidein_idle']}, running {now['glidein_running']} | jobs: {now['idle']} idle, "
                    f"{now['running']} running, {now['done']}/{args.jobs} done")
            if line.split("] ", 1)[1] != last:
                print(line, flush=True)
                last = line.split("] ", 1)[1]
            if now["done"] >= args.jobs or now["held"]:
                break
            if time.monotonic() - started > args.timeout:
                raise UsageError(f"the jobs did not finish within {args.timeout:g} s; see {log_file}")
            time.sleep(1)  # the demo's refresh interval
        results = sorted(jobs.glob("result.*.txt"))
        print(f"\ngwms demo: {now['ok']}/{args.jobs} jobs completed with exit code 0 in "
              f"{time.monotonic() - started:.1f} s; {len(results)} result files came back:")
        for path in results:
            print(f"  {path.name}: {path.read_text().strip()}")
        print(f"\n$ gwms history {cluster}")
        print(_gwms(env, "history", str(cluster)).stdout.rstrip())
        print("\n$ gwms factory status")
        print(_gwms(env, "factory", "status").stdout.rstrip())
        print(f"\nEvent log: {jobs / 'demo.log'}; daemon log: {log_file}; audit: {directory / 'run' / 'audit.jsonl'}")
        if args.keep:
            print(f"gwms demo: the pool keeps running; try GWMS_CONFIG={config} gwms status. Ctrl-C stops it.")
            pool.wait()
        if now["ok"] != args.jobs:
            return 1
    except KeyboardInterrupt:
        pass
    finally:
        if pool.poll() is None:
            os.killpg(pool.pid, signal.SIGTERM)
            try:
                pool.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(pool.pid, signal.SIGKILL)
        left = glidein_processes(directory)
        print(f"gwms demo: pool stopped; {len(left)} glidein processes left" +
              (f" ({left})" if left else ""))
    return 0
