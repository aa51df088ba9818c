"""``gwms factory status`` and ``gwms frontend status``: what glideinWMS operators get from
analyze_entries and the frontend's monitoring, read from the glidein collector.

``factory status``: per entry (and per frontend at each entry) the glideins requested, idle,
running and held, from the factory's glidefactory and glidefactoryclient ads. ``frontend
status``: per group and entry the idle jobs that match, the effective idle jobs, the request
and why it was curbed, from the frontend's glideclient ads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

from gwms import classads
from gwms.cli import UsageError
from gwms.cli.status import add_pool_arguments, client_setup


def register(subparsers: Any) -> None:
    for role, doc in (("factory", "the factory's entries and glideins (requested, idle, running, held)"),
                      ("frontend", "the frontend's requests: matching jobs and glideins per group and entry")):
        p = subparsers.add_parser(role, help=f"{role} tools", description=__doc__)
        sub = p.add_subparsers(dest="action", required=True)
        s = sub.add_parser("status", help=doc, description=doc)
        add_pool_arguments(s)
        s.add_argument("--json", action="store_true", help="the rows as JSON")
        s.set_defaults(func=run, role=role)


def glidein_collector_addresses(args: argparse.Namespace) -> list[Any]:
    """Where the glidein collector is: --pool, else the configuration's [factory] collectors,
    [frontend] glidein_collectors, or gwms-pool's [onehost] glidein collector."""
    from gwms.config import ConfigError, load_config
    from gwms.protocols.client import Address

    if args.pool or not args.config:
        return client_setup(args)[1]
    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    found = config.section("factory")["collectors"] or config.section("frontend")["glidein_collectors"]
    if found:
        return [Address(host=h, port=p) for h, p in found]
    onehost = config.section("onehost")
    address_file = onehost["glidein_collector_address_file"]
    if address_file is not None and Path(address_file).exists():
        return [Address.parse(Path(address_file).read_text().strip())]
    host, port = onehost["glidein_collector_listen"]
    return [Address(host=host, port=port)]


def fetch(args: argparse.Namespace, ad_types: Sequence[str]) -> dict[str, list[classads.ClassAd]]:
    from twisted.internet import defer, task

    from gwms.protocols.client import CollectorList, query_ads
    from gwms.protocols.messages import CommandError, ConnectionFailed

    security, _ = client_setup(args)
    addresses = glidein_collector_addresses(args)
    result: dict[str, Any] = {}

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        collectors = CollectorList(reactor, addresses, security)
        try:
            for ad_type in ad_types:
                result[ad_type] = yield query_ads(collectors, ad_type)
        except (ConnectionFailed, CommandError) as e:
            result["error"] = str(e)
        finally:
            collectors.close()

    try:
        task.react(main, [])
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    if "error" in result:
        raise UsageError(f"cannot read the glidein collector: {result['error']}")
    return result


def factory_rows(entries: list[classads.ClassAd], clients: list[classads.ClassAd],
                 requests: Sequence[classads.ClassAd] = ()) -> list[dict[str, Any]]:
    """One row per entry (all frontends) and one per frontend at each entry; ``requests`` (the
    frontends' glideclient ads) add the idle jobs that match there."""
    jobs = {(r.get("ReqName"), r.get("ClientName")): int(r.get("MatchingIdleJobs", 0) or 0) for r in requests}
    rows = []
    for entry in sorted(entries, key=lambda ad: str(ad.get("Name"))):
        name, factory = entry.get("EntryName"), entry.get("FactoryName")
        mine = [c for c in clients if c.get("ReqEntry") == name and c.get("ReqFactory") == factory]
        rows.append({"entry": name, "factory": factory, "client": "(all)",
                     "matching_jobs": sum(n for (req, _client), n in jobs.items() if req == f"{name}@{factory}"),
                     "enabled": entry.get("GlideinEnabled", True),
                     "site": entry.get("GLIDEIN_Site", ""),
                     "requested": sum(int(c.get("GlideinMonitorRequestedIdle", 0)) for c in mine),
                     "idle": entry.get("GlideinMonitorTotalStatusIdle", 0),
                     "running": entry.get("GlideinMonitorTotalStatusRunning", 0),
                     "held": entry.get("GlideinMonitorTotalStatusHeld", 0)})
        for c in sorted(mine, key=lambda ad: str(ad.get("ReqClientName"))):
            rows.append({"entry": name, "factory": factory, "client": c.get("ReqClientName"),
                         "matching_jobs": jobs.get((f"{name}@{factory}", c.get("ReqClientName")), 0),
                         "enabled": entry.get("GlideinEnabled", True), "site": entry.get("GLIDEIN_Site", ""),
                         "requested": c.get("GlideinMonitorRequestedIdle", 0),
                         "idle": c.get("GlideinMonitorStatusIdle", 0),
                         "running": c.get("GlideinMonitorStatusRunning", 0),
                         "held": c.get("GlideinMonitorStatusHeld", 0)})
    return rows


def frontend_rows(requests: list[classads.ClassAd]) -> list[dict[str, Any]]:
    rows = []
    for ad in sorted(requests, key=lambda ad: (str(ad.get("ClientName")), str(ad.get("ReqName")))):
        rows.append({"group": ad.get("ClientName"), "entry": ad.get("ReqName"),
                     "matching_idle_jobs": ad.get("MatchingIdleJobs", 0),
                     "effective_idle_jobs": round(float(ad.get("EffectiveIdleJobs", 0.0)), 2),
                     "running_jobs": ad.get("RunningJobs", 0),
                     "req_idle": ad.get("ReqIdleGlideins", 0), "req_max": ad.get("ReqMaxGlideins", 0),
                     "remove_excess": ad.get("ReqRemoveExcess", ""),
                     "factory_idle": ad.get("FactoryIdleGlideins"), "factory_running": ad.get("FactoryRunningGlideins"),
                     "factory_held": ad.get("FactoryHeldGlideins"),
                     "pool_unclaimed": ad.get("PoolUnclaimedGlideins", 0), "curbed_by": ad.get("CurbReason", "")})
    return rows


def table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]], out: TextIO) -> None:
    cells = [[title for _key, title in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else str(row.get(key)) for key, _title in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")


FACTORY_COLUMNS = [("entry", "Entry"), ("site", "Site"), ("client", "Frontend"), ("enabled", "Enabled"),
                   ("matching_jobs", "IdleJobs"), ("requested", "ReqIdle"), ("idle", "Idle"), ("running", "Running"),
                   ("held", "Held")]
FRONTEND_COLUMNS = [("group", "Group"), ("entry", "Entry"), ("matching_idle_jobs", "IdleJobs"),
                    ("effective_idle_jobs", "Effective"), ("running_jobs", "RunJobs"), ("req_idle", "ReqIdle"),
                    ("req_max", "ReqMax"), ("factory_idle", "GlIdle"), ("factory_running", "GlRun"),
                    ("factory_held", "GlHeld"), ("pool_unclaimed", "Unclaimed"), ("curbed_by", "CurbedBy")]


def run(args: argparse.Namespace) -> int:
    if args.role == "factory":
        ads = fetch(args, ["glidefactory", "glidefactoryclient", "glideclient"])
        rows = factory_rows(ads["glidefactory"], ads["glidefactoryclient"], ads["glideclient"])
        columns = FACTORY_COLUMNS
    else:
        ads = fetch(args, ["glideclient"])
        rows, columns = frontend_rows(ads["glideclient"]), FRONTEND_COLUMNS
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        table(rows, columns, sys.stdout)
    return 0
