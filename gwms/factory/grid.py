"""What the factory and its grid-submission plugins (``IGridSubmitter``) exchange."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# A glidein's state as the factory tracks it (glideinWMS's "Status" of a glidein job).
QUEUED = "queued"  # waiting at the site (an "idle" glidein: what frontends ask to keep)
RUNNING = "running"  # started on a node
HELD = "held"  # stuck: the grid could not run it (the factory removes it)
FINISHED = "finished"  # ended (exit_code says how)
STATES = (QUEUED, RUNNING, HELD, FINISHED)


@dataclass(frozen=True)
class GlideinSubmission:
    glidein_id: str
    arguments: tuple[str, ...]  # glidein_startup.sh's options, without -credential and -workdir
    credential: Path | None  # the pilot credential to stage next to the glidein


@dataclass(frozen=True)
class GridStatus:
    state: str  # one of STATES
    exit_code: int | None = None
    reason: str = ""  # why it is held, or how it ended
