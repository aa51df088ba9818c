"""``gwms status``: what condor_status is to an HTCondor pool."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence, TextIO

from gwms import classads
from gwms.cli import UsageError

# Columns of the default table, by ad type (as condor_status shows them).
COLUMNS: dict[str, list[tuple[str, str, int]]] = {
    "machine": [("Name", "Name", 32), ("OpSys", "OpSys", 8), ("Arch", "Arch", 7), ("State", "State", 10),
                ("Activity", "Activity", 9), ("Cpus", "Cpus", 5), ("Memory", "Mem", 7)],
    "default": [("MyType", "Type", 14), ("Name", "Name", 36), ("AuthenticatedIdentity", "Identity", 34),
                ("LastHeardFrom", "Age", 6)],
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("status", help="show the ads in the pool's collectors (like condor_status)",
                              description="Query the pool's collectors and show their ads.")
    add_pool_arguments(p)
    p.add_argument("--type", default="Machine",
                   help="ad type: Machine (default), Scheduler, Submitter, Negotiator, Collector, "
                        "glidefactory, ... or 'any'")
    p.add_argument("--any", dest="type", action="store_const", const="any", help="same as --type any")
    p.add_argument("--constraint", help="a ClassAd expression the ads must satisfy")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--long", "-l", action="store_true", help="every attribute of every ad")
    out.add_argument("--json", action="store_true", help="the ads as a JSON list")
    out.add_argument("--format", nargs=2, action="append", metavar=("FMT", "ATTR"),
                     help="printf-style format of one attribute, repeatable (like condor_status -format)")
    p.set_defaults(func=run)


def add_pool_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", action="append", metavar="HOST:PORT",
                   help="a collector to ask (repeatable; default: [pool] collectors of --config)")
    p.add_argument("--config", default=os.environ.get("GWMS_CONFIG"),
                   help="host configuration (default: $GWMS_CONFIG) for the pool and credentials")


def client_setup(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The client security and collector addresses a command line asks for."""
    from gwms.config import ConfigError, load_config
    from gwms.credentials.x509 import CredentialError
    from gwms.protocols.client import Address, ClientSecurity, default_client_config

    try:
        config = load_config(args.config) if args.config else default_client_config()
        security = ClientSecurity.from_config(config, os.environ)
        if args.pool:
            addresses = [Address.parse(p) for p in args.pool]
        else:
            addresses = [Address(host=h, port=p) for h, p in config.pool["collectors"]]
    except (ConfigError, CredentialError) as e:
        raise UsageError(str(e)) from None
    return security, addresses


def run(args: argparse.Namespace) -> int:
    from twisted.internet import task

    from gwms.protocols.client import CollectorList, query_ads
    from gwms.protocols.messages import CommandError, ConnectionFailed

    security, addresses = client_setup(args)
    if args.constraint:
        try:
            classads.parse_expr(args.constraint)
        except classads.ClassAdError as e:
            raise UsageError(f"--constraint: {e}") from None
    projection = [attr for _fmt, attr in args.format] if args.format else []
    result: dict[str, Any] = {}

    def main(reactor: Any) -> Any:
        collectors = CollectorList(reactor, addresses, security)
        d = query_ads(collectors, args.type, args.constraint, projection)

        def done(value: Any) -> None:
            result["value"] = value
            collectors.close()

        return d.addBoth(done)

    try:
        task.react(lambda reactor: main(reactor), [])
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    value = result.get("value")
    if hasattr(value, "check"):
        if value.check(ConnectionFailed, CommandError):
            raise UsageError(value.getErrorMessage())
        value.raiseException()
    show(value, args, sys.stdout)
    return 0


def show(ads: Sequence[classads.ClassAd], args: argparse.Namespace, out: TextIO, now: float | None = None) -> None:
    ads = sorted(ads, key=lambda ad: (str(ad.get("MyType", "")), str(ad.get("Name", ""))))
    if args.json:
        json.dump([classads.to_python(ad) for ad in ads], out, indent=2, sort_keys=True, default=str)
        out.write("\n")
    elif args.long:
        for ad in ads:
            out.write(classads.format_old(ad).rstrip("\n") + "\n\n")
    elif args.format:
        for ad in ads:
            out.write("".join(_format_one(fmt, classads.evaluate(ad, attr)) for fmt, attr in args.format))
    else:
        out.write(table(ads, args.type, now))


def _format_one(fmt: str, value: Any) -> str:
    fmt = fmt.encode().decode("unicode_escape")  # "%s\n" typed on a shell means a newline
    if value is None:
        value = "undefined"
    try:
        return fmt.replace("%v", "%s") % (value,)
    except (TypeError, ValueError):
        return fmt.replace("%v", "%s").replace("%d", "%s").replace("%f", "%s") % (str(value),)


def table(ads: Sequence[classads.ClassAd], ad_type: str, now: float | None = None) -> str:
    now = time.time() if now is None else now
    columns = COLUMNS.get(ad_type.lower(), COLUMNS["default"])
    lines = [" ".join(title.ljust(width) for _attr, title, width in columns).rstrip()]
    for ad in ads:
        cells = []
        for attr, _title, width in columns:
            value = classads.evaluate(ad, attr)
            if attr == "LastHeardFrom" and isinstance(value, (int, float)):
                text = f"{max(0, int(now - value))}s"
            else:
                text = "" if value is None else str(value)
            cells.append(text.ljust(width))
        lines.append(" ".join(cells).rstrip())
    lines.append("")
    lines.append(f"Total: {len(ads)}")
    return "\n".join(lines) + "\n"
