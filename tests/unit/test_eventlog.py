"""gwms.eventlog: every event is read back with HTCondor's own reader (htcondor2.JobEventLog).

Besides the attributes, each event's text must equal the text HTCondor's formatter prints
for the event its parser built (``str(event)``, which lacks only the ``...`` line): that
catches any difference in layout the parser happens to tolerate.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import time
from pathlib import Path

import htcondor2
import pytest
from htcondor2 import JobEventType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gwms import eventlog
from gwms.eventlog import (
    EventLogWriter,
    aborted_event,
    disconnected_event,
    evicted_event,
    execute_event,
    held_event,
    reconnect_failed_event,
    reconnected_event,
    released_event,
    submit_event,
    terminated_event,
)

T0 = 1732633445.75  # 2024-11-26 15:04:05.75 UTC; no DST change near it in any zone we use
SCHEDD = "<127.0.0.1:9618?addrs=127.0.0.1-9618&alias=submit.example.org>"
STARTD = "<10.0.0.7:9618?addrs=10.0.0.7-9618>"
STARTER = "<10.0.0.7:40123>"


def read_back(path: Path) -> list[htcondor2.JobEvent]:
    return list(htcondor2.JobEventLog(str(path)).events(stop_after=0))


def write(path: Path, texts: list[str]) -> None:
    writer = EventLogWriter()
    for text in texts:
        writer.append(path, text)


def assert_same_text(event: htcondor2.JobEvent, text: str) -> None:
    assert str(event) + "...\n" == text


@pytest.fixture(params=["local", "America/Chicago", "Asia/Kolkata"])
def timezone(request, monkeypatch):
    """Run under the process's zone and two others (one with a half-hour offset): the writer
    and HTCondor's reader both use local time, and must agree in any zone."""
    if request.param != "local":
        if not Path("/usr/share/zoneinfo", request.param).exists():
            pytest.skip(f"no tzdata for {request.param}")
        monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def test_a_jobs_life_and_three_other_endings_read_back(tmp_path, timezone):
    log = tmp_path / "job.log"
    t = [T0 + 60 * i for i in range(14)]
    texts = [
        submit_event(12, 0, t[0], SCHEDD),
        execute_event(12, 0, t[1], STARTD, "slot1_1@node7.example.org"),
        disconnected_event(12, 0, t[2], "Socket between submit and execute hosts closed unexpectedly",
                           "slot1_1@node7.example.org", STARTD),
        reconnected_event(12, 0, t[3], "slot1_1@node7.example.org", STARTD, STARTER),
        evicted_event(12, 0, t[4], user_cpu=61.9, sys_cpu=90061, bytes_sent=1024, bytes_received=2048,
                      reason="The startd was shut down"),
        execute_event(12, 0, t[5], STARTD),
        held_event(12, 0, t[6], "Error from slot1@node7: out of memory", code=34, subcode=12),
        released_event(12, 0, t[7], "via condor_release (by user alice)"),
        execute_event(12, 0, t[8], STARTD, "slot1_2@node7.example.org"),
        terminated_event(12, 0, t[9], exit_code=3, exit_signal=None, user_cpu=1, sys_cpu=0,
                         total_user_cpu=63, total_sys_cpu=2, bytes_sent=4096, bytes_received=8192,
                         total_bytes_sent=5120, total_bytes_received=10240,
                         requested={"Cpus": 1, "Disk": 1000, "Memory": 2048},
                         allocated={"Cpus": 1, "Disk": 1024, "Memory": 2048},
                         usage={"Cpus": 0.25, "Disk": 22, "Memory": 3}),
        submit_event(13, 0, t[10], SCHEDD),
        terminated_event(13, 0, t[11], exit_code=None, exit_signal=9, user_cpu=0, sys_cpu=1),
        aborted_event(14, 0, t[12], "via condor_rm (by user alice)"),
        reconnect_failed_event(15, 2, t[13], "Job not found at execution machine", "slot2@node8.example.org"),
    ]
    write(log, texts)
    events = read_back(log)

    expected_ids = [(12, 0)] * 10 + [(13, 0), (13, 0), (14, 0), (15, 2)]
    expected_types = [
        JobEventType.SUBMIT, JobEventType.EXECUTE, JobEventType.JOB_DISCONNECTED,
        JobEventType.JOB_RECONNECTED, JobEventType.JOB_EVICTED, JobEventType.EXECUTE,
        JobEventType.JOB_HELD, JobEventType.JOB_RELEASED, JobEventType.EXECUTE,
        JobEventType.JOB_TERMINATED, JobEventType.SUBMIT, JobEventType.JOB_TERMINATED,
        JobEventType.JOB_ABORTED, JobEventType.JOB_RECONNECT_FAILED,
    ]
    assert [e.type for e in events] == expected_types
    assert [(e.cluster, e.proc) for e in events] == expected_ids
    assert [e.timestamp for e in events] == [int(x) for x in t]
    for event, text in zip(events, texts):
        assert event["Subproc"] == 0
        assert_same_text(event, text)

    submit, execute, disconnected, reconnected, evicted, execute2, held, released, execute3, done = events[:10]
    assert submit["SubmitHost"] == SCHEDD
    assert execute["ExecuteHost"] == STARTD and execute["SlotName"] == "slot1_1@node7.example.org"
    assert "SlotName" not in execute2
    assert execute3["SlotName"] == "slot1_2@node7.example.org"
    assert disconnected["DisconnectReason"] == "Socket between submit and execute hosts closed unexpectedly"
    assert (disconnected["StartdName"], disconnected["StartdAddr"]) == ("slot1_1@node7.example.org", STARTD)
    assert (reconnected["StartdName"], reconnected["StartdAddr"], reconnected["StarterAddr"]) == (
        "slot1_1@node7.example.org", STARTD, STARTER)

    assert evicted["Checkpointed"] is False and evicted["TerminatedAndRequeued"] is False
    assert evicted["RunRemoteUsage"] == "Usr 0 00:01:01, Sys 1 01:01:01"
    assert evicted["RunLocalUsage"] == "Usr 0 00:00:00, Sys 0 00:00:00"
    assert (evicted["SentBytes"], evicted["ReceivedBytes"]) == (1024, 2048)
    assert evicted["Reason"] == "The startd was shut down"

    assert held["HoldReason"] == "Error from slot1@node7: out of memory"
    assert (held["HoldReasonCode"], held["HoldReasonSubCode"]) == (34, 12)
    assert released["Reason"] == "via condor_release (by user alice)"

    assert done["TerminatedNormally"] is True and done["ReturnValue"] == 3
    assert "TerminatedBySignal" not in done
    assert done["RunRemoteUsage"] == "Usr 0 00:00:01, Sys 0 00:00:00"
    assert done["TotalRemoteUsage"] == "Usr 0 00:01:03, Sys 0 00:00:02"
    assert done["TotalLocalUsage"] == "Usr 0 00:00:00, Sys 0 00:00:00"
    assert (done["SentBytes"], done["ReceivedBytes"]) == (4096, 8192)
    assert (done["TotalSentBytes"], done["TotalReceivedBytes"]) == (5120, 10240)
    assert (done["RequestCpus"], done["Cpus"], done["CpusUsage"]) == (1, 1, 0.25)
    assert (done["RequestDisk"], done["Disk"], done["DiskUsage"]) == (1000, 1024, 22)
    assert (done["RequestMemory"], done["Memory"], done["MemoryUsage"]) == (2048, 2048, 3)

    killed, aborted, failed = events[11:]
    assert killed["TerminatedNormally"] is False and killed["TerminatedBySignal"] == 9
    assert "ReturnValue" not in killed and "CoreFile" not in killed
    assert killed["RunRemoteUsage"] == "Usr 0 00:00:00, Sys 0 00:00:01"
    assert aborted["Reason"] == "via condor_rm (by user alice)"
    assert failed["Reason"] == "Job not found at execution machine"
    assert failed["StartdName"] == "slot2@node8.example.org"


