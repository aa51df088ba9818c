"""Glidein start-up latency, and an idle glidein's resident memory.

Starts a real ``twistd -n gwms-collector`` on 127.0.0.1 (TLS; READ open to all, ADVERTISE_STARTD
for the pilot DN only), publishes an entry's glidein files as the factory does (the stock
validation scripts, the CA, an attributes file) into a store served by ``GlideinFilesResource``
from a child process, and submits glideins with the factory's own code: the options
``gwms.factory.cycle.Factory.glidein_arguments`` gives, handed to the ``local`` grid
(``gwms.plugins.grid_local.LocalGridSubmitter``: its wrapper shell in a new session, the pilot
credential from ``gwms.pool.ensure_credentials`` staged 0600, ``-python`` this Python).

Latency: from the moment the wrapper is started until the glidein's slot ad is in the collector
(this process polls it over one persistent connection every 20 ms, constraint on GLIDEIN_Name).
One warm-up glidein first (it warms the web server, the OS cache and Python's bytecode caches:
"with files already fetched once"), then N measured glideins one after another, each stopped
(SIGTERM to the wrapper, as the local grid removes a glidein) before the next starts.

Where the time goes, per glidein, from the time stamps glidein_startup.sh leaves in its glide
directory (read the moment the ad shows up, before anything is removed; file times are the
kernel's coarse clock, good to a few ms):

* ``shell_start``: the wrapper and the glidein shell start, options, ``mktemp -d``
  (the glide directory's empty ``wheels`` directory)
* ``fetch_verify``: the description and every file fetched (curl) and hashed (``files.list``)
* ``python_check_and_validation``: the attrs file, ``python -c 'import gwms'``, the validation
  scripts in order (the last append to ``glidein_config``); ``last_validation_script`` is the
  last one alone (from when its ``validate.err`` was truncated)
* ``startd_config``: ``python -m gwms.glidein.startd_config`` (``startd.toml``)
* ``twistd_imports_and_construct``: the startd's interpreter, twistd, the gwms-startd plugin's
  imports and the Startd object (its ``execute`` directory)
* ``twistd_to_listening``: from there to the address file (``startd.address``)
* ``first_slot_ad``: from listening to the ad in the collector: UPDATE_DELAY (0.25 s), the TLS
  connection to the collector, the update, and up to one poll interval

Memory: the last measured glidein is kept up, idle (its slot advertised, no job) for
``--settle`` seconds; then VmRSS (and PSS, which splits shared pages between processes) of
every process in its session: the wrapper shell, glidein_startup.sh, the startd (twistd), and
the startd's launcher and wrappers if there are any (the launcher is started on the first job).

At the end every glidein is stopped, then the web server and the collector; any process whose
command line still names the benchmark's directory is killed and counted. Prints one JSON
object.

    python bench/glidein.py [--glideins 5] [--settle 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

TARGET_S = 3.0
POLL_S = 0.02
ENTRY = "bench_entry"
FACTORY = "bench-factory"
CLIENT = "bench-frontend.main"
#: The entry's attributes, as in a factory's [factory.entry.NAME] attributes.
ATTRIBUTES = {"GLIDEIN_Site": "BenchSite", "GLIDEIN_CPUS": 1, "GLIDEIN_MaxMemMBs": 1024}
#: The factory's defaults for an entry (gwms/config.py): max_walltime, max_idle_time,
#: failure_backoff, worker_listen.
MAX_WALLTIME = 86400
MAX_IDLE_TIME = 1200
FAILURE_BACKOFF = 300
WORKER_LISTEN = "127.0.0.1"

COLLECTOR_CONFIG = """
[pool]
name = "bench"
collectors = ["127.0.0.1:9618"]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[security.READ]
allow = ["*"]

[security.DAEMON]
allow = ["{host_dn}"]

[security.NEGOTIATOR]
allow = ["{host_dn}"]

[security.ADVERTISE_STARTD]
allow = ["{pilot_dn}"]

