"""``FakeGridSubmitter``: an IGridSubmitter that runs nothing, for factory tests and benchmarks.

Submitted glideins are queued; a test moves them (``start``, ``hold``, ``finish``) or lets
``auto_start`` run them at the next query. Every call is recorded in ``calls`` so a test can
check that the factory asks in bulk (one query per entry per cycle)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from twisted.internet import defer
from zope.interface import implementer

from gwms.factory.grid import FINISHED, HELD, QUEUED, RUNNING, GlideinSubmission, GridStatus
from gwms.interfaces import IGridSubmitter


@implementer(IGridSubmitter)
class FakeGridSubmitter:
    name = "fake"

    def __init__(self, auto_start: bool = False) -> None:
        self.auto_start = auto_start
        self.glideins: dict[str, GridStatus] = {}  # grid id -> status
        self.submissions: dict[str, GlideinSubmission] = {}  # grid id -> what was submitted
        self.calls: list[tuple[str, str, int]] = []  # (call, entry, how many)
        self.fail_submit: str | None = None  # a reason to fail the next submissions with

    @classmethod
    def from_config(cls, config: Any, reactor: Any) -> "FakeGridSubmitter":
        return cls()

    def submit(self, entry: Mapping[str, Any], glideins: Sequence[GlideinSubmission]) -> defer.Deferred[dict[str, str]]:
        self.calls.append(("submit", entry["name"], len(glideins)))
        if self.fail_submit is not None:
            return defer.fail(RuntimeError(self.fail_submit))
        out = {}
        for g in glideins:
            grid_id = f"fake.{len(self.submissions)}"
            self.submissions[grid_id] = g
            self.glideins[grid_id] = GridStatus(QUEUED)
            out[g.glidein_id] = grid_id
        return defer.succeed(out)

    def query(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[dict[str, GridStatus]]:
        self.calls.append(("query", entry["name"], len(grid_ids)))
        if self.auto_start:
            for i in grid_ids:
                if self.glideins.get(i) == GridStatus(QUEUED):
                    self.glideins[i] = GridStatus(RUNNING)
        return defer.succeed({i: self.glideins[i] for i in grid_ids if i in self.glideins})

    def remove(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[None]:
        self.calls.append(("remove", entry["name"], len(grid_ids)))
        for i in grid_ids:
            if i in self.glideins:
                self.glideins[i] = GridStatus(FINISHED, None, "removed")
        return defer.succeed(None)

    def forget(self, entry: Mapping[str, Any], grid_ids: Sequence[str]) -> defer.Deferred[None]:
        for i in grid_ids:
            self.glideins.pop(i, None)
        return defer.succeed(None)

    # -- what a test does to the grid ---------------------------------------------------------
    def in_state(self, state: str) -> list[str]:
        return sorted(i for i, s in self.glideins.items() if s.state == state)

    def start(self, n: int | None = None) -> None:
        for i in self.in_state(QUEUED)[:n]:
            self.glideins[i] = GridStatus(RUNNING)

    def hold(self, grid_id: str, reason: str = "held by the test") -> None:
        self.glideins[grid_id] = GridStatus(HELD, None, reason)

    def finish(self, grid_id: str, exit_code: int = 0) -> None:
        self.glideins[grid_id] = GridStatus(FINISHED, exit_code)
