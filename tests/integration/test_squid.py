"""Glideins behind a real Squid (an entry's ``http_proxy``): the content-addressed glidein files
are cached, so a second glidein reads them from the cache; and a corrupted cached copy is still
caught, because every file is checked against its hash whoever served it (and then fetched
again past the cache, which replaces Squid's copy). Squid runs on
127.0.0.1 with everything in a directory of its own (sites.running_squid)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sites import Squid, SquidRequest, running_squid
from test_glideins import history, pool_config, start_pool

from gwms.cli.demo import free_port
from gwms.glidein.files import publish, startup_script, stock_validation_scripts
from gwms.testing.polling import wait_until

pytestmark = pytest.mark.integration

#: A reply Squid took from its cache without asking the origin.
HITS = ("TCP_HIT", "TCP_MEM_HIT")

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY")

JOB = """executable = /bin/true
transfer_executable = false
request_memory = 100
request_disk = 1000
{requirements}
queue 1
"""


def expected_urls(store: Path, web: str, description: str) -> list[str]:
    """What a glidein fetches, in order: the description, then every file it lists."""
    lines = (store / "descriptions" / description).read_text().splitlines()[1:]
    files = [f"{web}files/{spec.partition(':')[2]}/{name}" for spec, _kind, name in map(str.split, lines)]
    return [f"{web}descriptions/{description}", *files]


def requests_to(squid: Squid, web: str) -> list[SquidRequest]:
    return [r for r in squid.requests() if r.url.startswith(web)]


def wait_for_requests(squid: Squid, web: str, n: int) -> list[SquidRequest]:
    return wait_until(lambda: (found := requests_to(squid, web)) and len(found) >= n and found, 10,
                      f"{n} requests for {web} in Squid's access.log ({squid.access_log})")


# ------------------------------------------------------------------------------------------
# (a) A pool whose entry fetches through Squid


def submit_job(gwms_cli: Any, env: dict[str, str], jobdir: Path, requirements: str = "") -> int:
    jobdir.mkdir(parents=True)
    (jobdir / "job.sub").write_text(JOB.format(requirements=requirements and f"requirements = {requirements}"))
    result = gwms_cli("submit", str(jobdir / "job.sub"), env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1].rstrip("."))


def finished_job(gwms_cli: Any, env: dict[str, str], cluster: int) -> dict[str, Any]:
    [job] = wait_until(lambda: history(gwms_cli, env, cluster), 60, f"job {cluster} to complete")
    assert (job["JobStatus"], job["ExitCode"]) == (4, 0), job
    return job


def test_glideins_fetch_through_squid_and_the_second_one_from_its_cache(tmp_path: Path, start_daemon: Any,
                                                                        gwms_cli: Any) -> None:
    """Two glideins of an entry whose http_proxy is the Squid, one after the other (max_glideins
    = 1): both join the pool and run a job; every file of the first is a miss, every file of the
    second a hit, and Squid's log holds every fetch of both (nothing went around it)."""
    with running_squid() as squid:
        web_port = free_port()
        web = f"http://127.0.0.1:{web_port}/"
        config = pool_config(tmp_path, idle=5, backoff=0)
        text = config.read_text()
        text = text[:text.index("[factory.entry.siteB]")] + text[text.index("[frontend]"):]
        # A negotiation every second: a glidein is claimed long before its 5 s of max_idle_time.
        for old, new in [("interval = 10\n", "interval = 1\n"),
                         ("cycle_interval = 2\n\n[factory.entry.siteA]",
                          f'cycle_interval = 2\nweb_listen = "127.0.0.1:{web_port}"\n\n[factory.entry.siteA]'),
                         ("max_idle = 2\nmax_glideins = 3",
                          f'max_idle = 1\nmax_glideins = 1\nhttp_proxy = "{squid.url}"')]:
            assert old in text
            text = text.replace(old, new)
        config.write_text(text)
        pool = start_pool(start_daemon, config, tmp_path)
        env = {**os.environ, "GWMS_CONFIG": str(config)}
        store = tmp_path / "run" / "factory" / "web"
        [description] = [p.name for p in (store / "descriptions").iterdir()]
        urls = expected_urls(store, web, description)
        assert len(urls) == 6  # the description, three stock validation scripts, ca.pem, entry.attrs

        first_job = finished_job(gwms_cli, env, submit_job(gwms_cli, env, tmp_path / "job0"))
        first = wait_for_requests(squid, web, len(urls))
        assert [(r.result, r.status, r.method, r.url, r.hierarchy) for r in first] == [
            ("TCP_MISS", 200, "GET", url, "HIER_DIRECT/127.0.0.1") for url in urls]

        # Kept out of the first glidein, the second job waits until that one has idled out and
        # exited (max_glideins = 1) and the factory has sent the next.
        first_glidein = first_job["RemoteHost"].split("@")[1]
        second_job = finished_job(gwms_cli, env, submit_job(gwms_cli, env, tmp_path / "job1",
                                                            f'GLIDEIN_Name =!= "{first_glidein}"'))
        second_glidein = second_job["RemoteHost"].split("@")[1]
        assert first_glidein.startswith("siteA-") and second_glidein.startswith("siteA-")
        assert second_glidein != first_glidein

        both = wait_for_requests(squid, web, 2 * len(urls))
        assert both[:len(urls)] == first
        assert [(r.result in HITS, r.status, r.method, r.url, r.hierarchy) for r in both[len(urls):]] == [
            (True, 200, "GET", url, "HIER_NONE/-") for url in urls], both
        assert len(both) == 2 * len(urls)
        # The factory's web server saw each URL once: Squid's first fetch, nothing of the second glidein.
        served = [line.partition('"GET ')[2].split()[0] for line in pool.log_text().splitlines() if '"GET /' in line]
        assert [web.rstrip("/") + path for path in served] == urls, served