[collector]
listen = "127.0.0.1:0"
address_file = "{work}/collector.address"
sweep_interval = 60
"""

# The factory's web server: GlideinFilesResource over the store, in a process of its own.
WEB_SERVER = """
import sys
from pathlib import Path
from twisted.internet import reactor
from twisted.web.server import Site
from gwms.glidein.files import GlideinFilesResource
port = reactor.listenTCP(0, Site(GlideinFilesResource(Path(sys.argv[1]))), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY")


class GlideinFailed(Exception):
    pass


def proc_status(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return 0


def pss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def cmdline(pid: int | str) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def session_of(pid: int | str) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[3])  # state ppid pgrp session


def session_members(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and session_of(entry.name) == sid:
            out.append(int(entry.name))
    return sorted(out)


def role_of(pid: int, wrapper_pid: int) -> str:
    args = cmdline(pid)
    text = " ".join(args)
    if pid == wrapper_pid:
        return "wrapper_shell"
    if "gwms-startd" in args:
        return "startd"
    if any(a.endswith("glidein_startup.sh") for a in args):
        return "glidein_startup_sh"
    if any(a.endswith("launcher.py") for a in args):
        return "launcher"  # the launcher or one of its forks (a wrapper): same command line
    return text[:80] or f"pid {pid}"


def processes_naming(text: str) -> list[int]:
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me and any(text in a for a in cmdline(entry.name)):
            found.append(int(entry.name))
    return found


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns / 1e9
    except FileNotFoundError:
        return None


def phases(d: Path, submitted: float, seen: float) -> dict[str, Any]:
    """The glidein's phases (seconds), from the time stamps in its glide directory; read
    while the glidein is up (the directory goes when it stops)."""
    glides = sorted(d.glob("glide_*"))
    if len(glides) != 1:
        return {"error": f"expected one glide directory in {d}, found {len(glides)}"}
    g = glides[0]
    marks = [
        ("shell_start", mtime(g / "wheels")),
        ("fetch_verify", mtime(g / "files.list")),
        ("python_check_and_validation", mtime(g / "glidein_config")),
        ("startd_config", mtime(g / "startd.toml")),
        ("twistd_imports_and_construct", mtime(g / "execute")),
        ("twistd_to_listening", mtime(g / "startd.address")),
        ("first_slot_ad", seen),
    ]
    out: dict[str, Any] = {}
    before = submitted
    for name, t in marks:
        if t is None:
            out[name] = None
            continue
        out[name] = round(t - before, 3)
        before = t
    last_start, last_end = mtime(g / "validate.err"), mtime(g / "validate.out")
    if last_start is not None and last_end is not None:
        out["last_validation_script"] = round(last_end - last_start, 3)
    return out


def clean_env() -> dict[str, str]:
    """The node's environment: this one without any proxy (curl would honour it)."""
    return {k: v for k, v in os.environ.items() if k not in PROXY_VARS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glideins", type=int, default=5, help="measured glidein starts (after one warm-up)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds the last glidein stays idle before its memory is read")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up on a glidein after this long")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, store)")
    args = parser.parse_args()

    from gwms.cli.demo import twistd_command, wait_for_file
    from gwms.config import parse_config
    from gwms.glidein.files import startup_script
    from gwms.factory.grid import GlideinSubmission
    from gwms.plugins.grid_local import LocalGridSubmitter
    from gwms.pool import HOST_DN, PILOT_DN, ensure_credentials
    from gwms.protocols.client import Address, ClientSecurity, CollectorList, query_ads

    bench_started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gwms-bench-glidein-"))
    creds = ensure_credentials(work / "creds")
    result: dict[str, Any] = {"glideins": args.glideins, "target_s": TARGET_S}
    background: list[subprocess.Popen[Any]] = []
    glideins: dict[str, subprocess.Popen[bytes]] = {}  # name -> wrapper, until stopped

    try:
        # --- the collector
        config = work / "collector.toml"
        config.write_text(COLLECTOR_CONFIG.format(ca=creds["ca"], cert=creds["cert"], key=creds["key"],
                                                  host_dn=HOST_DN, pilot_dn=PILOT_DN, work=work))
        log = work / "collector.log"
        collector = subprocess.Popen([*twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(log),
                                      "gwms-collector", "--config", str(config)],
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=work)
        background.append(collector)
        collector_address = wait_for_file(work / "collector.address", collector, 30, log)

        # --- the store, published by the factory's own code, and its web server
        from gwms.config import parse_config
        from gwms.factory.cycle import Factory, Request
        from gwms.factory.service import publish_entry_files

        attributes = ", ".join(f"{k} = {json.dumps(v)}" for k, v in ATTRIBUTES.items())
        factory_config = parse_config(
            f'[pool]\nca = "{creds["ca"]}"\n[factory]\nname = "{FACTORY}"\n[factory.entry.{ENTRY}]\n'
            f"attributes = {{ {attributes} }}\nmax_walltime = {MAX_WALLTIME}\nmax_idle_time = {MAX_IDLE_TIME}\n"
            f'failure_backoff = {FAILURE_BACKOFF}\nworker_listen = "{WORKER_LISTEN}"\n', "<bench>")
        store = work / "store"
        descript = publish_entry_files(factory_config, store)[ENTRY]
        web = subprocess.Popen([sys.executable, "-c", WEB_SERVER, str(store)], stdout=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True, env=clean_env(), start_new_session=True)
        background.append(web)
        assert web.stdout is not None
        line = web.stdout.readline()
        if not line.strip().isdigit():
            raise SystemExit(f"the web server did not start (exit {web.wait()})")
        web_url = f"http://127.0.0.1:{int(line)}"

        env = clean_env()
        script = startup_script()
        factory = Factory(None, factory_config, None, {}, None, web_url, "")
        entry = factory.entries[ENTRY]
        entry.description = descript
        request = Request(client=CLIENT, identity=HOST_DN, idle=1, max_glideins=1, remove_excess="NO",
                          collectors=collector_address, trusted=[HOST_DN])

        # The local grid's own code starts the glideins (in a clean environment: no proxy).
        os.environ.clear()
        os.environ.update(env)
        local = LocalGridSubmitter(None, work / "local", script)

        def submit(name: str) -> tuple[Path, float, float]:
            """One glidein, as the factory submits it to the local grid; (its directory, wall and
            perf_counter times of the submission)."""
            wall, t0 = time.time(), time.perf_counter()
            local.submit({"name": ENTRY}, [GlideinSubmission(name, factory.glidein_arguments(entry, request, name),
                                                             creds["pilot"])])
            glideins[name] = local.children[name]
            return work / "local" / ENTRY / name, wall, t0

        from twisted.internet import defer, task

        def failure_text(d: Path, what: str) -> str:
            tail = "".join((d / f).read_text(errors="replace")[-1500:] for f in ("stdout", "stderr")
                           if (d / f).exists())
            return f"glidein {d.name}: {what}\n{tail}"

        @defer.inlineCallbacks
        def start_and_wait(reactor: Any, collectors: Any, name: str) -> Any:
            d, wall, t0 = submit(name)
            polls = 0
            while True:
                ads = yield query_ads(collectors, "Machine", f'GLIDEIN_Name == "{name}"')
                polls += 1
                now_wall, now = time.time(), time.perf_counter()
                if ads:
                    break
                if glideins[name].poll() is not None:
                    raise GlideinFailed(failure_text(d, f"ended with {glideins[name].returncode} before its ad came"))
                if now - t0 > args.timeout:
                    raise GlideinFailed(failure_text(d, f"no slot ad after {args.timeout:g} s"))
                yield task.deferLater(reactor, POLL_S, lambda: None)
            return {"latency_s": round(now - t0, 3), "phases_s": phases(d, wall, now_wall), "polls": polls,
                    "ad": {k: ads[0].get(k) for k in ("Name", "State", "Activity")}}

        @defer.inlineCallbacks
        def stop(reactor: Any, name: str) -> Any:
            """SIGTERM to the wrapper (as LocalGridSubmitter.remove), then wait for it."""
            wrapper = glideins[name]
            d = work / "local" / ENTRY / name
            started = time.perf_counter()
            try:
                os.kill(wrapper.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            while wrapper.poll() is None and time.perf_counter() - started < 60:
                yield task.deferLater(reactor, POLL_S, lambda: None)
            if wrapper.poll() is None:
                os.killpg(wrapper.pid, signal.SIGKILL)
                wrapper.wait()
            took = time.perf_counter() - started
            # The session's last processes may outlive the wrapper by a moment.
            while session_members(wrapper.pid) and time.perf_counter() - started < 10:
                yield task.deferLater(reactor, POLL_S, lambda: None)
            del glideins[name]
            exit_code = (d / "exit_code").read_text().strip() if (d / "exit_code").exists() else None
            return {"stop_s": round(took, 3), "exit_code": exit_code,
                    "glide_dirs_left": len(list(d.glob("glide_*"))),
                    "session_processes_left": len(session_members(wrapper.pid))}

        def memory(name: str) -> dict[str, Any]:
            wrapper = glideins[name]
            procs = []
            for pid in session_members(wrapper.pid):
                procs.append({"role": role_of(pid, wrapper.pid), "pid": pid,
                              "rss_kb": proc_status(pid, "VmRSS"), "pss_kb": pss_kb(pid)})
            by_role: dict[str, int] = {}
            for p in procs:
                by_role[p["role"]] = by_role.get(p["role"], 0) + (p["rss_kb"] or 0)
            return {"processes": procs, "rss_kb_by_role": by_role,
                    "rss_kb_total": sum(p["rss_kb"] or 0 for p in procs),
                    "pss_kb_total": sum(p["pss_kb"] or 0 for p in procs),
                    "launcher_running": any(p["role"] == "launcher" for p in procs)}

        @defer.inlineCallbacks
        def run(reactor: Any) -> Any:
            security = ClientSecurity.from_config(parse_config(
                f'[pool]\nca = "{creds["ca"]}"\ncert = "{creds["cert"]}"\nkey = "{creds["key"]}"\n'))
            collectors = CollectorList(reactor, [Address.parse(collector_address)], security)
            yield query_ads(collectors, "Machine", 'GLIDEIN_Name == "none"')  # the connection, made once
            t = time.perf_counter()
            for _ in range(10):
                yield query_ads(collectors, "Machine", 'GLIDEIN_Name == "none"')
            result["poll_query_ms"] = round((time.perf_counter() - t) * 100, 2)
            try:
                warm = yield start_and_wait(reactor, collectors, "glidein-warmup")
                result["warmup"] = {**warm, **(yield stop(reactor, "glidein-warmup"))}
                runs = []
                for i in range(1, args.glideins + 1):
                    name = f"glidein-{i}"
                    one = yield start_and_wait(reactor, collectors, name)
                    if i == args.glideins:
                        yield task.deferLater(reactor, args.settle, lambda: None)
                        ads = yield query_ads(collectors, "Machine", f'GLIDEIN_Name == "{name}"')
                        result["idle_memory"] = {"glidein": name, "idle_for_s": args.settle,
                                                 "slot": {k: ads[0].get(k) for k in ("State", "Activity")}
                                                 if ads else None, **memory(name)}
                    one.update((yield stop(reactor, name)))
                    runs.append(one)
                result["runs"] = runs
                latencies = [r["latency_s"] for r in runs]
                result["latencies_s"] = latencies
                result["median_s"] = round(statistics.median(latencies), 3)
                result["max_s"] = max(latencies)
                result["meets_target"] = result["max_s"] < TARGET_S
                keys = [k for k in runs[0]["phases_s"] if k != "error"]
                result["phases_median_s"] = {
                    k: round(statistics.median(r["phases_s"][k] for r in runs), 3) for k in keys
                    if all(isinstance(r["phases_s"].get(k), (int, float)) for r in runs)}
            finally:
                collectors.close()
                for name in list(glideins):
                    yield stop(reactor, name)

        try:
            task.react(run, [])
        except SystemExit as e:  # react() always exits; only a failure matters here
            if e.code not in (0, None):
                result["error"] = f"the measurement failed (exit {e.code}); see the traceback above"
    finally:
        for wrapper in glideins.values():  # only after a failure outside the reactor
            if wrapper.poll() is None:
                os.kill(wrapper.pid, signal.SIGTERM)
                try:
                    wrapper.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(wrapper.pid, signal.SIGKILL)
                    wrapper.wait()
        for p in reversed(background):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        time.sleep(0.2)  # what was told to stop has a moment to go
        leftovers = processes_naming(str(work))
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        result["leftover_processes_killed"] = len(leftovers)
        result["bench_seconds"] = round(time.perf_counter() - bench_started, 1)
        if args.keep:
            result["work_dir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
