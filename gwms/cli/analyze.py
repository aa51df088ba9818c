"""``gwms q --analyze ID``: why a job does not run."""

from __future__ import annotations

import argparse

from gwms.cli import UsageError


def analyze(args: argparse.Namespace) -> int:
    raise UsageError("--analyze is not implemented yet")