# ------------------------------------------------------------------------------------------
# (b) A corrupted copy in Squid's disk cache, glidein_startup.sh run directly

SERVER = """
import sys
from pathlib import Path
from twisted.internet import reactor
from twisted.web.server import Site
from gwms.glidein.files import GlideinFilesResource
port = reactor.listenTCP(0, Site(GlideinFilesResource(Path(sys.argv[1]))), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def clean_env() -> dict[str, str]:
    """The test's environment without any proxy of the machine running it."""
    return {k: v for k, v in os.environ.items() if k not in PROXY_VARS}


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A factory's web server (GlideinFilesResource) over a new store: (store, URL)."""
    store = tmp_path / "store"
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(store)], stdout=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, env=clean_env())
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        assert port.isdigit(), f"the web server did not start (exit {process.poll()})"
        yield store, f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=10)


class Glidein:
    """glidein_startup.sh started as a batch system would (a session of its own), its stdout and
    stderr in NAME.out and NAME.err beside the work directory."""

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.out = workdir.parent / f"{name}.out"
        self.err = workdir.parent / f"{name}.err"
        with open(self.out, "w") as stdout, open(self.err, "w") as stderr:
            self.process = subprocess.Popen(["/bin/sh", str(startup_script()), *args, "-name", name,
                                             "-workdir", str(workdir)], stdout=stdout, stderr=stderr,
                                            stdin=subprocess.DEVNULL, env=clean_env(), cwd=workdir,
                                            start_new_session=True)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for_startd_or_exit(self) -> int | None:
        """None once it has started its startd (still running), else its exit status."""
        wait_until(lambda: self.process.poll() is not None or "started gwms-startd" in self.stdout(), 30,
                   f"{self.out.stem} to start its startd or to stop")
        return self.process.poll()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def test_a_corrupted_copy_in_the_squid_cache_is_caught_and_replaced(tmp_path: Path, origin: tuple[Path, str],
                                                                    creds: Any) -> None:
    """Method: the on-disk route. This Squid has no memory cache (cache_mem 0), so every hit is
    read from its ufs swap file (TCP_HIT); the test flips bytes in the body of the swap file that
    holds a glidein file, keeping its length (Squid checks sizes, not bytes).

    The first glidein fetches everything through Squid (misses), checks it and starts its startd.
    The next one, with the same arguments, gets every file from the cache (hits, the origin not
    asked); its hash check catches the corrupted one, names it with both hashes, and fetches it
    once more past the cache (Cache-Control: no-cache: Squid asks the origin and replaces its
    copy), then goes on. A third glidein gets the good copy from the cache."""
    store, web = origin
    data = f"site data {uuid.uuid4().hex}\n".encode() * 8
    digest = hashlib.sha256(data).hexdigest()
    attrs = b"GLIDEIN_Site=Squid Site\nGLIDEIN_CPUS=1\nGLIDEIN_Min_Disk_MB=1\n"
    description = publish(store, [*(("validate", p.name, p) for p in stock_validation_scripts()),
                                  ("attrs", "entry.attrs", attrs), ("ca", "ca.pem", Path(creds.ca)),
                                  ("file", "site-data.txt", data)])
    urls = expected_urls(store, web, description)
    credential = tmp_path / "pilot.pem"
    credential.write_bytes(Path(creds.host_cert).read_bytes() + Path(creds.host_key).read_bytes())
    credential.chmod(0o600)
    workdir = tmp_path / "work"
    workdir.mkdir()
    glideins: list[Glidein] = []

    with running_squid(memory_cache=False) as squid:
        # Nothing listens at the collector's address: a startd that starts just keeps trying.
        args = ["-web", web, "-descript", description, "-entry", "squid_test", "-factory", "fact1",
                "-client", "frontend1.main", "-collectors", "127.0.0.1:9",
                "-trusted", "/O=gwms/OU=Hosts/CN=localhost", "-credential", str(credential),
                "-lifetime", "3600", "-python", sys.executable, "-http_proxy", squid.url]
        try:
            first = Glidein(args, workdir, "glidein-1")
            glideins.append(first)
            assert first.wait_for_startd_or_exit() is None, first.stderr()
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(timeout=30) == 0, first.stderr()
            assert f"fetched and checked 6 file(s) from {web.rstrip('/')} (with " in first.stdout()
            assert [(r.result, r.url) for r in requests_to(squid, web)] == [("TCP_MISS", url) for url in urls]

            [swap_file] = wait_until(lambda: squid.swap_files_ending_with(data), 10,
                                     "Squid to write site-data.txt to its disk cache")
            corrupted = bytes(b ^ 0xFF for b in data[:4]) + data[4:]
            swap_file.write_bytes(swap_file.read_bytes()[:-len(data)] + corrupted)

            second = Glidein(args, workdir, "glidein-2")
            glideins.append(second)
            assert second.wait_for_startd_or_exit() is None, second.stderr()
            third = Glidein(args, workdir, "glidein-3")
            glideins.append(third)
            assert third.wait_for_startd_or_exit() is None, third.stderr()
            for g in (second, third):
                g.process.send_signal(signal.SIGTERM)
                assert g.process.wait(timeout=30) == 0, g.stderr()
        finally:
            for g in glideins:
                g.kill()
        caught = (f"gwms glidein: site-data.txt: sha256 mismatch through the proxy {squid.url} (expected {digest}, "
                  f"got {hashlib.sha256(corrupted).hexdigest()}): fetching it again past the cache\n")
        # (After that, only what stopping the startd with TERM prints.)
        assert second.stderr().startswith(caught) and second.stderr().count("mismatch") == 1, second.stderr()
        assert "mismatch" not in third.stderr(), third.stderr()
        [data_url] = [url for url in urls if url.endswith("/site-data.txt")]
        seen = wait_for_requests(squid, web, 3 * len(urls) + 1)
        second_requests, third_requests = seen[len(urls):2 * len(urls) + 1], seen[2 * len(urls) + 1:]
        # The second glidein: every file from the cache, then site-data.txt again from the origin.
        assert [(r.result, r.url) for r in second_requests[:-1]] == [("TCP_HIT", url) for url in urls]
        refetch = second_requests[-1]
        assert refetch.url == data_url and refetch.result in ("TCP_MISS", "TCP_CLIENT_REFRESH_MISS"), refetch
        assert refetch.hierarchy == "HIER_DIRECT/127.0.0.1", refetch
        # The third: all hits, the repaired copy included.
        assert [(r.result, r.url, r.hierarchy) for r in third_requests] == [
            ("TCP_HIT", url, "HIER_NONE/-") for url in urls]
    assert not list(workdir.glob("glide_*"))
