"""HTCondor job event logs ("user logs"): the ``log =`` file of a submit description.

Users, ``condor_wait``, DAGMan and ``htcondor2.JobEventLog`` read these files, so we write
HTCondor's own TEXT format, line for line as ``ULogEvent::formatHeader`` and the
``formatBody`` methods of ``src/condor_utils/condor_event.cpp`` print it; the unit tests
read every event back with ``htcondor2.JobEventLog`` and compare our text with the text
HTCondor's own formatter prints for the event it parsed.

Format (one event)::

    005 (012.000.000) 2024-11-26 15:04:05 Job terminated.
    <body lines, each starting with a tab or four spaces>
    ...

* The header is ``%03d (%03d.%03d.%03d) `` (event number, cluster, proc, subproc -- we
  have no subprocs, so always ``000``), the timestamp, one space, then the body's first line.
* **Timestamp.**  We write ``YYYY-MM-DD HH:MM:SS`` in the *local* time zone, whole seconds:
  that is HTCondor's default today (``USERLOG_FORMAT_DEFAULT`` is ``formatOpt::ISO_DATE``;
  no ``UTC``, no ``SUB_SECOND`` unless ``DEFAULT_USERLOG_FORMAT_OPTIONS`` says so).  The
  reader also accepts the legacy ``MM/DD HH:MM:SS``, but that form has no year and the
  reader fills in the *current* year, so events read back in a later year (or across New
  Year) get the wrong time; the ISO form has no such problem.  Like HTCondor we inherit the
  usual local-time caveat: a time in the repeated hour when DST ends is ambiguous.
* Every event ends with the synchronisation line ``...``.
* **Free text** (reasons, host names, addresses) must stay on one line, or the reader
  takes the rest for the next field / loses the event.  :func:`_one_line` turns every line
  break (``\\r\\n``, ``\\n``, ``\\r``, and the Unicode line/paragraph separators) and every
  other control character into a single space and strips the ends (the reader strips most
  of these fields anyway, so stripping here makes what is read back equal what we meant).
  HTCondor itself maps ``\\n`` to ``|`` in some places; we use spaces everywhere, for
  one rule.  Text is cut at 8191 characters, HTCondor's own ``%.8191s`` limit.
  Startd names and addresses additionally lose whitespace and commas (-> ``_``) because
  the disconnect/reconnect-failed parsers end the name at the first space / comma; the
  names come from glidein startds, which we do not trust to be well formed.
"""

from __future__ import annotations

import errno
import io
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, Final

__all__ = [
    "EventLogWriter",
    "aborted_event",
    "disconnected_event",
    "evicted_event",
    "execute_event",
    "format_timestamp",
    "held_event",
    "open_for_append",
    "reconnect_failed_event",
    "reconnected_event",
    "released_event",
    "submit_event",
    "terminated_event",
]

# ULogEventNumber values (condor_event.h); the same numbers as htcondor2.JobEventType.
SUBMIT: Final = 0
EXECUTE: Final = 1
JOB_EVICTED: Final = 4
JOB_TERMINATED: Final = 5
JOB_ABORTED: Final = 9
JOB_HELD: Final = 12
JOB_RELEASED: Final = 13
JOB_DISCONNECTED: Final = 22
JOB_RECONNECTED: Final = 23
JOB_RECONNECT_FAILED: Final = 24

SYNC_LINE: Final = "...\n"
MAX_TEXT: Final = 8191  # HTCondor prints notes and reasons with %.8191s

# Anything that could end a line for some reader (C fgets splits on \n only, but people and
# Python tools split on more), NUL (C strings stop there) and the other control characters.
_CONTROL_RUN = re.compile(r"(?:\r\n|[\x00-\x1f\x7f\x85\u2028\u2029])+")
_NAME_UNSAFE = re.compile(r"[\s,]+")
# Resource names become ClassAd attribute names (Request<Res>, <Res>Usage) when read back.
_RESOURCE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# ---------------------------------------------------------------------------
# text helpers


def _one_line(text: str | None) -> str:
    """``text`` as one line: control runs become one space, ends stripped, length capped."""
    if not text:
        return ""
    return _CONTROL_RUN.sub(" ", text).strip()[:MAX_TEXT]


