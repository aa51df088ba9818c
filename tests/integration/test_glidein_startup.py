"""glidein_startup.sh for real: under dash, against a real HTTP server serving a published store
(GlideinFilesResource in a twistd-less Twisted process), with a real collector for the glideins
that get as far as starting their startd."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pool import HOST_DN, write_config

from gwms.glidein.files import publish, startup_script, stock_validation_scripts
from gwms.testing.polling import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASH = shutil.which("dash")
if DASH is None:
    pytest.skip("dash is not installed (the script must be tested under dash)", allow_module_level=True)

# An identity with spaces and a comma: quoted through every layer or the test fails.
ODD_DN = "/O=gwms/OU=Some Schedds/CN=schedd 2, the backup"

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

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any proxy of the machine running it."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env.update(extra)
    return env


class WebServer:
    def __init__(self, store: Path, process: subprocess.Popen[str], port: int) -> None:
        self.store = store
        self.process = process
        self.url = f"http://127.0.0.1:{port}"


def serve(store: Path) -> Iterator[WebServer]:
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(store)], stdout=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True, env=clean_env())
    assert process.stdout is not None
    line = process.stdout.readline()  # the port, or EOF if the server died
    if not line.strip().isdigit():
        process.kill()
        raise AssertionError(f"the web server did not start (exit {process.wait()})")
    yield WebServer(store, process, int(line))
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    """The factory's web server over one store (content-addressed, so tests can share it)."""
    yield from serve(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def frontend_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    """A frontend's own web server over its own store (-client_web, -client_descript)."""
    yield from serve(tmp_path_factory.mktemp("frontend-store"))


#: A web server that does not exist: only through the proxy do its URLs lead anywhere.
FACTORY_URL = "http://glidein-factory.invalid/web"


class Proxy:
    """An HTTP proxy that forwards requests for FACTORY_URL to the factory's web server and
    records the URLs it was asked for: a glidein pointed at FACTORY_URL gets its files only if
    its fetcher honoured http_proxy."""

    def __init__(self, target: str) -> None:
        self.requests: list[str] = []
        self.fresh: list[str] = []  # asked with Cache-Control: no-cache (past any cache)
        # Answered corrupted: always, or (a bad cached copy) unless asked past the cache.
        self.corrupt_always: set[str] = set()
        self.corrupt_cached: set[str] = set()
        proxy = self
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.requests.append(self.path)
                if not self.path.startswith(FACTORY_URL + "/"):
                    self.send_error(502)
                    return
                try:
                    with direct.open(target + self.path[len(FACTORY_URL):], timeout=30) as reply:
                        status, body = reply.status, reply.read()
                except urllib.error.HTTPError as e:
                    status, body = e.code, b""
                past_cache = "no-cache" in (self.headers.get("Cache-Control") or "")
                if past_cache:
                    proxy.fresh.append(self.path)
                if body and (self.path in proxy.corrupt_always or (self.path in proxy.corrupt_cached and not past_cache)):
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(web: WebServer) -> Iterator[Proxy]:
    p = Proxy(web.url)
    yield p
    p.close()


@pytest.fixture(scope="module")
def credential(creds: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pilot credential: the test CA's host certificate and key in one PEM file."""
    path = tmp_path_factory.mktemp("pilot") / "pilot.pem"
    path.write_bytes(Path(creds.host_cert).read_bytes() + Path(creds.host_key).read_bytes())
    path.chmod(0o600)
    return path


def glidein_args(web_url: str, descript: str, credential: Path, name: str = "glidein-1",
                 collectors: str = "127.0.0.1:9", **options: str) -> list[str]:
    args = ["-web", web_url, "-descript", descript, "-entry", "ITB_Test", "-factory", "fact1",
            "-client", "frontend1.main", "-name", name, "-collectors", collectors,
            "-trusted", HOST_DN, "-trusted", ODD_DN, "-credential", str(credential),
            "-lifetime", "3600", "-python", sys.executable]
    for key, value in options.items():
        args += [f"-{key}", value]
    return args


def run_glidein(args: list[str], workdir: Path, env: dict[str, str] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DASH, str(startup_script()), "-workdir", str(workdir), *args],
                          check=False, capture_output=True, text=True, env=env or clean_env(), timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=workdir)


def glide_dirs(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("glide_*"))


def unique(tag: str) -> str:
    """A name (and content) no other test publishes: tampering with it touches no one else."""
    return f"{tag}-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------------------
# The stock validation scripts on their own


def test_stock_validation_scripts_report_the_node_and_refuse_too_little(tmp_path: Path) -> None:
    config = tmp_path / "glidein_config"
    config.write_text(f"GLIDEIN_Dir={tmp_path}\nGLIDEIN_Min_Disk_MB=1\n")
    env = clean_env(GLIDEIN_PYTHON=sys.executable)
    outputs = {}
    for script in stock_validation_scripts():
        done = subprocess.run([DASH, str(script), str(config)], check=False, capture_output=True, text=True, env=env)
        assert done.returncode == 0, (script.name, done.stderr)
        outputs[script.name] = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert [s.name for s in stock_validation_scripts()] == ["10-disk.sh", "20-cpu-memory.sh", "30-python.sh"]
    assert int(outputs["10-disk.sh"]["GLIDEIN_Disk_Free_MB"]) > 1
    assert int(outputs["20-cpu-memory.sh"]["GLIDEIN_Host_CPUS"]) == os.cpu_count() or \
        int(outputs["20-cpu-memory.sh"]["GLIDEIN_Host_CPUS"]) == len(os.sched_getaffinity(0))
    assert int(outputs["20-cpu-memory.sh"]["GLIDEIN_Host_MemMB"]) > 0
    assert outputs["30-python.sh"]["GLIDEIN_Python_Version"] == ".".join(map(str, sys.version_info[:3]))

    # Too little of each: the message says what was found and what was needed.
    cpus = outputs["20-cpu-memory.sh"]["GLIDEIN_Host_CPUS"]
    config.write_text(f"GLIDEIN_Dir={tmp_path}\nGLIDEIN_Min_Disk_MB=999999999\n"
                      "GLIDEIN_CPUS=100000\nGLIDEIN_MaxMemMBs=1\n")
    disk = subprocess.run([DASH, str(stock_validation_scripts()[0]), str(config)], check=False, capture_output=True, text=True)
    assert disk.returncode == 1
    free = outputs["10-disk.sh"]["GLIDEIN_Disk_Free_MB"]
    assert disk.stderr.startswith(f"gwms validate: {tmp_path} has ")
    assert disk.stderr.endswith(" MB free, GLIDEIN_Min_Disk_MB needs 999999999 MB\n"), (disk.stderr, free)
    cpu = subprocess.run([DASH, str(stock_validation_scripts()[1]), str(config)], check=False, capture_output=True, text=True)
    assert (cpu.returncode, cpu.stderr) == (1, f"gwms validate: this node has {cpus} CPU(s), GLIDEIN_CPUS needs 100000\n")
    py = subprocess.run([DASH, str(stock_validation_scripts()[2]), str(config)], check=False, capture_output=True, text=True,
                        env=clean_env(GLIDEIN_PYTHON="/nonexistent/python"))
    assert (py.returncode, py.stderr) == (1, "gwms validate: /nonexistent/python does not run\n")


# ------------------------------------------------------------------------------------------
# Options


def test_unknown_or_missing_options_print_usage_and_exit_2(tmp_path: Path, credential: Path) -> None:
    args = glidein_args("http://127.0.0.1:9", "0" * 64, credential)
    bad = run_glidein([*args, "-colour", "blue"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("gwms glidein: unknown option: -colour\nusage: glidein_startup.sh -web URL")
    i = args.index("-lifetime")
    missing = run_glidein(args[:i] + args[i + 2:], tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.startswith("gwms glidein: missing required option -lifetime\nusage:")
    no_value = run_glidein([*args, "-idle"], tmp_path)
    assert (no_value.returncode, no_value.stderr.splitlines()[0]) == (2, "gwms glidein: option -idle needs a value")
    octal = run_glidein([*args, "-retire", "010"], tmp_path)
    assert (octal.returncode, octal.stderr.splitlines()[0]) == (
        2, "gwms glidein: -retire must be a whole number of seconds, got '010'")
    forged = run_glidein([*args, "-entry", "x\nGLIDEIN_Trusted=*"], tmp_path)
    assert (forged.returncode, forged.stderr.splitlines()[0]) == (
        2, "gwms glidein: the value of -entry contains a newline")
    assert glide_dirs(tmp_path) == []


@pytest.mark.parametrize("extra,message", [
    (["-batch_time_limit", "10"], "-batch_time_limit 10 leaves no time to run (15 s are kept to stop)"),
    (["-batch_time_limit", "15"], "-batch_time_limit 15 leaves no time to run (15 s are kept to stop)"),
    (["-batch_time_limit", "1h"], "-batch_time_limit must be a positive whole number of seconds, got '1h'"),
    (["-batch_time_limit", "0"], "-batch_time_limit must be a positive whole number of seconds, got '0'"),
    (["-batch_time_limit", "-60"], "-batch_time_limit must be a positive whole number of seconds, got '-60'"),
    (["-batch_time_limit", "0600"], "-batch_time_limit must be a positive whole number of seconds, got '0600'"),
    (["-http_proxy", "https://squid.example:3128"],
     "-http_proxy must be an http:// URL, got 'https://squid.example:3128'"),
    (["-http_proxy", "squid.example:3128"], "-http_proxy must be an http:// URL, got 'squid.example:3128'"),
    (["-http_proxy", "http://"], "-http_proxy must be an http:// URL, got 'http://'"),
    (["-http_proxy", "-K/etc/passwd"], "-http_proxy must be an http:// URL, got '-K/etc/passwd'"),
])
def test_batch_time_limit_and_http_proxy_are_checked(tmp_path: Path, credential: Path, extra: list[str],
                                                     message: str) -> None:
    done = run_glidein([*glidein_args("http://127.0.0.1:9", "0" * 64, credential), *extra], tmp_path)
    assert (done.returncode, done.stderr.splitlines()[0]) == (2, f"gwms glidein: {message}"), extra
    assert "usage: glidein_startup.sh" in done.stderr
    assert glide_dirs(tmp_path) == []


# The glidein's times as glidein_config has them, reported by a validation script that then
# stops the glidein.
REPORT_TIMES = b"""printf 'GLIDEIN_Lifetime=%s GLIDEIN_Retire=%s\\n' "$(sed -n 's/^GLIDEIN_Lifetime=//p' "$1")" \\
    "$(sed -n 's/^GLIDEIN_Retire=//p' "$1")" >&2
exit 1
"""


@pytest.mark.parametrize("lifetime,retire,limit,expected", [
    ("3600", None, "100", (85, 77)),  # 100 s less 15 to stop (a tenth, at least 15)
    ("3600", None, "7200", (3600, 3240)),  # a limit beyond the lifetime changes nothing
    ("3600", None, "2000", (1800, 1620)),  # a tenth kept to stop
    ("3600", None, "3600", (3300, 2970)),  # at most 5 minutes kept to stop
    ("86400", None, "36000", (35700, 32130)),
    ("3600", "3000", "1000", (900, 810)),  # a retire time past the new lifetime is recomputed
    ("3600", "500", "1000", (900, 500)),  # one within it stays
    ("3600", None, "16", (1, 1)),
])
def test_batch_time_limit_ends_the_glidein_before_the_batch_system_would(web: WebServer, credential: Path,
                                                                         tmp_path: Path, lifetime: str,
                                                                         retire: str | None, limit: str,
                                                                         expected: tuple[int, int]) -> None:
    descript = publish(web.store, [("validate", "times.sh", REPORT_TIMES)])
    args = glidein_args(web.url, descript, credential, batch_time_limit=limit)
    args[args.index("-lifetime") + 1] = lifetime
    if retire is not None:
        args += ["-retire", retire]

    done = run_glidein(args, tmp_path)

    assert done.returncode == 1, done.stderr
    assert done.stderr.endswith("gwms glidein: validation times.sh failed: "
                                f"GLIDEIN_Lifetime={expected[0]} GLIDEIN_Retire={expected[1]}\n"), done.stderr
    assert glide_dirs(tmp_path) == []


# ------------------------------------------------------------------------------------------
# (i) tampering


def test_a_tampered_file_stops_the_glidein_before_anything_runs(web: WebServer, credential: Path,
                                                               tmp_path: Path) -> None:
    marker = tmp_path / "validation-ran"
    data_name = unique("data") + ".txt"
    descript = publish(web.store, [
        ("validate", "mark.sh", f"touch '{marker}'\n".encode()),
        ("file", data_name, f"the real {data_name}\n".encode()),
    ])
    digest = hashlib.sha256(f"the real {data_name}\n".encode()).hexdigest()
    tampered = b"something else\n"
    (web.store / "files" / digest / data_name).write_bytes(tampered)
    workdir = tmp_path / "work"
    workdir.mkdir()

    done = run_glidein(glidein_args(web.url, descript, credential), workdir)

    assert done.returncode == 1, done.stderr
    assert (f"gwms glidein: {data_name}: sha256 mismatch: expected {digest}, "
            f"got {hashlib.sha256(tampered).hexdigest()}\n") in done.stderr
    assert "started gwms-startd" not in done.stdout
    assert not marker.exists()  # files are all checked before any script runs
    assert glide_dirs(workdir) == []


def test_a_tampered_description_is_refused(web: WebServer, credential: Path, tmp_path: Path) -> None:
    descript = publish(web.store, [("file", unique("d"), b"x")])
    forged = b"# gwms glidein description 1\n"
    (web.store / "descriptions" / descript).write_bytes(forged)

    done = run_glidein(glidein_args(web.url, descript, credential), tmp_path)

    assert done.returncode == 1
    assert done.stderr == (f"gwms glidein: description: sha256 mismatch: expected {descript}, "
                           f"got {hashlib.sha256(forged).hexdigest()}\n")
    assert glide_dirs(tmp_path) == []


# ------------------------------------------------------------------------------------------
# (ii) validation failure


def test_a_failing_validation_script_ends_the_glidein_after_the_back_off(web: WebServer, credential: Path,
                                                                        tmp_path: Path) -> None:
    failing = (b'echo "GLIDEIN_Seen=1"\necho "checking the GPU" >&2\n'
               b'echo "no GPU here: found 0, need 1" >&2\necho >&2\nexit 3\n')
    descript = publish(web.store, [("validate", "gpu.sh", failing)])

    started = time.monotonic()
    done = run_glidein(glidein_args(web.url, descript, credential, failure_backoff="1"), tmp_path)
    took = time.monotonic() - started

    assert done.returncode == 1
    assert done.stderr.endswith("gwms glidein: validation gpu.sh failed: no GPU here: found 0, need 1\n")
    assert "checking the GPU\n" in done.stderr  # the script's own messages stay in the job's stderr
    assert took >= 1.0
    assert glide_dirs(tmp_path) == []


def test_a_validation_failure_without_a_message_names_the_exit_status(web: WebServer, credential: Path,
                                                                     tmp_path: Path) -> None:
    descript = publish(web.store, [("validate", "ok.sh", b"exit 0\n"), ("validate", "quiet.sh", b"exit 7\n")])
    done = run_glidein(glidein_args(web.url, descript, credential), tmp_path)
    assert (done.returncode, done.stderr) == (1, "gwms glidein: validation quiet.sh failed: exit status 7\n")
    assert "validation ok.sh passed" in done.stdout


# ------------------------------------------------------------------------------------------
# (iv) fetchers, hashers and http_proxy


def tool_dir(tmp_path: Path, tools: list[str]) -> Path:
    """A PATH directory with just these tools (symlinks); sh is dash."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(DASH)
    for tool in tools:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not installed")
        (bin_dir / tool).symlink_to(found)
    return bin_dir


BASIC_TOOLS = ["mktemp", "mkdir", "rm", "cat", "sed", "tail", "date", "sleep", "dirname"]


@pytest.mark.parametrize("fetcher", ["python", "curl", "wget"])
def test_every_fetcher_honours_http_proxy_and_checks_sha1_and_sha256(web: WebServer, credential: Path,
                                                                    tmp_path: Path, proxy: Proxy,
                                                                    fetcher: str) -> None:
    # A description written by hand (publish writes only SHA-256): SHA-1 is accepted too.
    payload = f"payload {unique('p')}\n".encode()
    sha1 = hashlib.sha1(payload).hexdigest()
    (web.store / "files" / sha1).mkdir(parents=True, exist_ok=True)
    (web.store / "files" / sha1 / "data.txt").write_bytes(payload)
    inner = publish(web.store, [("validate", "stop.sh", b'cat "$(dirname "$1")/files/data.txt" >&2\nexit 1\n')])
    stop_line = (web.store / "descriptions" / inner).read_text().splitlines()[1]
    description = f"# gwms glidein description 1\nsha1:{sha1} file data.txt\n{stop_line}\n".encode()
    descript = hashlib.sha256(description).hexdigest()
    (web.store / "descriptions" / descript).write_bytes(description)
    # Python's hashlib must do the hashing too: no sha*sum and no openssl on this PATH.
    tools = BASIC_TOOLS + ([] if fetcher == "python" else [fetcher])
    env = clean_env(PATH=str(tool_dir(tmp_path, tools)), http_proxy=proxy.url)
    workdir = tmp_path / "work"
    workdir.mkdir()

    done = run_glidein(glidein_args(FACTORY_URL, descript, credential), workdir, env)

    assert done.returncode == 1, done.stderr
    assert done.stderr.endswith(f"gwms glidein: validation stop.sh failed: {payload.decode().strip()}\n"), done.stderr
    assert f"(with {fetcher})" in done.stdout
    stop_digest = stop_line.split()[0].removeprefix("sha256:")
    assert proxy.requests == [f"{FACTORY_URL}/descriptions/{descript}", f"{FACTORY_URL}/files/{sha1}/data.txt",
                              f"{FACTORY_URL}/files/{stop_digest}/stop.sh"]
    assert glide_dirs(workdir) == []


@pytest.mark.parametrize("fetcher", ["python", "curl", "wget"])
def test_the_http_proxy_option_wins_over_the_nodes_proxy_settings(web: WebServer, credential: Path, tmp_path: Path,
                                                                   proxy: Proxy, fetcher: str) -> None:
    # The node's own settings would send the glidein to a dead proxy, or bypass every proxy:
    # with -http_proxy, the fetches (and what the glidein runs) go through the entry's.
    report = b'echo "http_proxy=$http_proxy no_proxy=${no_proxy-unset} NO_PROXY=${NO_PROXY-unset}" >&2\nexit 1\n'
    descript = publish(web.store, [("validate", "report.sh", report)])
    digest = hashlib.sha256(report).hexdigest()
    tools = BASIC_TOOLS + ([] if fetcher == "python" else [fetcher])
    env = clean_env(PATH=str(tool_dir(tmp_path, tools)), http_proxy="http://127.0.0.1:9", no_proxy="*",
                    NO_PROXY="*")
    workdir = tmp_path / "work"
    workdir.mkdir()

    done = run_glidein(glidein_args(FACTORY_URL, descript, credential, http_proxy=proxy.url), workdir, env)

    assert done.returncode == 1, done.stderr
    assert f"(with {fetcher})" in done.stdout
    assert done.stderr.endswith(f"gwms glidein: validation report.sh failed: http_proxy={proxy.url} no_proxy= "
                                "NO_PROXY=\n"), done.stderr
    assert proxy.requests == [f"{FACTORY_URL}/descriptions/{descript}", f"{FACTORY_URL}/files/{digest}/report.sh"]
    assert glide_dirs(workdir) == []


@pytest.mark.parametrize("fetcher", ["python", "curl", "wget"])
def test_a_copy_corrupted_in_the_proxys_cache_is_caught_and_fetched_again_past_the_cache(
        web: WebServer, credential: Path, tmp_path: Path, proxy: Proxy, fetcher: str) -> None:
    report = b'echo "validation ran" >&2\nexit 1\n'
    descript = publish(web.store, [("validate", "report.sh", report)])
    digest = hashlib.sha256(report).hexdigest()
    url = f"{FACTORY_URL}/files/{digest}/report.sh"
    proxy.corrupt_cached.add(url)
    tools = BASIC_TOOLS + ([] if fetcher == "python" else [fetcher])
    env = clean_env(PATH=str(tool_dir(tmp_path, tools)))
    workdir = tmp_path / "work"
    workdir.mkdir()

    done = run_glidein(glidein_args(FACTORY_URL, descript, credential, http_proxy=proxy.url), workdir, env)

    bad = hashlib.sha256(bytes([report[0] ^ 0xFF]) + report[1:]).hexdigest()
    assert (f"gwms glidein: report.sh: sha256 mismatch through the proxy {proxy.url} (expected {digest}, "
            f"got {bad}): fetching it again past the cache\n") in done.stderr
    # The second copy, from the server, is checked and used.
    assert done.stderr.endswith("gwms glidein: validation report.sh failed: validation ran\n"), done.stderr
    assert proxy.requests == [f"{FACTORY_URL}/descriptions/{descript}", url, url]
    assert proxy.fresh == [url]
    assert glide_dirs(workdir) == []


def test_a_file_still_wrong_past_the_cache_stops_the_glidein(web: WebServer, credential: Path, tmp_path: Path,
                                                              proxy: Proxy) -> None:
    report = b'echo "validation ran" >&2\nexit 1\n'
    descript = publish(web.store, [("validate", "report.sh", report)])
    digest = hashlib.sha256(report).hexdigest()
    url = f"{FACTORY_URL}/files/{digest}/report.sh"
    proxy.corrupt_always.add(url)
    workdir = tmp_path / "work"
    workdir.mkdir()

    done = run_glidein(glidein_args(FACTORY_URL, descript, credential, http_proxy=proxy.url), workdir)

    bad = hashlib.sha256(bytes([report[0] ^ 0xFF]) + report[1:]).hexdigest()
    assert done.returncode == 1
    assert done.stderr.endswith(f"gwms glidein: report.sh: sha256 mismatch: expected {digest}, got {bad}\n")
    assert "validation ran" not in done.stderr
    assert proxy.fresh == [url] and proxy.requests.count(url) == 2
    assert glide_dirs(workdir) == []


def test_without_a_proxy_a_mismatch_stops_the_glidein_at_once(web: WebServer, credential: Path,
                                                               tmp_path: Path) -> None:
    report = b'exit 0\n'
    descript = publish(web.store, [("validate", "report.sh", report)])
    digest = hashlib.sha256(report).hexdigest()
    served = b"exit 1\n"
    (web.store / "files" / digest / "report.sh").write_bytes(served)
    workdir = tmp_path / "work"
    workdir.mkdir()

    done = run_glidein(glidein_args(web.url, descript, credential), workdir)

    assert done.returncode == 1
    assert done.stderr == (f"gwms glidein: report.sh: sha256 mismatch: expected {digest}, "
                           f"got {hashlib.sha256(served).hexdigest()}\n")
    assert glide_dirs(workdir) == []


# ------------------------------------------------------------------------------------------
# (iii) the happy path, with a real collector


@pytest.fixture
def collector(creds: Any, tmp_path: Path, start_daemon: Any) -> tuple[Any, Path]:
    """A collector of the test pool, and a client configuration that reaches it."""
    first = write_config(tmp_path / "collector.toml", creds, tmp_path, "127.0.0.1:9618", "127.0.0.1:0")
    daemon = start_daemon("collector", first, tmp_path)
    client = write_config(tmp_path / "pool.toml", creds, tmp_path, daemon.address, daemon.address)
    return daemon, client


def slot_ads(gwms_cli: Any, config: Path, name: str) -> list[dict[str, Any]]:
    done = gwms_cli("status", "--json", "--constraint", f'GLIDEIN_Name == "{name}"',
                    env={"GWMS_CONFIG": str(config)})
    return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else []


def publish_entry(store: Path, creds: Any, extra: list[tuple[str, str, Path | bytes]] = ()) -> str:
    attrs = b'GLIDEIN_Site=Test Site "A"\nGLIDEIN_CPUS=1\nGLIDEIN_Min_Disk_MB=1\n# a comment\n'
    return publish(store, [*extra,
                           *(("validate", p.name, p) for p in stock_validation_scripts()),
                           ("attrs", "entry.attrs", attrs),
                           ("ca", "ca.pem", Path(creds.ca))])


def start_glidein(args: list[str], workdir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([DASH, str(startup_script()), "-workdir", str(workdir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True)


def stop_glidein(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> tuple[int, str, str]:
    """A signal to the script alone (as a batch system's remove does); its exit status and output."""
    process.send_signal(signum)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"the glidein did not stop on TERM:\n{out}\n{err}")
    return process.returncode, out, err


def process_group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_glidein_joins_the_pool_and_leaves_cleanly_on_a_signal(web: WebServer, creds: Any, credential: Path,
                                                                collector: tuple[Any, Path], tmp_path: Path,
                                                                gwms_cli: Any, signum: int) -> None:
    daemon, client_config = collector
    descript = publish_entry(web.store, creds)
    workdir = tmp_path / "work"
    workdir.mkdir()
    name = unique("glidein")
    process = start_glidein(glidein_args(web.url, descript, credential, name=name, collectors=daemon.address,
                                         idle="600"), workdir, clean_env())
    try:
        ads = wait_until(lambda: process.poll() is None and slot_ads(gwms_cli, client_config, name)
                         or process.poll() is not None, 60, "the glidein's slot ad in the collector")
        assert process.poll() is None, process.communicate()
        (glide,) = glide_dirs(workdir)
        startd_config = tomllib.loads((glide / "startd.toml").read_text())
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    (ad,) = ads
    assert ad["Name"] == f"slot1@{name}"
    assert ad["GLIDEIN_Name"] == name
    assert ad["GLIDEIN_Entry_Name"] == "ITB_Test"
    assert ad["GLIDEIN_Factory"] == "fact1"
    assert ad["GLIDEIN_Client"] == "frontend1.main"
    assert ad["GLIDEIN_Site"] == 'Test Site "A"'
    assert ad["GLIDEIN_CPUS"] == 1 and ad["Cpus"] == 1 and ad["SlotType"] == "Static"
    assert isinstance(ad["GLIDEIN_Host_CPUS"], int) and ad["GLIDEIN_Host_CPUS"] >= 1
    assert isinstance(ad["GLIDEIN_Host_MemMB"], int)
    assert ad["GLIDEIN_Python_Version"] == ".".join(map(str, sys.version_info[:3]))
    assert ad["GLIDEIN_Max_Idle"] == 600
    assert ad["GLIDEIN_ToDie"] - ad["GLIDEIN_Start_Time"] == 3600
    assert ad["GLIDEIN_ToRetire"] - ad["GLIDEIN_Start_Time"] == 3240  # lifetime less 10%
    assert ad["AuthenticatedIdentity"] == HOST_DN
    assert "GLIDEIN_Credential" not in ad and "GLIDEIN_Trusted" not in ad
    assert startd_config["security"]["DAEMON"]["allow"] == [HOST_DN, ODD_DN]
    assert startd_config["pool"]["proxy"] == str(credential)

    status, out, err = stop_glidein(process, signum)

    assert status == 0, out + err
    assert "gwms glidein: gwms-startd exited with status 0; the last 40 lines of its log:" in out
    assert "Received SIGTERM, shutting down." in out  # the startd's log, passed on before it goes
    assert wait_until(lambda: process_group_gone(process.pid), 10, "every process of the glidein to exit")
    assert glide_dirs(workdir) == []


# ------------------------------------------------------------------------------------------
# (v) the wheelhouse: gwms installed into a private venv on a node that lacks it


def _pip(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def wheelhouse(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Wheels of gwms (this tree) and of its dependencies. The dependencies' wheels are cached
    across runs under pytest's cache dir (keyed by the dependency list); gwms's is built per
    session, from a copy of the tree so the build leaves nothing in it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = sorted(pyproject["project"]["dependencies"])
    key = hashlib.sha256(json.dumps([deps, sys.version_info[:2]]).encode()).hexdigest()[:16]
    cache = Path(request.config.cache.mkdir(f"gwms-glidein-wheels-{key}"))
    if not (cache / "complete").exists():
        done = _pip("wheel", "--quiet", "--wheel-dir", str(cache), *deps)
        if done.returncode != 0:
            pytest.skip(f"cannot get wheels of gwms's dependencies from the package index: "
                        f"{done.stderr.strip().splitlines()[-1:]}")
        (cache / "complete").write_text("\n".join(deps) + "\n")
    source = tmp_path_factory.mktemp("gwms-source")
    for item in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / item, source / item)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "gwms", source / "gwms", ignore=ignore)
    shutil.copytree(ROOT / "twisted", source / "twisted", ignore=ignore)
    out = tmp_path_factory.mktemp("gwms-wheel")
    done = _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source))
    if done.returncode != 0:
        pytest.skip(f"cannot build a wheel of gwms: {done.stderr.strip().splitlines()[-1:]}")
    return sorted(out.glob("*.whl")) + sorted(cache.glob("*.whl"))


def test_a_glidein_installs_gwms_from_its_wheelhouse_on_a_bare_python(web: WebServer, creds: Any,
                                                                      credential: Path, wheelhouse: list[Path],
                                                                      collector: tuple[Any, Path],
                                                                      tmp_path: Path, gwms_cli: Any) -> None:
    bare = shutil.which("python3.11", path="/usr/bin") or shutil.which("python3", path="/usr/bin:/bin")
    if bare is None:
        pytest.skip("no system Python 3 in /usr/bin")
    env = clean_env()
    env.pop("PYTHONPATH", None)  # the tests put this tree on it; the node must not have gwms
    probe = subprocess.run([bare, "-c", "import venv, ensurepip, sys; sys.exit(sys.version_info < (3, 11))"],
                           env=env, check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{bare} is not Python >= 3.11 with venv and ensurepip")
    assert subprocess.run([bare, "-c", "import gwms"], env=env, check=False, capture_output=True, cwd=tmp_path).returncode != 0
    daemon, client_config = collector
    descript = publish_entry(web.store, creds, [("wheel", w.name, w) for w in wheelhouse])
    workdir = tmp_path / "work"
    workdir.mkdir()
    name = unique("wheelglidein")
    args = glidein_args(web.url, descript, credential, name=name, collectors=daemon.address)
    args[args.index("-python") + 1] = bare
    process = start_glidein(args, workdir, env)
    try:
        ads = wait_until(lambda: process.poll() is None and slot_ads(gwms_cli, client_config, name)
                         or process.poll() is not None, 90, "the wheelhouse glidein's slot ad")
        assert process.poll() is None, process.communicate()
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    (ad,) = ads
    # Validation ran with the venv's Python (the system one cannot import gwms).
    expected = subprocess.run([bare, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                              check=False, capture_output=True, text=True).stdout.strip()
    assert ad["GLIDEIN_Python_Version"] == expected
    assert ad["GLIDEIN_Name"] == name

    status, out, err = stop_glidein(process)

    assert status == 0, out + err
    assert "installed gwms from the wheelhouse into" in out
    assert wait_until(lambda: process_group_gone(process.pid), 10, "every process of the glidein to exit")
    assert glide_dirs(workdir) == []


def test_term_during_the_failure_back_off_stops_the_glidein_at_once(web: WebServer, credential: Path,
                                                                   tmp_path: Path) -> None:
    marker = tmp_path / "failed"
    descript = publish(web.store, [("validate", "broken.sh",
                                    f'touch "{marker}"\necho "broken node" >&2\nexit 1\n'.encode())])
    workdir = tmp_path / "work"
    workdir.mkdir()
    process = start_glidein(glidein_args(web.url, descript, credential, failure_backoff="600"), workdir, clean_env())
    try:
        wait_until(lambda: marker.exists() or process.poll() is not None, 30, "the validation script to fail")
        assert process.poll() is None, process.communicate()
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    started = time.monotonic()

    status, out, err = stop_glidein(process)

    assert time.monotonic() - started < 20  # not the 600 s back-off
    assert status == 143, out + err
    assert err.endswith("gwms glidein: TERM received before the startd started: stopping\n")
    assert wait_until(lambda: process_group_gone(process.pid), 10, "the back-off's sleep to go too")
    assert glide_dirs(workdir) == []


# ------------------------------------------------------------------------------------------
# (vi) the frontend's own validation scripts (-client_web, -client_descript)


def frontend_args(web: WebServer, descript: str, frontend: WebServer, client_descript: str, credential: Path,
                  **options: str) -> list[str]:
    return glidein_args(web.url, descript, credential, client_web=frontend.url + "/",
                        client_descript=client_descript, **options)


def test_client_options_go_together_and_are_checked(tmp_path: Path, credential: Path) -> None:
    args = glidein_args("http://127.0.0.1:9", "0" * 64, credential)
    for extra, message in [
        (["-client_web", "http://127.0.0.1:9"],
         "missing option -client_descript (-client_web and -client_descript go together)"),
        (["-client_descript", "1" * 64], "missing option -client_web (-client_web and -client_descript go together)"),
        (["-client_web", "http://127.0.0.1:9", "-client_descript", "A" * 64],
         f"-client_descript must be a SHA-256 in lowercase hex, got '{'A' * 64}'"),
        (["-client_web", "http://127.0.0.1:9", "-client_descript", "1" * 63],
         f"-client_descript must be a SHA-256 in lowercase hex (64 digits), got '{'1' * 63}'"),
        (["-client_web", "-K/etc/passwd", "-client_descript", "1" * 64],
         "-client_web must be an http:// or https:// URL, got '-K/etc/passwd'"),
    ]:
        done = run_glidein([*args, *extra], tmp_path)
        assert (done.returncode, done.stderr.splitlines()[0]) == (2, f"gwms glidein: {message}"), extra
        assert "usage: glidein_startup.sh" in done.stderr
    assert glide_dirs(tmp_path) == []


def test_a_frontend_script_runs_after_the_factorys_and_its_attributes_reach_the_slot_ad(
        web: WebServer, frontend_web: WebServer, creds: Any, credential: Path, collector: tuple[Any, Path],
        tmp_path: Path, gwms_cli: Any) -> None:
    daemon, client_config = collector
    descript = publish_entry(web.store, creds)
    # The frontend's script runs after the stock ones (it sees what 30-python.sh measured), reads
    # its own file, named like the factory's attrs file without replacing it, and cannot forge
    # the record of which frontend files ran.
    vo_check = b'''config=$1
grep -q '^GLIDEIN_Python_Version=' "$config" || { echo "the factory's scripts have not run" >&2; exit 1; }
cat "$(dirname "$config")/client/files/entry.attrs"
echo "GLIDEIN_VO_Check=passed"
echo "GLIDEIN_Client_Web=http://forged.invalid"
'''
    client_descript = publish(frontend_web.store, [("file", "entry.attrs", b"GLIDEIN_VO_Software=cvmfs-ok\n"),
                                                   ("validate", "vo-check.sh", vo_check)])
    workdir = tmp_path / "work"
    workdir.mkdir()
    name = unique("voglidein")
    process = start_glidein(frontend_args(web, descript, frontend_web, client_descript, credential, name=name,
                                          collectors=daemon.address), workdir, clean_env())
    try:
        ads = wait_until(lambda: process.poll() is None and slot_ads(gwms_cli, client_config, name)
                         or process.poll() is not None, 60, "the glidein's slot ad in the collector")
        assert process.poll() is None, process.communicate()
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    (ad,) = ads
    assert ad["GLIDEIN_VO_Check"] == "passed"
    assert ad["GLIDEIN_VO_Software"] == "cvmfs-ok"
    assert ad["GLIDEIN_Site"] == 'Test Site "A"'  # the factory's entry.attrs, not the frontend's
    assert ad["GLIDEIN_Client_Web"] == frontend_web.url
    assert ad["GLIDEIN_Client_Description"] == client_descript

    status, out, err = stop_glidein(process)

    assert status == 0, out + err
    assert out.index("validation 30-python.sh passed") < out.index("frontend validation vo-check.sh passed")
    assert f"fetched and checked 2 frontend file(s) from {frontend_web.url}" in out
    assert "gwms glidein: frontend validation vo-check.sh may not set GLIDEIN_Client_Web: ignored\n" in err
    assert wait_until(lambda: process_group_gone(process.pid), 10, "every process of the glidein to exit")
    assert glide_dirs(workdir) == []


def test_a_tampered_frontend_file_or_description_stops_the_glidein(web: WebServer, frontend_web: WebServer,
                                                                   credential: Path, tmp_path: Path) -> None:
    marker = tmp_path / "factory-validation-ran"
    descript = publish(web.store, [("validate", "mark.sh", f"touch '{marker}'\n".encode())])
    content = f"the real {unique('check')}\n".encode()
    name = unique("check") + ".sh"
    client_descript = publish(frontend_web.store, [("validate", name, content)])
    digest = hashlib.sha256(content).hexdigest()
    tampered = b"echo GLIDEIN_Owned=1\n"
    (frontend_web.store / "files" / digest / name).write_bytes(tampered)
    workdir = tmp_path / "work"
    workdir.mkdir()

    done = run_glidein(frontend_args(web, descript, frontend_web, client_descript, credential), workdir)

    assert done.returncode == 1, done.stderr
    assert done.stderr == (f"gwms glidein: frontend file {name}: sha256 mismatch: expected {digest}, "
                           f"got {hashlib.sha256(tampered).hexdigest()}\n")
    assert "fetched and checked 1 file(s)" in done.stdout  # the factory's first
    assert "started gwms-startd" not in done.stdout
    assert not marker.exists()
    assert glide_dirs(workdir) == []

    # A description that is not the one whose hash came with the submission.
    other = publish(frontend_web.store, [("file", unique("x"), b"x")])
    forged = b"# gwms glidein description 1\n"
    (frontend_web.store / "descriptions" / other).write_bytes(forged)
    done = run_glidein(frontend_args(web, descript, frontend_web, other, credential), workdir)
    assert done.returncode == 1
    assert done.stderr == (f"gwms glidein: frontend description: sha256 mismatch: expected {other}, "
                           f"got {hashlib.sha256(forged).hexdigest()}\n")
    assert glide_dirs(workdir) == []


@pytest.mark.parametrize("kind", ["ca", "wheel", "attrs"])
def test_a_frontend_may_not_send_trust_anchors_python_or_entry_attributes(web: WebServer, frontend_web: WebServer,
                                                                        credential: Path, tmp_path: Path,
                                                                        kind: str) -> None:
    marker = tmp_path / "factory-validation-ran"
    descript = publish(web.store, [("validate", "mark.sh", f"touch '{marker}'\n".encode())])
    # The validate script's file is removed from the store: the refusal comes from reading the
    # description, before any of the frontend's files is fetched.
    script = f"echo {unique('v')}\n".encode()
    client_descript = publish(frontend_web.store, [("validate", "v.sh", script), (kind, "extra.pem", b"x\n")])
    (frontend_web.store / "files" / hashlib.sha256(script).hexdigest() / "v.sh").unlink()
    workdir = tmp_path / "work"
    workdir.mkdir()

    done = run_glidein(frontend_args(web, descript, frontend_web, client_descript, credential), workdir)

    assert done.returncode == 1
    assert done.stderr == (f"gwms glidein: frontend description: line 3: {kind} extra.pem refused: a frontend "
                           "may send only validate scripts and files; the trust anchors (ca), the Python (wheel) "
                           "and the entry's attributes (attrs) are the factory's alone\n")
    assert not marker.exists()
    assert glide_dirs(workdir) == []


def test_a_failing_frontend_validation_script_names_itself_as_the_frontends(web: WebServer, frontend_web: WebServer,
                                                                           credential: Path, tmp_path: Path) -> None:
    descript = publish(web.store, [("validate", "ok.sh", b"echo GLIDEIN_Factory_Check=1\n")])
    client_descript = publish(frontend_web.store, [
        ("validate", "vo-ok.sh", b"exit 0\n"),
        ("validate", "vo-software.sh", b'echo "no VO software in /cvmfs" >&2\nexit 1\n')])

    done = run_glidein(frontend_args(web, descript, frontend_web, client_descript, credential), tmp_path)

    assert (done.returncode, done.stderr) == (
        1, "no VO software in /cvmfs\ngwms glidein: frontend validation vo-software.sh failed: no VO software in /cvmfs\n")
    assert done.stdout.index("validation ok.sh passed") < done.stdout.index("frontend validation vo-ok.sh passed")
    assert glide_dirs(tmp_path) == []
