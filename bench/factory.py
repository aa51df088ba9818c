"""One factory cycle with 100 entries, 10 frontends and 10,000 tracked glideins (fake grid).

The factory (``gwms.factory.service.Factory``) runs against an in-memory glidein collector
(``gwms.testing.network.MemoryNetwork``: real message framing, no sockets) and the fake grid
plugin (``gwms.testing.grid.FakeGridSubmitter``), so what is measured is the factory's own work:
reading 1,000 request ads, one status query per entry over 10,000 glideins, the limits and the
submit arithmetic, the SQLite records, and advertising 100 entry ads and 1,000 monitoring ads.
Prints JSON.

    python bench/factory.py [--entries 100] [--frontends 10] [--glideins 10000] [--cycles 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config_text(work: Path, entries: int, frontends: int) -> str:
    from gwms.testing.network import TEST_SECURITY

    allowed = ", ".join(f'"frontend{i}"' for i in range(frontends))
    text = TEST_SECURITY + f"""
[pool]
collectors = ["glidein-collector.memory:9620"]
[security.READ]
allow = ["*"]
[security.ADVERTISE_FACTORY]
allow = ["factory"]
[security.ADVERTISE_FRONTEND]
allow = [{allowed}]
[collector]
max_ads = 10000000
[factory]
name = "bench-factory"
work_dir = "{work}"
cycle_interval = 60
"""
    for e in range(entries):
        text += f"""
[factory.entry.entry{e:03d}]
grid = "fake"
attributes = {{ GLIDEIN_Site = "Site{e:03d}", GLIDEIN_CPUS = 8 }}
allowed_frontends = [{allowed}]
max_glideins = 1000
max_idle = 500
submit_rate = 600
"""
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--frontends", type=int, default=10)
    parser.add_argument("--glideins", type=int, default=10000)
    parser.add_argument("--cycles", type=int, default=5)
    args = parser.parse_args()

    from twisted.internet import defer
    from twisted.internet.testing import MemoryReactorClock

    from gwms import classads
    from gwms.collector.service import Collector
    from gwms.config import parse_config
    from gwms.factory.grid import QUEUED, RUNNING, GridStatus
    from gwms.factory.records import Glidein, GlideinRecords
    from gwms.factory.cycle import Factory
    from gwms.protocols.client import Address, CollectorList
    from gwms.protocols.messages import Limits, MessageServerFactory
    from gwms.testing.grid import FakeGridSubmitter
    from gwms.testing.network import MemoryNetwork, memory_client_security, memory_security

    work = Path(tempfile.mkdtemp(prefix="gwms-bench-factory-"))
    config = parse_config(config_text(work, args.entries, args.frontends), "<bench>", base=work)
    clock = MemoryReactorClock()
    clock.advance(1_700_000_000)
    net = MemoryNetwork(clock)
    collector = Collector(clock, config.section("collector"), "glidein-collector")
    net.listen("glidein-collector.memory:9620",
               MessageServerFactory(clock, memory_security(config), collector.commands(), Limits()))

    def collectors(identity: str) -> CollectorList:
        return CollectorList(clock, [Address(host="glidein-collector.memory", port=9620)],
                             memory_client_security(config, identity), connector=net.connector)

    def run(d: defer.Deferred) -> object:
        out: list = []
        d.addBoth(out.append)
        while not out:
            net.flush(rounds=1000)
            clock.advance(0)
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    # Every frontend asks every entry: 1,000 request ads.
    entries = sorted(config.section("factory")["entry"])
    requests = []
    for f in range(args.frontends):
        frontend = collectors(f"frontend{f}")
        for name in entries:
            ad = classads.ClassAd()
            for key, value in (("MyType", "glideclient"), ("Name", f"{name}@bench-factory@frontend{f}.main"),
                               ("ClientName", f"frontend{f}.main"), ("ReqFactory", "bench-factory"),
                               ("ReqEntry", name), ("ReqName", f"{name}@bench-factory"), ("ReqIdleGlideins", 5),
                               ("ReqMaxGlideins", 50), ("ReqRemoveExcess", "NO"),
                               ("GLIDEIN_Collector", "pool.example:9618"), ("GLIDEIN_Trusted", ["/CN=schedd"])):
                ad[key] = value
            requests.append(frontend.advertise(ad, "ADVERTISE_FRONTEND"))
    run(defer.gatherResults(requests))

    # 10,000 glideins already tracked, spread over entries and frontends, most of them running.
    grid = FakeGridSubmitter()
    records = GlideinRecords(work / "factory.db")
    now = clock.seconds()
    tracked = []
    for i in range(args.glideins):
        entry = entries[i % len(entries)]
        frontend = (i // len(entries)) % args.frontends
        grid_id = f"fake.pre.{i}"
        state = RUNNING if i % 10 else QUEUED
        grid.glideins[grid_id] = GridStatus(state)
        tracked.append(Glidein(f"{entry}-pre{i}", entry, f"frontend{frontend}.main", f"frontend{frontend}", now,
                               state=state, grid_id=grid_id, changed=now))
    records.add(tracked)
    factory = Factory(clock, config, records, {"fake": grid}, collectors("factory"), "http://factory.bench/",
                      "PUBLIC KEY")
    for entry in factory.entries.values():
        entry.description = "0" * 64

    timings = []
    submitted_before = 0
    for _ in range(args.cycles):
        clock.advance(60)
        started = time.perf_counter()
        run(factory.cycle())
        timings.append(time.perf_counter() - started)
        submitted_before = len(grid.submissions)
    queries = [c for c in grid.calls if c[0] == "query"]
    result = {
        "entries": args.entries, "frontends": args.frontends, "glideins_tracked": len(records.glideins),
        "request_ads": len(requests), "cycles": args.cycles,
        "cycle_seconds": [round(t, 3) for t in timings],
        "median_cycle_seconds": round(statistics.median(timings), 3),
        "max_cycle_seconds": round(max(timings), 3),
        "status_queries_per_cycle": len(queries) // args.cycles,
        "glideins_submitted": submitted_before,
        "ads_in_glidein_collector": collector.store.count,
        "target_cycle_seconds": 1.0,
    }
    records.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
