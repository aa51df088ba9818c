"""User priorities: HTCondor's half-life formula, factors, persistence."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from gwms.negotiator.priorities import Priorities, PrioritiesFileError

DAY = 86400.0


def test_a_new_submitter_starts_at_the_minimum_priority_with_the_default_factor() -> None:
    p = Priorities(None)
    assert p.real("alice@pool") == 0.5
    assert p.effective("alice@pool") == 0.5 * 1000.0


def test_usage_raises_priority_towards_the_resources_used() -> None:
    p = Priorities(None, half_life=DAY)
    p.update({"alice@pool": 10.0}, 0.0)  # the first update only starts the clock
    assert p.real("alice@pool") == 0.5
    p.update({"alice@pool": 10.0}, DAY)  # one half-life at 10 cpus: halfway from 0.5 to 10
    assert p.real("alice@pool") == pytest.approx(0.5 * 0.5 + 0.5 * 10.0)
    p.update({"alice@pool": 10.0}, 30 * DAY)
    assert p.real("alice@pool") == pytest.approx(10.0, rel=1e-6)  # steady state: the usage


def test_idle_time_decays_priority_by_half_each_half_life() -> None:
    p = Priorities(None, half_life=3600.0)
    p.update({}, 0.0)
    p.update({"alice@pool": 100.0}, 100 * 3600.0)
    assert p.real("alice@pool") == pytest.approx(100.0)
    p.update({}, 101 * 3600.0)  # not in the usage: used nothing
    assert p.real("alice@pool") == pytest.approx(50.0)
    p.update({"alice@pool": 0.0}, 102 * 3600.0)
    assert p.real("alice@pool") == pytest.approx(25.0)
    p.update({}, 200 * 3600.0)
    assert p.real("alice@pool") == 0.5  # floored at the minimum


def test_the_formula_does_not_depend_on_how_often_it_is_updated() -> None:
    once, often = Priorities(None, half_life=DAY), Priorities(None, half_life=DAY)
    for p in (once, often):
        p.update({}, 0.0)
    once.update({"a": 8.0}, DAY)
    for k in range(1, 25):
        often.update({"a": 8.0}, k * DAY / 24)
    assert once.real("a") == pytest.approx(often.real("a"))


def test_accumulated_usage_and_last_usage_time() -> None:
    p = Priorities(None)
    p.update({"a": 4.0}, 100.0)
    p.update({"a": 4.0}, 160.0)
    p.update({}, 200.0)
    (row,) = p.table()
    assert row["AccumulatedUsage"] == pytest.approx(4.0 * 60)
    assert row["LastUsageTime"] == 160.0


def test_a_clock_going_backwards_counts_as_no_time() -> None:
    p = Priorities(None, half_life=10.0)
    p.update({}, 100.0)
    p.update({"a": 50.0}, 200.0)
    before = p.real("a")
    p.update({}, 150.0)
    assert p.real("a") == before
    assert p.last_update == 200.0


def test_effective_priority_is_real_times_factor() -> None:
    p = Priorities(None, default_factor=100.0)
    p.set_factor("vip@pool", 1.0)
    assert p.effective("vip@pool") == 0.5
    assert p.effective("other@pool") == 50.0
    with pytest.raises(ValueError):
        p.set_factor("x", 0.0)
    with pytest.raises(ValueError):
        p.set_factor("x", math.inf)


def test_table_lists_submitters_best_first() -> None:
    p = Priorities(None)
    p.update({}, 0.0)
    p.update({"busy@pool": 20.0, "quiet@pool": 1.0}, DAY)
    p.set_factor("vip@pool", 1.0)
    rows = p.table()
    assert [r["Submitter"] for r in rows] == ["vip@pool", "quiet@pool", "busy@pool"]
    assert set(rows[0]) == {"Submitter", "RealPriority", "PriorityFactor", "EffectivePriority",
                            "AccumulatedUsage", "LastUsageTime"}


def test_invalid_usage_is_refused() -> None:
    p = Priorities(None)
    with pytest.raises(ValueError):
        p.update({"a": -1.0}, 0.0)
    with pytest.raises(ValueError):
        p.update({"a": math.nan}, 0.0)


# -- persistence ---------------------------------------------------------------------------------


def test_persistence_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "priorities.json"
    p = Priorities(path, half_life=DAY)
    p.update({}, 0.0)
    p.update({"alice@pool": 12.0, "bob@pool": 3.0}, DAY)
    p.set_factor("bob@pool", 2.5)
    p.save()
    q = Priorities(path, half_life=DAY)
    assert q.table() == p.table()
    assert q.last_update == DAY
    # The clock goes on from where it was: one more half-life of idleness halves alice.
    q.update({}, 2 * DAY)
    assert q.real("alice@pool") == pytest.approx(p.real("alice@pool") / 2)


def test_a_missing_file_is_an_empty_table(tmp_path: Path) -> None:
    p = Priorities(tmp_path / "nothing-yet.json")
    assert p.table() == []


def test_only_explicit_factors_are_stored(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    p = Priorities(path, default_factor=1000.0)
    p.update({"a": 1.0}, 0.0)
    p.save()
    assert Priorities(path, default_factor=10.0).effective("a") == 0.5 * 10.0


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    p = Priorities(path)
    p.update({"a": 1.0}, 0.0)
    p.save()
    p.update({"b": 2.0}, 10.0)
    p.save()
    assert sorted(os.listdir(tmp_path)) == ["p.json"]
    assert set(json.loads(path.read_text())["submitters"]) == {"a", "b"}


def test_save_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.json"
    p = Priorities(path)
    p.update({"a": 1.0}, 0.0)
    p.save()
    old = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    p.update({"b": 1.0}, 1.0)
    with pytest.raises(OSError):
        p.save()
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["p.json"]


def test_no_path_means_memory_only() -> None:
    p = Priorities(None)
    p.update({"a": 1.0}, 0.0)
    p.save()  # nothing to do, no error


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    ("[]", "not a priorities file"),
    ('{"format": "gwms-priorities", "version": 99, "submitters": {}}', "unsupported version"),
    ('{"format": "gwms-priorities", "version": 1, "submitters": []}', "must be an object"),
    ('{"format": "gwms-priorities", "version": 1, "submitters": {"a": {"RealPriority": "high"}}}',
     "RealPriority"),
    ('{"format": "gwms-priorities", "version": 1, "submitters": {"a": {"RealPriority": 1, "PriorityFactor": -2}}}',
     "PriorityFactor"),
    ('{"format": "gwms-priorities", "version": 1, "last_update": "yesterday", "submitters": {}}', "last_update"),
])
def test_a_corrupt_priorities_file_raises_a_clear_error(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "priorities.json"
    path.write_text(content)
    with pytest.raises(PrioritiesFileError) as info:
        Priorities(path)
    assert str(path) in str(info.value)
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_truncated_file_raises_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "priorities.json"
    p = Priorities(path)
    p.update({"a": 1.0}, 0.0)
    p.save()
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(PrioritiesFileError, match="not valid JSON"):
        Priorities(path)