def _name(text: str | None) -> str:
    """A startd name or address as one whitespace- and comma-free token (never empty,
    because the disconnect/reconnect parsers refuse the event without it)."""
    return _NAME_UNSAFE.sub("_", _one_line(text)) or "unknown"


def format_timestamp(when: float) -> str:
    """HTCondor's default header timestamp: local time ``YYYY-MM-DD HH:MM:SS``.

    Seconds are truncated towards the past, as HTCondor's ``time_t`` event clock does."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(math.floor(when)))


def _header(event_number: int, cluster: int, proc: int, when: float) -> str:
    if cluster < 0 or proc < 0:
        # The reader would keep a negative id, but -1 means "no job" to every consumer.
        raise ValueError(f"job id {cluster}.{proc} is not a job")
    return f"{event_number:03d} ({cluster:03d}.{proc:03d}.000) {format_timestamp(when)} "


def _rusage(user_seconds: float, sys_seconds: float) -> str:
    """``ULogEvent::formatRusage``: ``\\tUsr D HH:MM:SS, Sys D HH:MM:SS`` (whole seconds,
    as struct rusage's tv_sec)."""

    def split(seconds: float) -> str:
        s = max(0, math.floor(seconds)) if math.isfinite(seconds) else 0
        days, s = divmod(s, 86400)
        hours, s = divmod(s, 3600)
        minutes, s = divmod(s, 60)
        return f"{days} {hours:02d}:{minutes:02d}:{s:02d}"

    return f"\tUsr {split(user_seconds)}, Sys {split(sys_seconds)}"


def _bytes(count: float) -> str:
    # HTCondor keeps byte counts as doubles and prints them with %.0f.
    return f"{max(0.0, float(count)):.0f}"


# ---------------------------------------------------------------------------
# events


def submit_event(cluster: int, proc: int, when: float, submit_host: str) -> str:
    """000: ``Job submitted from host: <addr>``; ``submit_host`` is the schedd's sinful string."""
    return f"{_header(SUBMIT, cluster, proc, when)}Job submitted from host: {_one_line(submit_host)}\n{SYNC_LINE}"


def execute_event(cluster: int, proc: int, when: float, execute_host: str, slot_name: str | None = None) -> str:
    """001: ``Job executing on host: <addr>``, and the ``SlotName:`` line newer HTCondors add."""
    text = f"{_header(EXECUTE, cluster, proc, when)}Job executing on host: {_one_line(execute_host)}\n"
    slot = _one_line(slot_name)
    if slot:
        text += f"\tSlotName: {slot}\n"
    return text + SYNC_LINE


def evicted_event(
    cluster: int,
    proc: int,
    when: float,
    *,
    user_cpu: float,
    sys_cpu: float,
    bytes_sent: int = 0,
    bytes_received: int = 0,
    reason: str | None = None,
) -> str:
    """004: the job left the machine without finishing, not checkpointed.

    ``user_cpu``/``sys_cpu`` are the run's remote (job) usage in seconds; the "local" usage
    is the shadow's, which we do not have, so it is written as zero."""
    # formatBody ends each line with "\n\t" and formatRusage starts with "\t": hence the two
    # tabs before "Usr" in real logs, which we keep so the text is identical.
    text = (
        f"{_header(JOB_EVICTED, cluster, proc, when)}Job was evicted.\n"
        "\t(0) CPU times\n"
        f"\t{_rusage(user_cpu, sys_cpu)}  -  Run Remote Usage\n"
        f"\t{_rusage(0, 0)}  -  Run Local Usage\n"
        f"\t{_bytes(bytes_sent)}  -  Run Bytes Sent By Job\n"
        f"\t{_bytes(bytes_received)}  -  Run Bytes Received By Job\n"
    )
    why = _one_line(reason)
    if why:
        text += f"\tReason: {why}\n"
    return text + SYNC_LINE


def terminated_event(
    cluster: int,
    proc: int,
    when: float,
    *,
    exit_code: int | None,
    exit_signal: int | None,
    user_cpu: float,
    sys_cpu: float,
    total_user_cpu: float | None = None,
    total_sys_cpu: float | None = None,
    bytes_sent: int = 0,
    bytes_received: int = 0,
    total_bytes_sent: int | None = None,
    total_bytes_received: int | None = None,
    requested: Mapping[str, float] | None = None,
    allocated: Mapping[str, float] | None = None,
    usage: Mapping[str, float] | None = None,
) -> str:
    """005: ``Job terminated.``, normally (``exit_code``) or by a signal (``exit_signal``);
    exactly one of the two must be given.

    CPU times are the job's ("remote") usage in seconds, for this run and for all runs
    (``total_*`` default to this run's); the shadow's ("local") usage is written as zero.
    Byte totals likewise default to this run's counts.  ``requested``/``allocated``/``usage``
    map resource names (``Cpus``, ``Disk`` in KB, ``Memory`` in MB, ...) to numbers and
    produce the "Partitionable Resources" table; the reader turns it into ``RequestCpus``,
    ``Cpus``, ``CpusUsage``... attributes."""
    if (exit_code is None) == (exit_signal is None):
        raise ValueError("give exactly one of exit_code and exit_signal")
    # The reader only reports ReturnValue / TerminatedBySignal when they are >= 0.
    if exit_signal is None:
        assert exit_code is not None
        if exit_code < 0:
            raise ValueError(f"exit code {exit_code} is negative")
        how = f"\t(1) Normal termination (return value {exit_code})\n"
    else:
        if exit_signal < 0:
            raise ValueError(f"signal {exit_signal} is negative")
        # We never collect core files.
        how = f"\t(0) Abnormal termination (signal {exit_signal})\n\t(0) No core file\n"
    total_user = user_cpu if total_user_cpu is None else total_user_cpu
    total_sys = sys_cpu if total_sys_cpu is None else total_sys_cpu
    sent_total = bytes_sent if total_bytes_sent is None else total_bytes_sent
    received_total = bytes_received if total_bytes_received is None else total_bytes_received
    text = (
        f"{_header(JOB_TERMINATED, cluster, proc, when)}Job terminated.\n"
        f"{how}"
        f"\t{_rusage(user_cpu, sys_cpu)}  -  Run Remote Usage\n"
        f"\t{_rusage(0, 0)}  -  Run Local Usage\n"
        f"\t{_rusage(total_user, total_sys)}  -  Total Remote Usage\n"
        f"\t{_rusage(0, 0)}  -  Total Local Usage\n"
        f"\t{_bytes(bytes_sent)}  -  Run Bytes Sent By Job\n"
        f"\t{_bytes(bytes_received)}  -  Run Bytes Received By Job\n"
        f"\t{_bytes(sent_total)}  -  Total Bytes Sent By Job\n"
        f"\t{_bytes(received_total)}  -  Total Bytes Received By Job\n"
    )
    return text + _usage_table(requested or {}, allocated or {}, usage or {}) + SYNC_LINE


# formatUsageAd's unit labels.
_UNIT_LABELS: Final = {
    "Memory": "Memory (MB)",
    "Disk": "Disk (KB)",
    "Gpus": "Gpus (Average)",
    "GpusMemory": "GpusMemory (MB)",
    "TimeExecute": "TimeExecute (s)",
    "TimeSlotBusy": "TimeSlotBusy (s)",
}


def _usage_value(resource: str, value: float) -> tuple[str, bool]:
    """formatUsageAd's cell text, and whether it shows a fraction: reals with a fractional
    part as ``%.2f``, everything else as an integer."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"resource {resource!r}: {value!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"resource {resource!r}: {value!r} is not finite")
    if isinstance(value, float) and value % 1 > 0:
        return f"{value:.2f}", True
    return str(int(value)), False


def _usage_table(requested: Mapping[str, float], allocated: Mapping[str, float], usage: Mapping[str, float]) -> str:
    """``formatUsageAd``: the Usage / Request / Allocated table, columns right-aligned.

    The reader finds the columns by the *positions* of the header words, so widths and
    padding follow HTCondor exactly (including its trailing space for the absent
    ``Assigned`` column)."""
    resources: dict[str, dict[str, str]] = {}
    fractional = {"use": False, "req": False, "alloc": False}
    for column, values in (("req", requested), ("alloc", allocated), ("use", usage)):
        for resource, value in values.items():
            if not _RESOURCE_NAME.match(resource):
                raise ValueError(f"resource name {resource!r} is not a ClassAd attribute name")
            cell, has_fraction = _usage_value(resource, value)
            resources.setdefault(resource, {})[column] = cell
            fractional[column] |= has_fraction
    if not resources:
        return ""
    # Integers are padded on the right so they line up with the decimal points of "%.2f".
    for cells in resources.values():
        for column, has_fraction in fractional.items():
            if has_fraction and cells.get(column, "").isdigit():
                cells[column] += "   "
    width_res = len("Memory (MB)") + 1  # sizeof("Memory (MB)") in C
    width_use = width_req = 8
    width_alloc = 0
    for resource, cells in resources.items():
        width_res = max(width_res, len(resource))
        width_use = max(width_use, len(cells.get("use", "")))
        width_req = max(width_req, len(cells.get("req", "")))
        width_alloc = max(width_alloc, len(cells.get("alloc", "")))
    alloc_field = max(width_alloc, 9)
    alloc_title = "Allocated" if width_alloc else ""
    lines = [f"\tPartitionable Resources : {'Usage':>{width_use}} {'Request':>{width_req}} {alloc_title:>{alloc_field}} \n"]
    # HTCondor keeps them in a case-insensitive std::map: alphabetical, case ignored.
    for resource in sorted(resources, key=str.lower):
        cells = resources[resource]
        label = _UNIT_LABELS.get(resource, resource)
        lines.append(
            f"\t   {label:<{width_res + 8}} : {cells.get('use', ''):>{width_use}} "
            f"{cells.get('req', ''):>{width_req}} {cells.get('alloc', ''):>{alloc_field}} \n"
        )
    return "".join(lines)


def aborted_event(cluster: int, proc: int, when: float, reason: str | None) -> str:
    """009: ``Job was aborted.`` (condor_rm), with the reason on the next line if any,
    e.g. ``via condor_rm (by user alice)``."""
    text = f"{_header(JOB_ABORTED, cluster, proc, when)}Job was aborted.\n"
    why = _one_line(reason)
    if why:
        text += f"\t{why}\n"
    return text + SYNC_LINE


def held_event(cluster: int, proc: int, when: float, reason: str, code: int = 0, subcode: int = 0) -> str:
    """012: ``Job was held.``, the HoldReason (``Reason unspecified`` when empty, as
    HTCondor writes it) and ``Code <HoldReasonCode> Subcode <HoldReasonSubCode>``."""
    why = _one_line(reason) or "Reason unspecified"
    return (
        f"{_header(JOB_HELD, cluster, proc, when)}Job was held.\n"
        f"\t{why}\n"
        f"\tCode {int(code)} Subcode {int(subcode)}\n"
        f"{SYNC_LINE}"
    )


def released_event(cluster: int, proc: int, when: float, reason: str | None) -> str:
    """013: ``Job was released.``, with the reason on the next line if any."""
    text = f"{_header(JOB_RELEASED, cluster, proc, when)}Job was released.\n"
    why = _one_line(reason)
    if why:
        text += f"\t{why}\n"
    return text + SYNC_LINE


def disconnected_event(cluster: int, proc: int, when: float, reason: str, startd_name: str, startd_address: str) -> str:
    """022: the shadow lost the starter and will try to reconnect.

    HTCondor refuses to write (and its reader refuses to read) this event with an empty
    reason, name or address, so empty ones are written as ``unknown``."""
    return (
        f"{_header(JOB_DISCONNECTED, cluster, proc, when)}Job disconnected, attempting to reconnect\n"
        f"    {_one_line(reason) or 'unknown'}\n"
        f"    Trying to reconnect to {_name(startd_name)} {_name(startd_address)}\n"
        f"{SYNC_LINE}"
    )


def reconnected_event(
    cluster: int, proc: int, when: float, startd_name: str, startd_address: str, starter_address: str
) -> str:
    """023: the shadow got the job back after a disconnect."""
    return (
        f"{_header(JOB_RECONNECTED, cluster, proc, when)}Job reconnected to {_name(startd_name)}\n"
        f"    startd address: {_name(startd_address)}\n"
        f"    starter address: {_name(starter_address)}\n"
        f"{SYNC_LINE}"
    )


def reconnect_failed_event(cluster: int, proc: int, when: float, reason: str, startd_name: str) -> str:
    """024: reconnecting failed (lease expired, job gone...); the job goes back to idle."""
    return (
        f"{_header(JOB_RECONNECT_FAILED, cluster, proc, when)}Job reconnection failed\n"
        f"    {_one_line(reason) or 'unknown'}\n"
        f"    Can not reconnect to {_name(startd_name)}, rescheduling job\n"
        f"{SYNC_LINE}"
    )


# ---------------------------------------------------------------------------
# writing


def open_for_append(path: Path) -> BinaryIO:
    """Open ``path`` for appending (unbuffered, so one ``write`` is one system call),
    creating it with mode 0644.

    The mode is set explicitly on creation rather than left to the daemon's umask: the file
    belongs to the user, whose tools must be able to read it, whatever umask the schedd runs
    with.  An existing file keeps its mode.  Symlinks are followed, as HTCondor does; the
    schedd's opener runs with the user's file-system uid, which is what makes that safe."""
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
    for _attempt in range(3):
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                continue  # removed between our two opens (log rotation): create it again
        else:
            try:
                os.fchmod(fd, 0o644)
            except BaseException:
                os.close(fd)
                raise
        return os.fdopen(fd, "ab", buffering=0)
    raise OSError(errno.ENOENT, "log file keeps disappearing while being opened", str(path))


class EventLogWriter:
    """Appends events to log files.  ``opener(path) -> binary file object opened for appending``
    is injectable because the schedd must open users' log files with the user's rights (it passes
    an opener that switches the file-system uid); the default opens with O_APPEND|O_CREAT, mode 0644.

    Each event goes to the file in one ``write()`` on a file opened with ``O_APPEND``, so
    events from concurrent writers (several writers, threads or processes) never interleave
    on a local file system.  Openers should return *unbuffered* files (``buffering=0``) for
    that guarantee.  NFS does not make ``O_APPEND`` atomic; HTCondor's answer there is file
    locking, which it too has off by default.  The file is opened and closed for every
    event, as HTCondor does, so users may move or delete their log at any time.

    ``fsync`` (default on, like HTCondor's ``ENABLE_USERLOG_FSYNC``) flushes each event to
    disk before :meth:`append` returns, because DAGMan recovers from a crash by re-reading
    the log and must find every event it was told about.
    """

    def __init__(self, opener: Callable[[Path], BinaryIO] | None = None, *, fsync: bool = True) -> None:
        self._opener = opener if opener is not None else open_for_append
        self._fsync = fsync

    def append(self, path: Path, event_text: str) -> None:
        """Append one event (the text one of the ``*_event`` functions returned).

        Raises OSError (from the opener, write, fsync or close) for the caller to log;
        ValueError if ``event_text`` is not one whole event, because appending that would
        corrupt the event after it for every reader."""
        if not event_text.endswith("\n" + SYNC_LINE) or not event_text[:3].isdigit():
            raise ValueError("not a complete job event (must start with the event number and end with '...')")
        data = event_text.encode("utf-8", errors="replace")
        file = self._opener(Path(path))
        try:
            remaining = memoryview(data)
            while remaining:
                # A raw file may write short (a nearly full disk, a signal); finishing the
                # event is better than leaving half of it for the reader to choke on.
                written = file.write(remaining)
                if not written:  # None: a non-blocking file that would block; 0: no progress
                    raise OSError(errno.EIO, "short write to job event log", str(path))
                remaining = remaining[written:]
            file.flush()
            if self._fsync:
                try:
                    fd = file.fileno()
                except (AttributeError, io.UnsupportedOperation):
                    fd = None  # an opener's in-memory file: nothing to sync
                if fd is not None:
                    os.fsync(fd)
        finally:
            file.close()
