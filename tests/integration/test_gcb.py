"""Connection brokering on loopback: a startd that listens on no port at all registers with a
real `twistd -n gwms-gcb`, its slots advertise the broker's address, and the schedd's claims,
activations and the shadow-starter traffic all reach it through the relay (TLS end to end)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from gwms.cli.demo import free_port
from gwms.testing.polling import wait_until

from pool import write_config

pytestmark = pytest.mark.integration

JOBS = """
executable = /bin/echo
arguments = relayed $(Process)
transfer_executable = false
output = out.$(Process)
request_memory = 10
request_disk = 1000
queue 3
"""


def listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (from /proc/net/tcp and its file descriptors)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        found = re.fullmatch(r"socket:\[(\d+)\]", target)
        if found:
            inodes.add(found.group(1))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def central_config(creds, tmp_path: Path, start_daemon, slots: int, **options) -> Path:
    """A collector started, and the pool configuration every other daemon here starts from."""
    (tmp_path / "grid-mapfile").write_text("")
    first = write_config(tmp_path / "collector.toml", creds, tmp_path, "127.0.0.1:9618", "127.0.0.1:0", slots=slots,
                         cpus=slots)
    collector = start_daemon("collector", first, tmp_path)
    return write_config(tmp_path / "pool.toml", creds, tmp_path, collector.address, collector.address, slots=slots,
                        cpus=slots, **options)


def broker_config(config: Path, name: str = "gcb", listen: str = "127.0.0.1:0", tunnel: str = "127.0.0.1:0",
                  extra: str = "") -> Path:
    """The pool's configuration plus a [gcb] section, for a broker named ``name``."""
    path = config.parent / f"{name}.toml"
    path.write_text(config.read_text() + f'\n[gcb]\nlisten = "{listen}"\ntunnel_listen = "{tunnel}"\n{extra}'
                                         f'address_file = "{config.parent}/{name}.address"\n')
    return path


@pytest.mark.parametrize("connect_back", [True, False], ids=["connect-back", "relay"])
def test_a_startd_without_a_port_joins_through_the_broker_and_runs_jobs(creds, tmp_path, start_daemon, gwms_cli,
                                                                        connect_back):
    config = central_config(creds, tmp_path, start_daemon, slots=2)
    text = config.read_text()
    # Published as 127.0.0.2, a name the startd's certificate does not have: the schedd must
    # check the identity the collector authenticated for the slot instead of the host name.
    broker = start_daemon("gcb", broker_config(config, listen="0.0.0.0:0", extra='public_host = "127.0.0.2"\n'),
                          tmp_path)
    schedd_config = tmp_path / "schedd.toml"  # the schedd may ask the startd to connect back, or not
    schedd_config.write_text(text.replace("[pool]\n", f"[pool]\nconnect_back = {str(connect_back).lower()}\n", 1))
    start_daemon("negotiator", config, tmp_path)
    start_daemon("schedd", schedd_config, tmp_path)
    worker_config = tmp_path / "worker.toml"
    registration = f"127.0.0.1:{broker.port}"  # it listens on every address; its certificate names this one
    worker_config.write_text(text.replace("[pool]\n", f'[pool]\nbrokers = ["{registration}"]\nbroker_only = true\n', 1))
    startd = start_daemon("startd", worker_config, tmp_path, address_name="startd-wn1")
    assert listening_ports(startd.process.pid) == set()  # it listens on nothing at all
    assert startd.address.startswith("127.0.0.2:")

    env = {**os.environ, "GWMS_CONFIG": str(config)}
    slots = wait_until(lambda: (s := json.loads(gwms_cli("status", "--json", env=env).stdout or "[]")) and
                       len(s) == 2 and s, 30, "the brokered startd's slots")
    assert {s["MyAddress"] for s in slots} == {startd.address}  # the broker's port for it
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "jobs.sub").write_text(JOBS)
    assert gwms_cli("submit", str(jobdir / "jobs.sub"), env=env).returncode == 0
    done = wait_until(lambda: len(h := json.loads(gwms_cli("history", "--json", env=env).stdout or "[]")) == 3 and h,
                      60, "the jobs to complete through the broker")
    assert sorted((j["ProcId"], j["ExitCode"]) for j in done) == [(0, 0), (1, 0), (2, 0)]
    assert [(jobdir / f"out.{i}").read_text() for i in range(3)] == [f"relayed {i}\n" for i in range(3)]
    log = broker.log_text()
    assert "registered" in log
    if connect_back:  # the startd dialled the schedd: nothing went through the relay
        assert "asked startd@wn1 to connect back to" in log and "relaying a connection" not in log
    else:
        assert "relaying a connection" in log and "connect back" not in log


