"""The ``gwms`` command: one entry point, a sub-command per tool.

Each tool module exposes ``register(subparsers)``, which adds its parsers and sets
``func(args) -> int`` as the handler. Errors a user can fix are raised as ``UsageError`` and
printed as one line; they never become tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


class UsageError(Exception):
    """An error the user can fix (bad argument, missing file, no collector answering)."""


def build_parser() -> argparse.ArgumentParser:
    from gwms.cli import credentials, demo, glideins, jobs, status

    parser = argparse.ArgumentParser(prog="gwms", description="gwms pool tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in (status, jobs, glideins, credentials, demo):
        module.register(subparsers)
    return parser


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command; a UsageError becomes one line on stderr and exit code 2."""
    try:
        return args.func(args) or 0
    except UsageError as e:
        print(f"gwms {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(dispatch(build_parser().parse_args(argv)))
