"""Connection brokering through a real firewall: the worker runs in its own network namespace,
joined to the central host by a veth pair, and its iptables rejects every new inbound TCP
connection (outbound connections, and their replies, go through). A startd there that listens
on a port advertises fine but can never be claimed; one registered with a GCB broker on the
central host is reached through the tunnel it opened and runs the jobs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from pool import write_config

from gwms.cli.demo import twistd_command
from gwms.credentials import ca as ca_tools
from gwms.testing.polling import wait_until

pytestmark = pytest.mark.integration

JOBS = """
executable = /bin/echo
arguments = through the firewall $(Process)
transfer_executable = false
output = out.$(Process)
request_memory = 10
request_disk = 1000
queue 2
"""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL,
                          timeout=60)


def _iptables_usable() -> bool:
    if shutil.which("iptables") is None:
        _run("apt-get", "install", "-y", "nftables", "iptables", check=False)
    return shutil.which("iptables") is not None


class Netns:
    """A worker network namespace joined to this one by a veth pair, firewalled: lo and
    established/related traffic in, every new inbound TCP connection rejected (a reset)."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.name = f"gwms-w1-{pid}"
        self.host_if, self.worker_if = f"gvh{pid % 100000}", f"gvw{pid % 100000}"
        used = _run("ip", "-o", "-4", "addr", "show").stdout
        subnet = next((n for n in [pid % 200 + 20, *range(20, 250)] if f"10.200.{n}." not in used), None)
        if subnet is None:
            raise RuntimeError("no free 10.200.X.0/24 subnet")
        self.host_ip, self.worker_ip = f"10.200.{subnet}.1", f"10.200.{subnet}.2"

    def create(self) -> None:
        ns, h, w = self.name, self.host_if, self.worker_if
        for command in (["ip", "netns", "add", ns],
                        ["ip", "link", "add", h, "type", "veth", "peer", "name", w],
                        ["ip", "link", "set", w, "netns", ns],
                        ["ip", "addr", "add", f"{self.host_ip}/24", "dev", h],
                        ["ip", "link", "set", h, "up"],
                        ["ip", "-n", ns, "addr", "add", f"{self.worker_ip}/24", "dev", w],
                        ["ip", "-n", ns, "link", "set", w, "up"],
                        ["ip", "-n", ns, "link", "set", "lo", "up"]):
            _run(*command)

    def firewall(self) -> None:
        for rule in (["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
                     ["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                     ["-A", "INPUT", "-p", "tcp", "--syn", "-j", "REJECT", "--reject-with", "tcp-reset"]):
            _run("ip", "netns", "exec", self.name, "iptables", *rule)

    def rejected(self) -> int:
        """Packets the REJECT rule has rejected so far."""
        listing = _run("ip", "netns", "exec", self.name, "iptables", "-L", "INPUT", "-v", "-n", "-x").stdout
        return sum(int(line.split()[0]) for line in listing.splitlines() if "REJECT" in line)

    def exec(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def delete(self) -> None:
        _run("ip", "netns", "del", self.name, check=False)  # takes the veth pair with it
        _run("ip", "link", "del", self.host_if, check=False)  # (in case it never moved)


@pytest.fixture
def worker_netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces and iptables need root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2)")
    ns = Netns()
    try:
        try:
            ns.create()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot make a network namespace with a veth pair: {e.stderr.strip()}")
        if not _iptables_usable():
            pytest.skip("no iptables, even after apt-get install iptables")
        try:
            ns.firewall()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"iptables cannot be used in a network namespace: {e.stderr.strip()}")
        yield ns
    finally:
        ns.delete()


class NetnsDaemon:
    """A ``twistd -n gwms-<role>`` run inside a network namespace, like conftest's Daemon (``ip
    netns exec`` execs the command, so the process, and its process group, is the daemon's own)."""

    def __init__(self, ns: Netns, role: str, config: Path, workdir: Path, address_name: str) -> None:
        self.role = role
        self.log = workdir / f"{address_name}.log"
        address_file = workdir / f"{address_name}.address"
        address_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            ns.exec(*twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(self.log),
                    f"gwms-{role}", "--config", str(config)),
            cwd=workdir, stdin=subprocess.DEVNULL, start_new_session=True)

        def listening() -> str:
            if self.process.poll() is not None:
                raise AssertionError(f"{role} exited with {self.process.returncode}:\n{self.log_text()}")
            return address_file.read_text().strip() if address_file.exists() else ""

        try:
            self.address = wait_until(listening, 30, f"{role} to listen ({self.log})")
        except BaseException:
            self.stop()
            raise
        self.host, _, port = self.address.rpartition(":")
        self.port = int(port)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on, in its own network namespace."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def connects(host: str, port: int, ns: Netns | None = None) -> str:
    """Try a TCP connection (inside ``ns`` when given): "ok", or the error's name."""
    code = ("import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()\n"
            "    print('ok')\nexcept OSError as e:\n    print(type(e).__name__)\n")
    command = [sys.executable, "-c", code, host, str(port)]
    return _run(*(ns.exec(*command) if ns else command)).stdout.strip()


def test_a_firewalled_worker_is_unreachable_directly_but_runs_jobs_through_the_broker(
        worker_netns, creds, tmp_path, start_daemon, gwms_cli):
    ns = worker_netns
    central, worker = ns.host_ip, ns.worker_ip
    # The host certificate names the veth addresses too (the test CA's, in a copy of its directory).
    pki = tmp_path / "pki"
    shutil.copytree(creds.dir, pki)
    cert, key = ca_tools.issue_host(pki, "localhost", extra_names=[central, worker])
    host_creds = types.SimpleNamespace(ca=creds.ca, host_cert=cert, host_key=key)

    def config_for(path: Path, collector: str, collector_listen: str, startd_name: str) -> str:
        text = write_config(path, host_creds, tmp_path, collector, collector_listen, slots=2, cpus=2,
                            negotiator_interval=1, startd_name=startd_name).read_text()
        head, _, startd = text.partition("[startd]\n")  # the central daemons listen on the veth
        return head.replace('"127.0.0.1:0"', f'"{central}:0"') + "[startd]\n" + startd.replace(
            '"127.0.0.1:0"', f'"{worker}:0"')  # and the startd in the worker's namespace

    (tmp_path / "grid-mapfile").write_text("")
    first = tmp_path / "collector.toml"
    first.write_text(config_for(first, f"{central}:9618", f"{central}:0", "direct"))
    collector = start_daemon("collector", first, tmp_path)
    assert collector.host == central
    config = tmp_path / "pool.toml"
    text = config_for(config, collector.address, collector.address, "direct")
    config.write_text(text)
    broker_config = tmp_path / "gcb.toml"
    broker_config.write_text(text + f'\n[gcb]\nlisten = "{central}:0"\ntunnel_listen = "{central}:0"\n'
                                    f'address_file = "{tmp_path}/gcb.address"\n')
    broker = start_daemon("gcb", broker_config, tmp_path)
    for role in ("negotiator", "schedd"):
        start_daemon(role, config, tmp_path)
    env = {**os.environ, "GWMS_CONFIG": str(config)}

    def slots() -> list[dict]:
        return json.loads(gwms_cli("status", "--json", env=env).stdout or "[]")

    started: list[NetnsDaemon] = []
    try:
        # 1. Without a broker: the startd in the worker listens on its veth address and its
        # advertisements get out, but nothing from the central host gets in.
        started.append(direct := NetnsDaemon(ns, "startd", config, tmp_path, "startd-direct"))
        assert direct.host == worker
        ads = wait_until(lambda: len(s := slots()) == 2 and s, 20, "the firewalled startd's slots")
        assert {s["MyAddress"] for s in ads} == {direct.address}
        assert connects(central, collector.port, ns) == "ok"  # outbound from the worker: through
        assert connects(worker, direct.port, ns) == "ok"  # inside the worker: the startd listens
        before = ns.rejected()
        assert connects(worker, direct.port) == "ConnectionRefusedError"  # inbound: rejected ...
        assert ns.rejected() > before  # ... by the firewall
        jobdir = tmp_path / "jobs"
        jobdir.mkdir()
        (jobdir / "jobs.sub").write_text(JOBS)
        assert gwms_cli("submit", str(jobdir / "jobs.sub"), env=env).returncode == 0
        schedd_log = tmp_path / "schedd.log"
        refused = f"failed: cannot connect to {direct.address}: Connection was refused"
        wait_until(lambda: refused in schedd_log.read_text(), 20, "the schedd to fail to claim the firewalled slot")
        queue = json.loads(gwms_cli("q", "--json", env=env).stdout or "[]")
        assert [j["JobStatus"] for j in queue] == [1, 1]  # idle: never claimed
        direct.stop()  # (its slots are invalidated)
        wait_until(lambda: not slots(), 20, "the firewalled startd's slots to go")

        # 2. Through the broker: the startd in the worker listens on nothing and only connects out.
        brokered_config = tmp_path / "worker.toml"
        brokered_config.write_text(config_for(brokered_config, collector.address, collector.address, "gcb").replace(
            "[pool]\n", f'[pool]\nbrokers = ["{broker.address}"]\nbroker_only = true\n', 1))
        started.append(brokered := NetnsDaemon(ns, "startd", brokered_config, tmp_path, "startd-gcb"))
        assert listening_ports(brokered.process.pid) == set()
        assert brokered.host == central and brokered.address != broker.address  # its port on the broker
        ads = wait_until(lambda: len(s := slots()) == 2 and s, 20, "the brokered startd's slots")
        assert {s["MyAddress"] for s in ads} == {brokered.address}
        done = wait_until(lambda: len(h := json.loads(gwms_cli("history", "--json", env=env).stdout or "[]")) == 2
                          and h, 30, "the jobs to complete through the broker")
        assert sorted((j["ProcId"], j["ExitCode"]) for j in done) == [(0, 0), (1, 0)]
        assert sorted(j["RemoteHost"] for j in done) == ["slot1@gcb", "slot2@gcb"]
        assert [(jobdir / f"out.{i}").read_text() for i in range(2)] == [f"through the firewall {i}\n"
                                                                         for i in range(2)]
        assert f"registered: {brokered.address}" in broker.log_text()
    finally:
        for daemon in started:  # nothing may outlive the namespace
            daemon.stop()
