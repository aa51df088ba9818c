"""A one-host pool whose startds arrive only as glideins, with real processes on 127.0.0.1:
`twistd -n gwms-pool` (collectors, negotiator, schedd, factory on the local grid, frontend) and,
for the restart test, a separate `twistd -n gwms-factory`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gwms.cli.demo import ONEHOST, free_port
from gwms.testing.polling import wait_until

pytestmark = pytest.mark.integration

JOB = """#!/bin/sh
echo "job $1: $(wc -w < input.txt) words" > "result.$1.txt"
echo "stdout of $1"
"""

SUBMIT = """
executable = job.sh
arguments = $(Process)
transfer_input_files = input.txt
transfer_output_files = result.$(Process).txt
output = job.$(Process).out
log = jobs.log
request_memory = 100
request_disk = 10000
queue {n}
"""


def pool_config(workdir: Path, idle: float = 8, backoff: float = 0, entries: bool = True, entry: str = "") -> Path:
    """gwms-pool's one-host configuration: the two local entries unless not ``entries``, and
    ``entry`` (TOML of more entries)."""
    text = ONEHOST.format(port=0, idle=idle)
    text = text.replace('address_file = "run/collector.address"', 'address_file = "pool.address"')
    text = text.replace("failure_backoff = 5", f"failure_backoff = {backoff}")
    if not entries:
        text = text[:text.index("[factory.entry.siteA]")] + text[text.index("[frontend]"):]
    text = text.replace("[frontend]", entry + "\n[frontend]", 1)
    (workdir / "run").mkdir(parents=True, exist_ok=True)
    config = workdir / "onehost.toml"
    config.write_text(text)
    return config


def start_pool(start_daemon, config: Path, workdir: Path):
    """gwms-pool, once every role listens (the collectors first, the rest when they do)."""
    pool = start_daemon("pool", config, workdir)
    wait_until(lambda: (workdir / "run" / "schedd.address").exists()
               and (workdir / "run" / "glidein-collector.address").exists(), 30, "gwms-pool's schedd to listen")
    return pool


def glidein_processes(area: Path) -> list[int]:
    needle = os.fsencode(str(area))
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def glidein_dirs(area: Path) -> list[Path]:
    return sorted(area.glob("local/*/*"))


def submit(gwms_cli, env: dict[str, str], jobdir: Path, n: int) -> int:
    jobdir.mkdir(parents=True, exist_ok=True)
    (jobdir / "input.txt").write_text("one two three\n")
    (jobdir / "job.sh").write_text(JOB)
    (jobdir / "job.sh").chmod(0o755)
    (jobdir / "job.sub").write_text(SUBMIT.format(n=n))
    result = gwms_cli("submit", str(jobdir / "job.sub"), env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1].rstrip("."))


def history(gwms_cli, env: dict[str, str], cluster: int) -> list[dict]:
    result = gwms_cli("history", str(cluster), "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def external_factory_config(tmp_path: Path, pool_config_path: Path, factory_dir: Path, allowed: str) -> Path:
    """A separate gwms-factory with one local entry, siteC, advertising to gwms-pool's glidein
    collector with the pool's credentials; ``allowed`` is the entry's one allowed frontend."""
    glidein_collector = (tmp_path / "run" / "glidein-collector.address").read_text().strip()
    factory_dir.mkdir()
    text = pool_config_path.read_text()
    creds = tmp_path / "run" / "credentials"
    text = text[:text.index("[onehost]")] + f"""
[factory]
name = "external-factory"
work_dir = "{factory_dir}/work"
collectors = ["{glidein_collector}"]
cycle_interval = 1
credential = "{creds}/pilot.pem"
address_file = "{factory_dir}/factory.address"
web_listen = "127.0.0.1:{free_port()}"

