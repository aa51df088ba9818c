"""Who a remote identity is on this submit host: the grid-mapfile.

``"DN" user`` per line (the Globus format the seed's analysis installation uses); ``#`` starts a
comment. Local submission (fs) needs no mapping: the UNIX account is the user.

A worker's grid-mapfile (``[startd] grid_mapfile``, read by the setuid and glexec identity
switches) may also hold ``owner account`` lines, which map a job's Owner name
(``parse_grid_mapfile(..., owners=True)``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type here; the identity switches' helper imports this module lean
    from gwms.security import Identity

_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\Z")


class MappingError(Exception):
    pass


def parse_grid_mapfile(text: str, source: str = "<grid-mapfile>", owners: bool = False) -> dict[str, str]:
    """{DN: account} (and, with ``owners``, {Owner name: account} from 'owner account' lines)."""
    mapping: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            parts = shlex.split(stripped)
        except ValueError as e:
            raise MappingError(f"{source}:{number}: {e}") from None
        is_owner = owners and len(parts) == 2 and _USER.match(parts[0]) is not None
        if len(parts) != 2 or not (parts[0].startswith("/") or is_owner):
            expected = "'\"DN\" account' or 'owner account'" if owners else "'\"DN\" user'"
            raise MappingError(f"{source}:{number}: expected {expected}, got {stripped[:80]!r}")
        dn, user = parts
        if not _USER.match(user.split(",")[0]):
            raise MappingError(f"{source}:{number}: {user!r} is not a valid account name")
        mapping[dn] = user.split(",")[0]  # Globus allows "u1,u2": the first is the default
    return mapping


def load_grid_mapfile(path: Path | None, owners: bool = False) -> dict[str, str]:
    if path is None:
        return {}
    try:
        return parse_grid_mapfile(path.read_text(), str(path), owners)
    except OSError as e:
        raise MappingError(f"cannot read grid-mapfile {path}: {e.strerror}") from None


def local_user(identity: Identity, grid_map: dict[str, str]) -> str | None:
    """The local account an authenticated identity acts as, or None if it has none."""
    if identity.method == "fs":
        return identity.name
    if identity.method in ("x509", "token"):
        return grid_map.get(identity.name)
    if identity.method == "fake":  # gwms.testing's in-memory method: names are accounts
        return identity.name
    return None