def test_after_a_broker_restart_the_startd_registers_again_at_the_same_address_and_jobs_go_on(
        creds, tmp_path, start_daemon, gwms_cli):
    config = central_config(creds, tmp_path, start_daemon, slots=1, periodic_interval=1)
    text = config.read_text()
    # fixed ports: the broker comes back where it was
    gcb = broker_config(config, listen=f"127.0.0.1:{free_port()}", tunnel=f"127.0.0.1:{free_port()}")
    broker = start_daemon("gcb", gcb, tmp_path)
    for role in ("negotiator", "schedd"):
        start_daemon(role, config, tmp_path)
    worker_config = tmp_path / "worker.toml"
    worker_config.write_text(text.replace("[pool]\n", f'[pool]\nbrokers = ["{broker.address}"]\nbroker_only = true\n', 1))
    startd = start_daemon("startd", worker_config, tmp_path, address_name="startd-wn1")
    public = startd.address
    env = {**os.environ, "GWMS_CONFIG": str(config)}
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "long.sub").write_text("executable = /bin/sleep\narguments = 8\ntransfer_executable = false\n"
                                     "request_memory = 10\nrequest_disk = 1000\nlog = long.log\nqueue\n")
    assert gwms_cli("submit", str(jobdir / "long.sub"), env=env).returncode == 0
    wait_until(lambda: (q := json.loads(gwms_cli("q", "--json", env=env).stdout or "[]")) and
               q[0]["JobStatus"] == 2, 30, "the job to run through the broker")
    broker.stop()  # the broker goes away while the job runs ...
    restarted = start_daemon("gcb", gcb, tmp_path)  # ... and comes back
    wait_until(lambda: restarted.log_text().count(f"registered: {public}") == 2, 30,
               "the startd to register again, at its old public address")  # (the log goes on from the first run)
    done = wait_until(lambda: (h := json.loads(gwms_cli("history", "--json", env=env).stdout or "[]")) and h, 60,
                      "the job to complete")
    assert (done[0]["JobStatus"], done[0]["ExitCode"], done[0]["NumJobStarts"]) == (4, 0, 1)  # not run twice


def test_with_two_brokers_the_second_takes_over_when_the_first_goes_away(creds, tmp_path, start_daemon, gwms_cli):
    config = central_config(creds, tmp_path, start_daemon, slots=1)
    text = config.read_text()
    brokers = [start_daemon("gcb", broker_config(config, name), tmp_path, address_name=name) for name in ("gcb1", "gcb2")]
    for role in ("negotiator", "schedd"):
        start_daemon(role, config, tmp_path)
    worker_config = tmp_path / "worker.toml"
    addresses = ", ".join(f'"{b.address}"' for b in brokers)
    worker_config.write_text(text.replace("[pool]\n", f"[pool]\nbrokers = [{addresses}]\nbroker_only = true\n", 1))
    startd = start_daemon("startd", worker_config, tmp_path, address_name="startd-wn1")
    env = {**os.environ, "GWMS_CONFIG": str(config)}

    def slot_address() -> str | None:
        slots = json.loads(gwms_cli("status", "--json", env=env).stdout or "[]")
        return slots[0]["MyAddress"] if slots else None

    at_first = wait_until(slot_address, 30, "the slot, at the first broker")
    assert at_first == startd.address and f"registered: {at_first}" in brokers[0].log_text()
    brokers[0].stop()
    at_second = wait_until(lambda: (a := slot_address()) != at_first and a, 30, "the slot at the second broker")
    assert f"registered: {at_second}" in brokers[1].log_text()
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    (jobdir / "jobs.sub").write_text(JOBS)
    assert gwms_cli("submit", str(jobdir / "jobs.sub"), env=env).returncode == 0
    done = wait_until(lambda: len(h := json.loads(gwms_cli("history", "--json", env=env).stdout or "[]")) == 3 and h,
                      60, "the jobs to complete through the second broker")
    assert sorted(j["ExitCode"] for j in done) == [0, 0, 0]


def test_a_schedd_and_a_negotiator_without_ports_work_through_the_broker(creds, tmp_path, start_daemon, gwms_cli):
    """Not only startds: a schedd and a negotiator that listen on no TCP port (local users
    submit over the schedd's UNIX socket) are reached through the broker, and jobs run."""
    config = central_config(creds, tmp_path, start_daemon, slots=1)
    text = config.read_text()
    broker = start_daemon("gcb", broker_config(config), tmp_path)
    hidden = tmp_path / "hidden.toml"
    hidden.write_text(text.replace("[pool]\n", f'[pool]\nbrokers = ["{broker.address}"]\nbroker_only = true\n', 1))
    negotiator_log = tmp_path / "negotiator.log"
    start_daemon("startd", config, tmp_path, address_name="startd-wn1")
    from gwms.cli.demo import start_daemon as spawn  # these two write no address file: they have no port

    daemons = [spawn("negotiator", hidden, negotiator_log), spawn("schedd", hidden, tmp_path / "schedd.log")]
    try:
        wait_until(lambda: broker.log_text().count("registered:") == 2, 30, "schedd and negotiator to register")
        env = {**os.environ, "GWMS_CONFIG": str(config)}
        jobdir = tmp_path / "jobs"
        jobdir.mkdir()
        (jobdir / "jobs.sub").write_text(JOBS)
        assert gwms_cli("submit", str(jobdir / "jobs.sub"), env=env).returncode == 0  # over the UNIX socket
        done = wait_until(lambda: len(h := json.loads(gwms_cli("history", "--json", env=env).stdout or "[]")) == 3
                          and h, 60, "the jobs of a brokered schedd to complete")
        assert sorted(j["ExitCode"] for j in done) == [0, 0, 0]
        for process in daemons:
            assert listening_ports(process.pid) == set()
        assert "relaying a connection" in broker.log_text()  # the negotiator reached the schedd this way
    finally:
        for process in daemons:
            process.terminate()
            process.wait(timeout=30)