[factory.entry.siteC]
grid = "local"
attributes = {{ GLIDEIN_Site = "SiteC", GLIDEIN_CPUS = 1 }}
allowed_frontends = ["{allowed}"]
max_idle = 2
max_glideins = 2
max_idle_time = 60
failure_backoff = 0
"""
    text = text.replace('audit_log = "run/audit.jsonl"', f'audit_log = "{factory_dir}/audit.jsonl"\n'
                        f'ca = "{creds}/ca.pem"\ncert = "{creds}/host-localhost.pem"\n'
                        f'key = "{creds}/host-localhost.key"')
    config = factory_dir / "factory.toml"
    config.write_text(text)
    return config


def test_jobs_run_only_in_glideins_which_then_exit_and_leave_nothing_behind(tmp_path, start_daemon, gwms_cli):
    """The glideins listen on 127.0.0.2, as on a batch node: an address their pilot certificate
    does not name (localhost, 127.0.0.1, ::1). The schedd claims them by the DN the collector
    authenticated for their slots, not by that address."""
    config = pool_config(tmp_path, idle=6)
    config.write_text(config.read_text().replace('grid = "local"\n', 'grid = "local"\nworker_listen = "127.0.0.2"\n'))
    pool = start_pool(start_daemon, config, tmp_path)
    env = {**os.environ, "GWMS_CONFIG": str(config)}
    cluster = submit(gwms_cli, env, tmp_path / "jobs", 4)
    done = wait_until(lambda: (h := history(gwms_cli, env, cluster)) and len(h) == 4 and h, 120,
                      "the jobs to complete")
    assert sorted((j["ProcId"], j["JobStatus"], j["ExitCode"]) for j in done) == [(i, 4, 0) for i in range(4)]
    # Every job ran in a glidein's slot: slotN@<entry>-<glidein id>
    assert all(j["RemoteHost"].split("@")[1].startswith(("siteA-", "siteB-")) for j in done), done
    assert all(j["StartdAddress"].startswith("127.0.0.2:") for j in done), done
    assert "does not match" not in pool.log_text()
    jobdir = tmp_path / "jobs"
    assert [(jobdir / f"result.{i}.txt").read_text() for i in range(4)] == [f"job {i}: 3 words\n" for i in range(4)]
    assert (jobdir / "job.0.out").read_text() == "stdout of 0\n"
    area = tmp_path / "run" / "factory"
    # Idle for 6 s, the glideins exit; the factory sees them end and forgets them.
    wait_until(lambda: not glidein_dirs(area) and not glidein_processes(area), 90,
               "the idle glideins to exit and be cleaned up")
    log = pool.log_text()
    assert "submitted" in log and "finished (exit code 0)" in log


def test_a_tampered_glidein_file_stops_the_glidein_which_names_the_file(tmp_path, start_daemon, gwms_cli):
    config = pool_config(tmp_path, idle=30)
    pool = start_pool(start_daemon, config, tmp_path)
    env = {**os.environ, "GWMS_CONFIG": str(config)}
    store = tmp_path / "run" / "factory" / "web" / "files"
    [script] = list(store.glob("*/30-python.sh"))
    script.write_text(script.read_text() + "\necho tampered\n")  # same path, other content
    cluster = submit(gwms_cli, env, tmp_path / "jobs", 1)
    wait_until(lambda: "30-python.sh: sha256 mismatch" in pool.log_text(), 60,
               "a glidein to refuse the tampered file")
    line = next(line for line in pool.log_text().splitlines() if "30-python.sh: sha256 mismatch" in line)
    assert f"expected {script.parent.name}" in line and "got " in line
    status = gwms_cli("status", "--json", "--pool", pool.address, env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == []  # no glidein joined the pool
    assert history(gwms_cli, env, cluster) == []


def test_a_restarted_factory_finds_its_glideins_and_submits_no_duplicates(tmp_path, start_daemon, gwms_cli):
    config = pool_config(tmp_path, idle=60, entries=False)  # the pool's own factory has no entries
    start_pool(start_daemon, config, tmp_path)
    factory_dir = tmp_path / "factory"
    factory_config = external_factory_config(tmp_path, config, factory_dir, "/O=gwms/OU=Hosts/CN=localhost")
    factory = start_daemon("factory", factory_config, factory_dir)
    env = {**os.environ, "GWMS_CONFIG": str(config)}
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    # Long enough that jobs still wait after the restart: the frontend keeps asking, and only
    # the factory's records stop it from submitting beyond max_glideins.
    (jobs / "sleep.sub").write_text("executable = /bin/sleep\narguments = 25\ntransfer_executable = false\n"
                                    "request_memory = 100\nrequest_disk = 1000\nqueue 6\n")
    assert gwms_cli("submit", str(jobs / "sleep.sub"), env=env).returncode == 0
    area = factory_dir / "work"
    def reported(rows_wanted: Any) -> Any:
        rows = json.loads(gwms_cli("factory", "status", "--json", env=env).stdout or "[]")
        return any(r["client"] != "(all)" and rows_wanted(r) for r in rows)

    # Both glideins running (their startds up): they need the factory no more.
    wait_until(lambda: reported(lambda r: r["running"] == 2), 60, "two glideins running at siteC")
    before = glidein_dirs(area)
    assert len(before) == 2
    factory.kill9()
    restarted = factory.restart()
    # The restarted factory reports the two glideins it found in its records ...
    wait_until(lambda: reported(lambda r: r["idle"] + r["running"] == 2 and r["requested"] > 0), 30,
               "the restarted factory to report its two glideins while jobs still wait")
    # ... and, with jobs still waiting (so the frontend keeps asking), submits none beyond them.
    assert glidein_dirs(area) == before
    assert restarted.log_text().count("factory: submitted") == 1  # the first run's (both share the log)
    queue = json.loads(gwms_cli("q", "--json", env=env).stdout)
    assert any(j["JobStatus"] == 1 for j in queue)  # demand was still there


def test_a_factory_ignores_and_audits_a_frontend_that_is_not_allowed(tmp_path, start_daemon, gwms_cli):
    config = pool_config(tmp_path, idle=60, entries=False)
    start_pool(start_daemon, config, tmp_path)
    factory_dir = tmp_path / "factory"
    factory = start_daemon("factory", external_factory_config(tmp_path, config, factory_dir,
                                                              "/O=gwms/OU=Hosts/CN=another-frontend"), factory_dir)
    env = {**os.environ, "GWMS_CONFIG": str(config)}
    submit(gwms_cli, env, tmp_path / "jobs", 2)
    audit = factory_dir / "audit.jsonl"
    event = wait_until(lambda: audit.exists() and next(
        (e for e in map(json.loads, audit.read_text().splitlines()) if e.get("event") == "glidein request ignored"),
        None), 30, "the factory to audit the request it ignored")
    assert (event["identity"], event["entry"], event["reason"]) == (
        "/O=gwms/OU=Hosts/CN=localhost", "siteC", "not in the entry's allowed_frontends")
    # The frontend keeps asking; three factory cycles (one a second) later still nothing was submitted.
    glidein_collector = (tmp_path / "run" / "glidein-collector.address").read_text().strip()

    def entry_heard() -> int:
        ads = json.loads(gwms_cli("status", "--type", "glidefactory", "--json", "--pool", glidein_collector,
                                  env=env).stdout or "[]")
        return ads[0]["LastHeardFrom"] if ads else 0

    first = wait_until(entry_heard, 30, "the factory's entry ad")
    wait_until(lambda: entry_heard() >= first + 3, 30, "three more factory cycles")
    requests = json.loads(gwms_cli("frontend", "status", "--json", env=env).stdout)
    assert [(r["entry"], r["req_idle"] > 0) for r in requests] == [("siteC@external-factory", True)]
    assert "factory: submitted" not in factory.log_text()
    assert not glidein_dirs(factory_dir / "work")


def test_a_glidein_with_only_a_token_joins_and_runs_jobs(tmp_path, start_daemon, gwms_cli):
    """pilot_token: the glidein holds a pool-signed token for ADVERTISE_STARTD and no certificate;
    its startd serves TLS with a certificate of its own, which the schedd knows by the
    fingerprint in the slot ad (advertised with the token)."""
    config = pool_config(tmp_path, idle=8)
    text = config.read_text()
    text = text.replace('[security.ADVERTISE_STARTD]\nallow = ["/O=gwms/OU=Pilots/CN=glidein"]',
                        '[security.ADVERTISE_STARTD]\nallow_regex = ["glidein-.*@demo-factory"]')
    text = text.replace('[factory.entry.siteA]\ngrid = "local"', '[factory.entry.siteA]\ngrid = "local"\npilot_token = true')
    text = text.replace('[factory.entry.siteB]', '[factory.entry.siteB]\nenabled = false')
    config.write_text(text)
    pool = start_pool(start_daemon, config, tmp_path)
    env = {**os.environ, "GWMS_CONFIG": str(config)}
    cluster = submit(gwms_cli, env, tmp_path / "jobs", 2)
    done = wait_until(lambda: (h := history(gwms_cli, env, cluster)) and len(h) == 2 and h, 120,
                      "the jobs to complete in token glideins")
    assert sorted((j["ProcId"], j["ExitCode"]) for j in done) == [(0, 0), (1, 0)]
    slots = json.loads(gwms_cli("status", "--json", "--pool", pool.address, env=env).stdout)
    assert slots and all(s["AuthenticatedIdentity"].startswith("glidein-siteA-") for s in slots)
    assert all(len(s["TLSCertificateSHA256"]) == 64 for s in slots)
