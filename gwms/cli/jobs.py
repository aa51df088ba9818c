"""``gwms submit``, ``q``, ``rm``, ``hold``, ``release``, ``history``, ``wait``: the condor_* job tools."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from gwms import classads
from gwms.cli import UsageError

STATUS = {1: "I", 2: "R", 3: "X", 4: "C", 5: "H", 6: ">", 7: "S"}


def _schedd_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.environ.get("GWMS_CONFIG"),
                   help="host configuration (default: $GWMS_CONFIG)")
    p.add_argument("--schedd", help="schedd address, host:port or unix:/path (default: the local schedd "
                                    "of --config, or $GWMS_SCHEDD)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("submit", help="queue the jobs of a submit description (like condor_submit)")
    p.add_argument("file", type=Path)
    _schedd_arguments(p)
    p.set_defaults(func=submit)

    p = subparsers.add_parser("q", help="the job queue (like condor_q)")
    p.add_argument("jobs", nargs="*", help="job or cluster ids")
    p.add_argument("--constraint")
    p.add_argument("--allusers", action="store_true", help="every user's jobs, not only yours")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--long", "-l", action="store_true")
    out.add_argument("--json", action="store_true")
    out.add_argument("--analyze", metavar="ID", help="why job ID does not run")
    _schedd_arguments(p)
    p.set_defaults(func=q)

    for action, help_text in (("rm", "remove jobs"), ("hold", "hold jobs"), ("release", "release held jobs")):
        p = subparsers.add_parser(action, help=f"{help_text} (like condor_{action})")
        p.add_argument("jobs", nargs="*", help="job ids (12.0) or cluster ids (12)")
        p.add_argument("--constraint")
        p.add_argument("--reason")
        _schedd_arguments(p)
        p.set_defaults(func=act, action={"rm": "remove"}.get(action, action))

    p = subparsers.add_parser("history", help="completed and removed jobs (like condor_history)")
    p.add_argument("jobs", nargs="*")
    p.add_argument("--constraint")
    p.add_argument("--limit", type=int)
    p.add_argument("--allusers", action="store_true")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--long", "-l", action="store_true")
    out.add_argument("--json", action="store_true")
    _schedd_arguments(p)
    p.set_defaults(func=history)

    p = subparsers.add_parser("wait", help="wait until jobs are done, with a progress bar")
    p.add_argument("jobs", nargs="+", help="job or cluster ids")
    p.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0: never)")
    _schedd_arguments(p)
    p.set_defaults(func=wait)


def _run(args: argparse.Namespace, work: Callable[[Any], Any]) -> Any:
    """Run ``work(schedd_client)`` under a reactor; turn failures into one-line errors."""
    from twisted.internet import defer, task

    from gwms.client import ScheddClient, default_schedd_address
    from gwms.config import ConfigError, load_config
    from gwms.credentials.x509 import CredentialError
    from gwms.protocols.client import Address, ClientSecurity, default_client_config
    from gwms.protocols.messages import CommandError, ConnectionFailed

    try:
        config = load_config(args.config) if args.config else default_client_config()
        security = ClientSecurity.from_config(config, os.environ)
        address = Address.parse(args.schedd) if args.schedd else default_schedd_address(config)
    except (ConfigError, CredentialError) as e:
        raise UsageError(str(e)) from None
    box: dict[str, Any] = {}

    def main(reactor: Any) -> Any:
        schedd = ScheddClient(reactor, address, security)
        d = defer.maybeDeferred(work, schedd)

        def done(value: Any) -> None:
            box["value"] = value
            schedd.close()

        return d.addBoth(done)

    try:
        task.react(main, [])
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    value = box.get("value")
    if hasattr(value, "check"):
        if value.check(ConnectionFailed, CommandError, UsageError):
            raise UsageError(value.getErrorMessage())
        from gwms.submit import SubmitError

        if value.check(SubmitError, classads.ClassAdError, OSError):
            raise UsageError(value.getErrorMessage())
        value.raiseException()
    return value


def submit(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise UsageError(f"no submit file {args.file}")
    cluster, count = _run(args, lambda schedd: schedd.submit_file(args.file))
    print(f"{count} job(s) submitted to cluster {cluster}.")
    return 0


def _selection(args: argparse.Namespace) -> str | None:
    clauses = []
    for j in getattr(args, "jobs", []) or []:
        if "." in j:
            c, _, p = j.partition(".")
            if not (c.isdigit() and p.isdigit()):
                raise UsageError(f"{j!r} is not a job id")
            clauses.append(f"(ClusterId == {c} && ProcId == {p})")
        elif j.isdigit():
            clauses.append(f"ClusterId == {j}")
        else:
            raise UsageError(f"{j!r} is not a job or cluster id")
    constraint = " || ".join(clauses) if clauses else None
    if getattr(args, "constraint", None):
        constraint = f"({constraint}) && ({args.constraint})" if constraint else args.constraint
    if constraint:
        try:
            classads.parse_expr(constraint)
        except classads.ClassAdError as e:
            raise UsageError(f"--constraint: {e}") from None
    return constraint


def _owner(args: argparse.Namespace) -> str | None:
    import getpass

    return None if getattr(args, "allusers", False) or getattr(args, "jobs", None) else getpass.getuser()


def q(args: argparse.Namespace) -> int:
    if args.analyze:
        from gwms.cli.analyze import analyze

        return analyze(args)
    jobs = _run(args, lambda s: s.query(_selection(args), owner=_owner(args)))
    show_jobs(jobs, args, sys.stdout)
    return 0


def history(args: argparse.Namespace) -> int:
    jobs = _run(args, lambda s: s.query(_selection(args), owner=_owner(args), history=True, limit=args.limit))
    show_jobs(jobs, args, sys.stdout, history=True)
    return 0


def act(args: argparse.Namespace) -> int:
    if not args.jobs and not args.constraint:
        raise UsageError("name jobs (ids) or --constraint")
    reply = _run(args, lambda s: s.act(args.action, args.jobs, args.constraint, args.reason))
    done = list(reply.get("Done", []))
    verb = {"remove": "marked for removal", "hold": "held", "release": "released"}[args.action]
    for job in done:
        print(f"Job {job} {verb}")
    for job in reply.get("Refused", []):
        print(f"Job {job}: permission denied (not your job)", file=sys.stderr)
    for job in reply.get("NotFound", []):
        print(f"Job {job}: not found", file=sys.stderr)
    return 0 if done or not (reply.get("Refused") or reply.get("NotFound")) else 1


def wait(args: argparse.Namespace) -> int:
    """Poll the queue until none of the jobs is left in it; draw a progress bar on a terminal."""
    from twisted.internet import defer, task

    constraint = _selection(args)
    started = time.monotonic()

    @defer.inlineCallbacks
    def work(schedd: Any) -> Any:
        total = None
        while True:
            live = yield schedd.query(constraint, projection=["JobStatus"])
            done = yield schedd.query(constraint, projection=["JobStatus"], history=True)
            total = len(live) + len(done)
            counts = {s: sum(1 for j in live if j.get("JobStatus") == s) for s in (1, 2, 5)}
            _progress(len(done), total, counts)
            if not live:
                return done
            if args.timeout and time.monotonic() - started > args.timeout:
                raise UsageError(f"timed out after {args.timeout:g} s with {len(live)} job(s) not done")
            yield task.deferLater(schedd.reactor, 1.0, lambda: None)

    done = _run(args, work)
    failed = [j for j in done if j.get("JobStatus") != 4 or j.get("ExitCode", 0) != 0]
    print(f"\nAll {len(done)} job(s) done; {len(done) - len(failed)} completed with exit code 0.")
    return 0 if not failed else 1


def _progress(done: int, total: int, counts: dict[int, int]) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} done, "
            f"{counts[1]} idle, {counts[2]} running, {counts[5]} held")
    if sys.stdout.isatty():
        print("\r" + line, end="", flush=True)
    else:
        print(line, flush=True)


def show_jobs(jobs: list[classads.ClassAd], args: argparse.Namespace, out: Any, history: bool = False) -> None:
    jobs = sorted(jobs, key=lambda j: (j.get("ClusterId", 0), j.get("ProcId", 0)))
    if args.json:
        json.dump([classads.to_python(j) for j in jobs], out, indent=2, sort_keys=True, default=str)
        out.write("\n")
        return
    if args.long:
        for j in jobs:
            out.write(classads.format_old(j).rstrip("\n") + "\n\n")
        return
    if history:
        out.write(f"{'ID':>10} {'OWNER':<12} {'SUBMITTED':<12} {'RUN_TIME':>10} ST {'COMPLETED':<12} CMD\n")
    else:
        out.write(f"{'ID':>10} {'OWNER':<12} {'SUBMITTED':<12} {'RUN_TIME':>10} ST {'PRI':>3} {'SIZE':>6} CMD\n")
    now = time.time()
    for j in jobs:
        jid = f"{j.get('ClusterId')}.{j.get('ProcId')}"
        submitted = time.strftime("%m/%d %H:%M", time.localtime(j.get("QDate", now) or now))
        wall = float(j.get("RemoteWallClockTime", 0) or 0)
        if j.get("JobStatus") == 2 and j.get("JobCurrentStartDate"):
            wall += now - float(j.get("JobCurrentStartDate"))
        run_time = f"{int(wall // 86400)}+{time.strftime('%H:%M:%S', time.gmtime(wall % 86400))}"
        st = STATUS.get(j.get("JobStatus"), "?")
        cmd = f"{os.path.basename(str(j.get('Cmd', '')))} {j.get('Arguments', '')}".strip()[:40]
        if history:
            completed = time.strftime("%m/%d %H:%M", time.localtime(j.get("CompletionDate") or now))
            out.write(f"{jid:>10} {str(j.get('Owner', '')):<12} {submitted:<12} {run_time:>10} {st}  {completed:<12} {cmd}\n")
        else:
            size = f"{float(j.get('MemoryUsage', 0) or j.get('RequestMemory', 0) or 0):.1f}"
            out.write(f"{jid:>10} {str(j.get('Owner', '')):<12} {submitted:<12} {run_time:>10} {st}  "
                      f"{j.get('JobPrio', 0):>3} {size:>6} {cmd}\n")
    if not history:
        counts = {s: sum(1 for j in jobs if j.get("JobStatus") == s) for s in STATUS}
        out.write(f"\nTotal for query: {len(jobs)} jobs; {counts[4]} completed, {counts[3]} removed, "
                  f"{counts[1]} idle, {counts[2]} running, {counts[5]} held, {counts[7]} suspended\n")