def test_header_is_htcondors_default_iso_local_time(timezone):
    expected = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(T0)))
    assert submit_event(12, 0, T0, SCHEDD).startswith(f"000 (012.000.000) {expected} Job submitted from host: ")
    # Job ids wider than the padding are printed in full, as %03d does.
    assert submit_event(123456, 1000, T0, SCHEDD).startswith("000 (123456.1000.000) ")


def test_legacy_month_day_header_reads_but_loses_the_year(tmp_path):
    """Why we write the ISO form: the old ``MM/DD`` form is accepted, but the reader fills in
    the current year."""
    log = tmp_path / "legacy.log"
    log.write_text("000 (012.000.000) 11/26 15:04:05 Job submitted from host: <127.0.0.1:9618>\n...\n")
    (event,) = read_back(log)
    when = time.localtime(event.timestamp)
    assert (when.tm_mon, when.tm_mday, when.tm_hour, when.tm_min, when.tm_sec) == (11, 26, 15, 4, 5)
    assert when.tm_year == time.localtime().tm_year


def test_optional_reasons_are_left_out_and_required_ones_filled_in(tmp_path):
    log = tmp_path / "job.log"
    texts = [
        aborted_event(1, 0, T0, None),
        released_event(1, 0, T0, "  \n "),
        evicted_event(1, 0, T0, user_cpu=0, sys_cpu=0),
        held_event(1, 0, T0, ""),
        disconnected_event(1, 0, T0, "", "", ""),
        reconnect_failed_event(1, 0, T0, "\n", ""),
    ]
    write(log, texts)
    aborted, released, evicted, held, disconnected, failed = read_back(log)
    assert "Reason" not in aborted and "Reason" not in released and "Reason" not in evicted
    # HTCondor writes "Reason unspecified" for an empty hold reason; its reader drops it again.
    assert "\tReason unspecified\n" in texts[3] and "HoldReason" not in held
    assert (held["HoldReasonCode"], held["HoldReasonSubCode"]) == (0, 0)
    assert (disconnected["DisconnectReason"], disconnected["StartdName"], disconnected["StartdAddr"]) == (
        "unknown", "unknown", "unknown")
    assert (failed["Reason"], failed["StartdName"]) == ("unknown", "unknown")


