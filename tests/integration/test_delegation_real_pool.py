"""Real daemons delegate the user's proxy the GSI way: the job finds a new proxy of the user's
identity in X509_USER_PROXY (mode 600), and a proxy the user refreshes on the submit host
reaches the running job within the schedd's proxy_check_interval."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest

from gwms.credentials import x509
from gwms.testing.polling import wait_until

from pool import start_pool

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the jobs read their proxy with openssl")

SHOW = """#!/bin/sh
openssl x509 -noout -subject -enddate -nameopt compat -in "$X509_USER_PROXY"
stat -c 'mode=%a uid=%u' "$X509_USER_PROXY"
grep -c 'BEGIN PRIVATE KEY' "$X509_USER_PROXY"
"""

WATCH = """#!/bin/sh
# Report the proxy's notAfter at start, then wait (up to 30 s) until it changes.
first=$(openssl x509 -noout -enddate -in "$X509_USER_PROXY")
echo "first $first"
[ -n "$1" ] && touch "$1"  # tells the test it has read its first proxy
i=0
while [ $i -lt 300 ]; do
    now=$(openssl x509 -noout -enddate -in "$X509_USER_PROXY" 2>/dev/null)
    if [ -n "$now" ] && [ "$now" != "$first" ]; then
        echo "changed $now at $(date +%s.%N)"
        stat -c 'mode=%a' "$X509_USER_PROXY"
        exit 0
    fi
    sleep 0.1
    i=$((i + 1))
done
echo "unchanged"
exit 1
"""

SUBMIT = """
executable = {script}
x509userproxy = x509up
output = job.out
error = job.err
should_transfer_files = YES
queue
"""


@pytest.fixture
def pool(creds, tmp_path, start_daemon):
    return start_pool(creds, tmp_path, start_daemon, slots=1, cpus=1, proxy_check_interval=1)


def _enddate(cert) -> str:
    t = cert.not_valid_after_utc
    return f"notAfter={t:%b} {t.day:2d} {t:%H:%M:%S %Y} GMT"


def _job(gwms_cli, pool, job="1.0"):
    jobs = json.loads(gwms_cli("q", job, "--json", env=pool.env).stdout)
    if jobs:
        return jobs[0]
    history = json.loads(gwms_cli("history", job.split(".")[0], "--json", env=pool.env).stdout)
    return history[0] if history else None


def _submit(gwms_cli, pool, jobdir, script, arguments=""):
    (jobdir / "job.sh").write_text(script)
    (jobdir / "job.sh").chmod(0o755)
    (jobdir / "job.sub").write_text(SUBMIT.format(script="job.sh").replace("queue", f"arguments = {arguments}\nqueue"))
    submitted = gwms_cli("submit", str(jobdir / "job.sub"), env=pool.env)
    assert submitted.returncode == 0, submitted.stderr


def test_the_job_reads_its_delegated_proxy(pool, creds, tmp_path, gwms_cli):
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    creds.proxy("alice", jobdir / "x509up", hours=12)
    users = x509.load_credential(jobdir / "x509up")
    _submit(gwms_cli, pool, jobdir, SHOW)
    done = wait_until(lambda: (j := _job(gwms_cli, pool)) and j["JobStatus"] in (4, 5) and j, 30, "the job to end")
    assert done["JobStatus"] == 4 and done["ExitCode"] == 0, (done, (jobdir / "job.err").read_text())
    assert done["x509UserProxySubject"] == "/O=gwms/OU=Users/CN=alice"
    subject, enddate, mode, keys = (jobdir / "job.out").read_text().splitlines()
    # a new proxy, one level below the user's, with its own key in the file (and only there)
    assert re.fullmatch(re.escape(f"subject={x509.dn_string(users.cert.subject)}/CN=") + r"\d+", subject), subject
    assert enddate == _enddate(users.cert)  # 24 h by default, clipped to the user's 12 h
    assert mode == f"mode=600 uid={os.geteuid()}", mode  # the job's account: here, the startd's
    assert keys == "1"


def test_a_refreshed_proxy_reaches_the_running_job(pool, creds, tmp_path, gwms_cli):
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    creds.proxy("alice", jobdir / "x509up", hours=12)
    first = x509.load_credential(jobdir / "x509up")
    _submit(gwms_cli, pool, jobdir, WATCH, arguments=str(jobdir / "read-first"))
    wait_until(lambda: (jobdir / "read-first").exists(), 20, "the job to read its first proxy")
    creds.proxy("alice", jobdir / "x509up", hours=20)  # the user refreshes the file (atomically)
    refreshed = time.time()
    second = x509.load_credential(jobdir / "x509up")
    done = wait_until(lambda: (j := _job(gwms_cli, pool)) and j["JobStatus"] in (4, 5) and j, 40, "the job to end")
    out = (jobdir / "job.out").read_text().splitlines()
    assert done["JobStatus"] == 4 and done["ExitCode"] == 0, (out, (jobdir / "job.err").read_text())
    assert out[0] == f"first {_enddate(first.cert)}"
    changed = re.fullmatch(r"changed (notAfter=.*) at ([0-9.]+)", out[1])
    assert changed and changed.group(1) == _enddate(second.cert), out
    seen_after = float(changed.group(2)) - refreshed
    # proxy_check_interval is 1 s: the job has it within that, plus a round trip and its 0.1 s poll
    print(f"re-delegation seen by the job {seen_after:.2f} s after the refresh")
    assert seen_after < 2.5, seen_after
    assert out[2] == "mode=600"
    assert done["x509UserProxyExpiration"] == int(second.cert.not_valid_after_utc.timestamp())
