"""The user's files with the user's rights.

The seed's shadow runs as the job's owner so that the input sandbox, output files, event log
and proxy are touched with that user's permissions. Our shadows live inside the schedd, so a
schedd running as root switches its *file-system* uid and gid (Linux ``setfsuid``/``setfsgid``)
around each file operation: the kernel then checks that operation exactly as if the user had
made it, and a user cannot make the schedd read or overwrite a file they could not. A schedd that
is not root can only act as itself; it refuses jobs of other owners (``check_owner``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

_libc = ctypes.CDLL(None, use_errno=True)


class UserFileError(OSError):
    """A file operation refused for the user, with the path and the reason."""


@dataclass(frozen=True)
class Account:
    user: str
    uid: int
    gid: int

    @classmethod
    def named(cls, user: str) -> "Account":
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise UserFileError(f"no local account named {user!r}") from None
        return cls(user=user, uid=pw.pw_uid, gid=pw.pw_gid)


def _setfs(uid: int, gid: int) -> None:
    # setfsgid first: once the fsuid is not root we could no longer change the fsgid.
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)


@contextlib.contextmanager
def as_user(account: Account) -> Iterator[None]:
    """File operations inside run with ``account``'s file-system identity (when we are root)."""
    if os.geteuid() != 0 or account.uid == 0:
        yield
        return
    _setfs(account.uid, account.gid)
    try:
        yield
    finally:
        _setfs(0, 0)


def check_owner(account: Account) -> None:
    """A schedd that is not root can only do file work for its own user."""
    if os.geteuid() != 0 and account.uid != os.geteuid():
        raise UserFileError(f"this schedd runs as uid {os.geteuid()} and cannot act for {account.user}")


def read_file(account: Account, path: Path, max_bytes: int | None = None) -> bytes:
    with as_user(account):
        try:
            with open(path, "rb") as f:
                return f.read() if max_bytes is None else f.read(max_bytes)
        except OSError as e:
            raise UserFileError(f"cannot read {path} as {account.user}: {e.strerror}") from None


def open_for_reading(account: Account, path: Path) -> BinaryIO:
    with as_user(account):
        try:
            return open(path, "rb")
        except OSError as e:
            raise UserFileError(f"cannot read {path} as {account.user}: {e.strerror}") from None


def open_for_writing(account: Account, path: Path, mode: int = 0o644) -> BinaryIO:
    """Create or truncate ``path`` as the user (the file is theirs, with their umask's say)."""
    with as_user(account):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        except OSError as e:
            raise UserFileError(f"cannot write {path} as {account.user}: {e.strerror}") from None
        return os.fdopen(fd, "wb")  # created under the user's fsuid: the file is theirs


def open_for_append(account: Account, path: Path) -> BinaryIO:
    with as_user(account):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise UserFileError(f"cannot append to {path} as {account.user}: {e.strerror}") from None
        return os.fdopen(fd, "ab", buffering=0)  # one write() per event: no interleaving


def stat(account: Account, path: Path) -> os.stat_result:
    with as_user(account):
        try:
            return os.stat(path)
        except OSError as e:
            raise UserFileError(f"cannot stat {path} as {account.user}: {e.strerror}") from None