def test_a_reason_with_newlines_is_written_on_one_line(tmp_path):
    log = tmp_path / "job.log"
    text = held_event(7, 0, T0, "first line\nsecond line\r\nthird\rfourth\x00\tend\n", code=1)
    assert text.count("\n") == 4  # header, reason, code, "..."
    assert "\tfirst line second line third fourth end\n" in text
    write(log, [text, released_event(7, 0, T0, "a\n...\nb")])
    held, released = read_back(log)
    assert held["HoldReason"] == "first line second line third fourth end"
    assert held["HoldReasonCode"] == 1
    # A "..." inside a reason cannot end the event early.
    assert released["Reason"] == "a ... b"


def test_startd_names_cannot_break_the_name_fields(tmp_path):
    log = tmp_path / "job.log"
    write(log, [
        disconnected_event(3, 0, T0, "lost", "slot1@evil host,x", "<1.2.3.4:5> extra"),
        reconnect_failed_event(3, 0, T0, "gone", "slot1@evil host,x"),
    ])
    disconnected, failed = read_back(log)
    assert disconnected["StartdName"] == failed["StartdName"] == "slot1@evil_host_x"
    assert disconnected["StartdAddr"] == "<1.2.3.4:5>_extra"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reason=st.text(max_size=200))
def test_any_reason_reads_back_as_its_one_line_form(tmp_path, reason):
    log = tmp_path / "any.log"
    log.unlink(missing_ok=True)
    write(log, [held_event(1, 0, T0, reason), aborted_event(1, 0, T0, reason), submit_event(2, 0, T0, SCHEDD)])
    held, aborted, submit = read_back(log)
    one_line = eventlog._one_line(reason)
    assert "\n" not in one_line and "\r" not in one_line
    if one_line and one_line != "Reason unspecified":
        assert held["HoldReason"] == one_line
    if one_line:
        assert aborted["Reason"] == one_line
    assert (submit.type, submit.cluster) == (JobEventType.SUBMIT, 2)


def test_long_reasons_are_cut_at_htcondors_limit():
    text = aborted_event(1, 0, T0, "x" * 10000)
    assert f"\t{'x' * 8191}\n" in text and "x" * 8192 not in text


def test_terminated_needs_exactly_one_of_exit_code_and_signal():
    for code, signal in [(None, None), (0, 9)]:
        with pytest.raises(ValueError, match="exactly one"):
            terminated_event(1, 0, T0, exit_code=code, exit_signal=signal, user_cpu=0, sys_cpu=0)
    with pytest.raises(ValueError, match="negative"):
        terminated_event(1, 0, T0, exit_code=-1, exit_signal=None, user_cpu=0, sys_cpu=0)
    with pytest.raises(ValueError, match="not a ClassAd attribute name"):
        terminated_event(1, 0, T0, exit_code=0, exit_signal=None, user_cpu=0, sys_cpu=0, usage={"Gpu Mem": 1})
    with pytest.raises(ValueError, match="not a job"):
        submit_event(-1, 0, T0, SCHEDD)


def test_usage_table_with_wide_and_fractional_values_reads_back(tmp_path):
    log = tmp_path / "job.log"
    text = terminated_event(
        4, 0, T0, exit_code=0, exit_signal=None, user_cpu=0, sys_cpu=0,
        requested={"Cpus": 2, "Memory": 123456789012, "Gpus": 1, "LongResourceNameHere": 1},
        allocated={"Cpus": 2, "Memory": 123456789012, "Gpus": 1, "LongResourceNameHere": 1.5},
        usage={"Cpus": 1.5, "Memory": 1.0, "Gpus": 0.75},
    )
    write(log, [text])
    (done,) = read_back(log)
    assert_same_text(done, text)
    assert (done["RequestCpus"], done["Cpus"], done["CpusUsage"]) == (2, 2, 1.5)
    assert (done["RequestMemory"], done["Memory"], done["MemoryUsage"]) == (123456789012, 123456789012, 1)
    assert (done["RequestGpus"], done["Gpus"], done["GpusUsage"]) == (1, 1, 0.75)
    assert (done["RequestLongResourceNameHere"], done["LongResourceNameHere"]) == (1, 1.5)
    assert "Gpus (Average)" in text and "Memory (MB)" in text


