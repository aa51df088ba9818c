"""Collector benchmark: authenticated ad updates per second, and constraint-query latency.

Starts a real ``twistd -n gwms-collector`` on 127.0.0.1 with a test CA, opens 200 persistent
mutual-TLS connections (x509 host certificate) with the gwms client library, and keeps a window
of updates in flight on each for a fixed time; then loads 10,000 slot ads and times a constraint
query over them. Prints one JSON object.

    python bench/collector.py [--seconds 10] [--connections 200] [--ads 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

CONFIG = """
[pool]
name = "bench"
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[security.READ]
allow = ["*"]

[security.DAEMON]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[security.NEGOTIATOR]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[collector]
listen = "127.0.0.1:0"
address_file = "collector.address"
sweep_interval = 60
"""

SLOT = ('[MyType = "Machine"; Name = "slot{i}@wn{host}.example.org"; Machine = "wn{host}.example.org"; '
        'OpSys = "LINUX"; Arch = "X86_64"; State = "Unclaimed"; Activity = "Idle"; Cpus = {cpus}; '
        'Memory = {mem}; Disk = 100000000; LoadAvg = 0.0; KeyboardIdle = 1000; '
        'Start = TARGET.RequestMemory <= MY.Memory; Rank = 0; SlotType = "Static"; '
        'GLIDEIN_Site = "Site_{site}"; GLIDEIN_Entry_Name = "entry_{site}"; GLIDEIN_Factory = "factory"; '
        'GLIDEIN_Name = "v1"; GLIDEIN_ClusterId = {i}; GLIDEIN_Max_Walltime = 172800; '
        'TotalCpus = 8; TotalMemory = 16000; UidDomain = "example.org"; FileSystemDomain = "example.org"; '
        'StartdIpAddr = "<10.0.{host_hi}.{host_lo}:9618>"; UpdateSequenceNumber = {i}; '
        'ClaimId = "<10.0.0.1:9618>#1#1#abcdef0123456789"; ClassAdLifetime = 900]')


def slot(i: int) -> str:
    host = i // 8
    return SLOT.format(i=i, host=host, cpus=1 + i % 8, mem=1024 * (1 + i % 16), site=i % 50,
                       host_hi=(host // 250) % 250, host_lo=host % 250)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--window", type=int, default=16, help="updates in flight per connection")
    parser.add_argument("--ads", type=int, default=10_000)
    args = parser.parse_args()

    from twisted.internet import defer, reactor, task

    from gwms import classads
    from gwms.cli.demo import start_daemon, wait_for_file
    from gwms.config import parse_config
    from gwms.credentials.ca import init_ca, issue_host
    from gwms.protocols.client import Address, ClientSecurity, connect
    from gwms.protocols.messages import Limits

    work = Path(tempfile.mkdtemp(prefix="gwms-bench-"))
    init_ca(work / "creds")
    cert, key = issue_host(work / "creds", "localhost")
    config = work / "collector.toml"
    config.write_text(CONFIG.format(ca=work / "creds" / "ca.pem", cert=cert, key=key))
    log = work / "collector.log"
    proc = start_daemon("collector", config, log)
    address = Address.parse(wait_for_file(work / "collector.address", proc, 30, log))
    security = ClientSecurity.from_config(parse_config(
        f'[pool]\nca = "{work / "creds" / "ca.pem"}"\ncert = "{cert}"\nkey = "{key}"\n'))
    bodies = [classads.encode(classads.parse_new(slot(i))) for i in range(args.ads)]
    result: dict[str, object] = {"connections": args.connections, "window": args.window, "ads": args.ads}

    @defer.inlineCallbacks
    def run() -> object:
        started = time.perf_counter()
        conns = yield defer.gatherResults([connect(reactor, address, "ADVERTISE_STARTD", security,
                                                   Limits(), connect_timeout=30)
                                           for _ in range(args.connections)])
        result["handshakes_s"] = round(time.perf_counter() - started, 3)
        # Load every ad once, so that the timed phase replaces ads as a live pool does.
        yield defer.gatherResults([conns[i % len(conns)].call("UPDATE", b) for i, b in enumerate(bodies)])
        done = [0]
        failed = [0]
        stop_at = [0.0]
        counter = iter(range(10**12))

        def pump(conn: object) -> defer.Deferred[None]:
            finished: defer.Deferred[None] = defer.Deferred()
            in_flight = [0]

            def send() -> None:
                while in_flight[0] < args.window and time.perf_counter() < stop_at[0]:
                    in_flight[0] += 1
                    conn.call("UPDATE", bodies[next(counter) % len(bodies)]).addCallbacks(ok, bad)
                if in_flight[0] == 0 and not finished.called:
                    finished.callback(None)

            def ok(_: object) -> None:
                done[0] += 1
                in_flight[0] -= 1
                send()

            def bad(f: object) -> None:
                failed[0] += 1
                in_flight[0] -= 1
                send()

            send()
            return finished

        stop_at[0] = time.perf_counter() + args.seconds
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(proc.pid)
        yield defer.gatherResults([pump(c) for c in conns])
        elapsed = time.perf_counter() - t0
        # Near 1.0 means the collector (one process, one core) was the bottleneck.
        result["collector_cpu_share"] = round((cpu_seconds(proc.pid) - cpu0) / elapsed, 2)
        result["updates"] = done[0]
        result["update_errors"] = failed[0]
        result["updates_per_s"] = round(done[0] / elapsed)
        result["collector_rss_kb"] = rss_kb(proc.pid)

        query = classads.parse_new('[TargetType = "Machine"; Requirements = Cpus >= 4 && Memory > 8192 '
                                   '&& regexp("^Site_1", GLIDEIN_Site)]')
        reader = yield connect(reactor, address, "READ", security)
        latencies = []
        matched = 0
        for _ in range(5):
            t = time.perf_counter()
            final, items = yield reader.call("QUERY", query, stream=True)
            latencies.append(time.perf_counter() - t)
            matched = final["Count"]
        full = []
        for _ in range(3):
            t = time.perf_counter()
            final, items = yield reader.call("QUERY", classads.parse_new('[TargetType = "Machine"]'), stream=True)
            full.append(time.perf_counter() - t)
        result["stored_ads"] = final["Count"]
        result["query_matched"] = matched
        result["query_latency_s"] = {"median": round(sorted(latencies)[2], 4), "max": round(max(latencies), 4)}
        result["query_all_latency_s"] = {"median": round(sorted(full)[1], 4), "max": round(max(full), 4)}
        for c in conns + [reader]:
            c.close()
        return None

    def main_task(_reactor: object) -> object:
        return run()

    try:
        task.react(main_task, [])
    except SystemExit:
        pass
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        result["targets"] = {"updates_per_s": 10_000, "query_latency_s": 0.5}
        result["meets_targets"] = bool(result.get("updates_per_s", 0) >= 10_000
                                       and result.get("query_latency_s", {}).get("max", 9) < 0.5)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
