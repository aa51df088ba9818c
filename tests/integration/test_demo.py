"""The README's first command: `gwms demo` runs a whole pool with glideins and a workload."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_demo_runs_jobs_in_glideins_and_stops_leaving_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gwms", "demo", "--dir", str(tmp_path), "--jobs", "3",
                             "--idle", "10", "--timeout", "150"], capture_output=True, text=True, timeout=240)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "3/3 jobs completed with exit code 0" in out
    assert "glideins: requested" in out and "running" in out  # live progress was shown
    results = sorted((tmp_path / "jobs").glob("result.*.txt"))
    assert [p.name for p in results] == ["result.0.txt", "result.1.txt", "result.2.txt"]
    assert all("input has 9 words" in p.read_text() and "glidein slot slot" in p.read_text() for p in results)
    assert "pool stopped; 0 glidein processes left" in out
    assert not list((tmp_path / "run" / "factory" / "local").glob("*/*"))  # no glidein directory left