# ---------------------------------------------------------------------------
# EventLogWriter


def test_two_writers_append_to_the_same_file(tmp_path):
    log = tmp_path / "shared.log"
    first, second = EventLogWriter(), EventLogWriter()
    first.append(log, submit_event(20, 0, T0, SCHEDD))
    second.append(log, submit_event(21, 0, T0 + 1, SCHEDD))
    first.append(log, execute_event(20, 0, T0 + 2, STARTD))
    assert [(e.cluster, e.type) for e in read_back(log)] == [
        (20, JobEventType.SUBMIT), (21, JobEventType.SUBMIT), (20, JobEventType.EXECUTE)]


def test_concurrent_writers_never_interleave_events(tmp_path):
    log = tmp_path / "busy.log"
    per_thread = 150
    # A long reason makes each event bigger than a small write buffer would be.
    reason = "r" * 3000

    def work(cluster: int) -> None:
        writer = EventLogWriter(fsync=False)
        for proc in range(per_thread):
            writer.append(log, held_event(cluster, proc, T0, reason, code=cluster))

    threads = [threading.Thread(target=work, args=(c,)) for c in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = read_back(log)
    assert len(events) == 4 * per_thread
    for cluster in range(1, 5):
        mine = [e for e in events if e.cluster == cluster]
        assert [e.proc for e in mine] == list(range(per_thread))
        assert all(e["HoldReason"] == reason and e["HoldReasonCode"] == cluster for e in mine)


def test_default_opener_creates_the_file_0644_whatever_the_umask(tmp_path):
    log = tmp_path / "new.log"
    old_umask = os.umask(0o077)
    try:
        EventLogWriter().append(log, submit_event(1, 0, T0, SCHEDD))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(log.stat().st_mode) == 0o644
    # An existing file keeps the mode its owner gave it.
    log.chmod(0o600)
    EventLogWriter().append(log, execute_event(1, 0, T0, STARTD))
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert len(read_back(log)) == 2


class RecordingFile(io.BytesIO):
    """An in-memory "file" that records each write() call and survives close()."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed_by_writer = False

    def write(self, data) -> int:
        self.writes.append(bytes(data))
        return super().write(data)

    def close(self) -> None:
        self.closed_by_writer = True


def test_writer_uses_the_opener_it_was_given_with_one_write_per_event(tmp_path):
    opened: list[Path] = []
    files: list[RecordingFile] = []

    def opener(path: Path) -> RecordingFile:
        opened.append(path)
        files.append(RecordingFile())
        return files[-1]

    writer = EventLogWriter(opener)
    target = tmp_path / "user" / "job.log"
    texts = [submit_event(5, 0, T0, SCHEDD), held_event(5, 0, T0, "why\nnot")]
    for text in texts:
        writer.append(target, text)
    assert opened == [target, target]
    assert [f.writes for f in files] == [[texts[0].encode()], [texts[1].encode()]]
    assert all(f.closed_by_writer for f in files)
    assert not target.exists()

    # A real file through a caller's opener is written the same way and reads back.
    real = tmp_path / "real.log"
    EventLogWriter(lambda p: open(p, "ab", buffering=0)).append(real, texts[0])  # noqa: SIM115 -- the writer closes it
    assert [e.cluster for e in read_back(real)] == [5]


def test_write_errors_are_oserrors_for_the_caller(tmp_path):
    def refuse(path: Path):
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(PermissionError):
        EventLogWriter(refuse).append(tmp_path / "x.log", submit_event(1, 0, T0, SCHEDD))
    with pytest.raises(FileNotFoundError):
        EventLogWriter().append(tmp_path / "no" / "such" / "dir.log", submit_event(1, 0, T0, SCHEDD))


def test_writer_refuses_text_that_is_not_one_whole_event(tmp_path):
    log = tmp_path / "x.log"
    for bad in ["hello\n", submit_event(1, 0, T0, SCHEDD)[:-4], "...\n"]:
        with pytest.raises(ValueError, match="complete job event"):
            EventLogWriter().append(log, bad)
    assert not log.exists()
