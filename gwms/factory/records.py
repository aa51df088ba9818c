"""The factory's glidein records: every glidein it submitted, durable in SQLite.

A glidein is recorded *before* it is submitted (state ``submitting``, no grid id yet), so that
a factory killed at any moment never forgets one: after a restart a record still without a
grid id may or may not have reached the grid, so it is counted as waiting (no duplicate is
submitted for it) until it turns stale and is dropped.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from gwms.factory.grid import FINISHED, HELD, QUEUED, RUNNING

SUBMITTING = "submitting"  # recorded, handed to the plugin, no grid id known yet
REMOVING = "removing"  # the factory asked the grid to remove it
# What counts as an idle glidein (the frontends' ReqIdleGlideins): waiting for a node.
IDLE_STATES = (SUBMITTING, QUEUED)


@dataclass(frozen=True)
class Glidein:
    glidein_id: str
    entry: str
    client: str  # the frontend group that asked (its request ad's ClientName)
    identity: str  # the authenticated identity of that frontend
    submitted: float
    state: str = SUBMITTING
    grid_id: str | None = None
    changed: float = 0.0  # when the state last changed
    exit_code: int | None = None
    reason: str = ""


class RecordsError(Exception):
    """The records database cannot be used (its message names the file)."""


class GlideinRecords:
    """In memory for the cycle's arithmetic, written through to SQLite (WAL, synchronous)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS glideins (glidein_id TEXT PRIMARY KEY, entry TEXT NOT NULL, "
                "client TEXT NOT NULL, identity TEXT NOT NULL, submitted REAL NOT NULL, state TEXT NOT NULL, "
                "grid_id TEXT, changed REAL NOT NULL, exit_code INTEGER, reason TEXT NOT NULL)")
            rows = self._db.execute(
                "SELECT glidein_id, entry, client, identity, submitted, state, grid_id, changed, exit_code, reason "
                "FROM glideins").fetchall()
        except sqlite3.Error as e:
            raise RecordsError(f"glidein records {self.path}: {e}") from None
        self.glideins: dict[str, Glidein] = {}
        self._by_entry: dict[str, dict[str, Glidein]] = {}  # the cycle works entry by entry
        for row in rows:
            self._keep(Glidein(*row))

    def _keep(self, g: Glidein) -> None:
        self.glideins[g.glidein_id] = g
        self._by_entry.setdefault(g.entry, {})[g.glidein_id] = g

    def _write(self, glideins: Iterable[Glidein], delete: Iterable[str] = ()) -> None:
        rows = [(g.glidein_id, g.entry, g.client, g.identity, g.submitted, g.state, g.grid_id, g.changed,
                 g.exit_code, g.reason) for g in glideins]
        gone = [(i,) for i in delete]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO glideins VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.executemany("DELETE FROM glideins WHERE glidein_id = ?", gone)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise RecordsError(f"glidein records {self.path}: {e}") from None

    def add(self, glideins: list[Glidein]) -> None:
        """Record new glideins durably (before they are submitted)."""
        self._write(glideins)
        for g in glideins:
            self._keep(g)

    def update(self, changed: list[Glidein]) -> None:
        """Store new versions of glideins (state, grid id, exit)."""
        if changed:
            self._write(changed)
            for g in changed:
                self._keep(g)

    def set_state(self, glidein: Glidein, state: str, now: float, **values: object) -> Glidein:
        """A new version of ``glidein`` in ``state`` (not yet stored: pass it to update)."""
        return replace(glidein, state=state, changed=now if state != glidein.state else glidein.changed,
                       **values)  # type: ignore[arg-type]

    def forget(self, glidein_ids: list[str]) -> None:
        if glidein_ids:
            self._write((), glidein_ids)
            for i in glidein_ids:
                g = self.glideins.pop(i, None)
                if g is not None:
                    self._by_entry.get(g.entry, {}).pop(i, None)

    def of_entry(self, entry: str) -> list[Glidein]:
        return list(self._by_entry.get(entry, {}).values())

    def close(self) -> None:
        self._db.close()


__all__ = ["Glidein", "GlideinRecords", "RecordsError", "SUBMITTING", "REMOVING", "IDLE_STATES",
           "QUEUED", "RUNNING", "HELD", "FINISHED"]
