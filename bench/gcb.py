"""Connection broker (GCB) benchmark: relayed throughput and added latency, and memory per registration.

Starts a real ``twistd -n gwms-gcb`` on 127.0.0.1 with a test CA, and a second process playing
a daemon that can only connect out: it serves a plain bench protocol (sink, source, echo; no
TLS, to measure the relay itself) and a message-layer server with one DAEMON-level command
(mutual TLS, x509), each both on a port of its own (direct) and through the broker
(``gwms.gcb.client.BrokerRegistration``, relayed over its tunnel). From this process:

* bulk transfer of ``--mb`` MB each way, relayed vs direct (MB/s), with the broker's CPU share;
* ``--pings`` sequential 64-byte round trips, relayed vs direct: median and p99, and what the
  relay adds; likewise connection set-up (connect + first round trip);
* the same for message-layer requests (``--calls`` sequential calls over one TLS connection,
  and the TLS + authentication set-up of a new connection);
* then ``--registrations`` daemons register with the broker (each a BrokerRegistration with a
  name of its own: a TLS registration connection, a public port and a tunnel), and the
  broker's resident memory (VmRSS) and file descriptors before and after, per registration.

Prints one JSON object. No target figures were set (issue 6): it reports what it measures.

    python bench/gcb.py [--mb 200] [--pings 2000] [--calls 1000] [--registrations 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

HOST_DN = "/O=gwms/OU=Hosts/CN=localhost"

CONFIG = """
[pool]
name = "bench"
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[security.READ]
allow = ["*"]

[security.DAEMON]
allow = ["{dn}"]

[gcb]
listen = "127.0.0.1:0"
tunnel_listen = "127.0.0.1:0"
address_file = "{work}/gcb.address"
"""

HEADER = struct.Struct("!cQ")  # the bench protocol's first bytes: mode (U sink, D source, E echo), byte count
CHUNK = 256 * 1024
PING = 64
NOFILE = 65536


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    """Enough descriptors for a port, a tunnel and a registration connection per daemon."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"median": round(statistics.median(ordered) * 1000, 4),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 4),
            "mean": round(statistics.fmean(ordered) * 1000, 4)}


# ------------------------------------------------------------------------------------------
# The daemon's side (``--serve``): the bench protocol and a message-layer server
# ------------------------------------------------------------------------------------------


def bench_factory() -> Any:
    from twisted.internet.interfaces import IPullProducer
    from twisted.internet.protocol import Factory, Protocol
    from zope.interface import implementer

    zeros = bytes(CHUNK)

    @implementer(IPullProducer)
    class Bench(Protocol):
        def connectionMade(self) -> None:
            self.head = b""
            self.mode = b""
            self.left = 0

        def dataReceived(self, data: bytes) -> None:
            if not self.mode:
                self.head += data
                if len(self.head) < HEADER.size:
                    return
                self.mode, self.left = HEADER.unpack_from(self.head)
                data, self.head = self.head[HEADER.size:], b""
                if self.mode == b"D":
                    self.transport.registerProducer(self, False)
            if self.mode == b"E":
                if data:
                    self.transport.write(data)
            elif self.mode == b"U":
                self.left -= len(data)
                if self.left <= 0 and data:
                    self.transport.write(b"K")

        # IPullProducer: the source mode, a chunk whenever the transport wants more
        def resumeProducing(self) -> None:
            if self.left <= 0:
                return
            n = min(self.left, CHUNK)
            self.left -= n
            self.transport.write(zeros if n == CHUNK else zeros[:n])
            if self.left <= 0:
                self.transport.unregisterProducer()

        def stopProducing(self) -> None:
            self.left = 0

    return Factory.forProtocol(Bench)


def serve(config_path: Path, broker: str, out: Path) -> None:
    """The daemon: direct ports, and the same factories registered with the broker."""
    from twisted.internet import defer, task
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from gwms import classads
    from gwms.config import load_config
    from gwms.daemon import message_factory
    from gwms.gcb.client import BrokerRegistration
    from gwms.protocols.client import Address, ClientSecurity
    from gwms.protocols.messages import Command

    config = load_config(config_path)

    def ping(request: Any) -> Any:
        reply = classads.ClassAd()
        reply["Pong"] = True
        return reply

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        factories = {"raw": bench_factory(),
                     "msg": message_factory(reactor, config, [Command("BENCH_PING", "DAEMON", ping)])}
        security = ClientSecurity.from_config(config)
        addresses: dict[str, str] = {}
        waiting: list[Any] = []
        for kind, factory in factories.items():
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
            addresses[f"{kind}_direct"] = f"127.0.0.1:{port.getHost().port}"
            registered: defer.Deferred[str] = defer.Deferred()
            waiting.append(registered)

            def on_address(public: str, kind: str = kind, d: Any = registered) -> None:
                addresses[f"{kind}_relayed"] = public
                if not d.called:
                    d.callback(public)

            BrokerRegistration(reactor, Address.parse(broker), f"bench-{kind}", factory, security,
                               on_address).startService()
        yield defer.gatherResults(waiting)
        yield task.deferLater(reactor, 0.2, lambda: None)  # the broker has taken the tunnels' greetings
        out.write_text(json.dumps(addresses))
        yield defer.Deferred()  # until SIGTERM

    task.react(run, [])


# ------------------------------------------------------------------------------------------
# The client's side: blocking sockets for the plain relay, the reactor for the rest
# ------------------------------------------------------------------------------------------


def connect_raw(address: str, mode: bytes, n: int) -> socket.socket:
    s = socket.create_connection(split(address))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(HEADER.pack(mode, n))
    return s


def upload(address: str, n: int) -> float:
    s = connect_raw(address, b"U", n)
    block = memoryview(bytes(1 << 20))
    t = time.perf_counter()
    left = n
    while left:
        k = min(left, len(block))
        s.sendall(block[:k])
        left -= k
    if s.recv(1) != b"K":
        raise RuntimeError(f"upload to {address}: no acknowledgement")
    elapsed = time.perf_counter() - t
    s.close()
    return elapsed


def download(address: str, n: int) -> float:
    s = connect_raw(address, b"D", n)
    buf = bytearray(1 << 20)
    t = time.perf_counter()
    got = 0
    while got < n:
        k = s.recv_into(buf)
        if not k:
            raise RuntimeError(f"download from {address}: closed after {got} of {n} bytes")
        got += k
    elapsed = time.perf_counter() - t
    s.close()
    return elapsed


def echo(s: socket.socket, payload: bytes) -> None:
    s.sendall(payload)
    got = 0
    while got < len(payload):
        k = len(s.recv(len(payload) - got))
        if not k:
            raise RuntimeError("echo: connection closed")
        got += k


def pings(address: str, n: int, warmup: int = 100) -> list[float]:
    s = connect_raw(address, b"E", 0)
    payload = bytes(range(PING))
    times = []
    for i in range(n + warmup):
        t = time.perf_counter()
        echo(s, payload)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    s.close()
    return times


def connects(address: str, n: int) -> list[float]:
    payload = bytes(PING)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s = connect_raw(address, b"E", 0)
        echo(s, payload)
        times.append(time.perf_counter() - t)
        s.close()
    return times


def plain_relay(addresses: dict[str, str], broker_pid: int, daemon_pid: int, args: argparse.Namespace) -> dict:
    n = args.mb * 1_000_000
    out: dict[str, Any] = {"bytes_each_way": n}
    for way, run in (("upload", upload), ("download", download)):
        for path in ("direct", "relayed"):
            address = addresses[f"raw_{path}"]
            cpu_b, cpu_d = cpu_seconds(broker_pid), cpu_seconds(daemon_pid)
            elapsed = run(address, n)
            out[f"{way}_{path}_mb_s"] = round(n / elapsed / 1e6, 1)
            if path == "relayed":  # near 1.0: that process (one core) was the bottleneck
                out[f"{way}_broker_cpu_share"] = round((cpu_seconds(broker_pid) - cpu_b) / elapsed, 2)
                out[f"{way}_daemon_cpu_share"] = round((cpu_seconds(daemon_pid) - cpu_d) / elapsed, 2)
        out[f"{way}_relayed_vs_direct"] = round(out[f"{way}_relayed_mb_s"] / out[f"{way}_direct_mb_s"], 3)
    rtt = {path: pings(addresses[f"raw_{path}"], args.pings) for path in ("direct", "relayed")}
    out["pings"] = args.pings
    out["ping_bytes"] = PING
    out["rtt_direct_ms"] = summary_ms(rtt["direct"])
    out["rtt_relayed_ms"] = summary_ms(rtt["relayed"])
    out["rtt_added_ms"] = {k: round(out["rtt_relayed_ms"][k] - out["rtt_direct_ms"][k], 4) for k in ("median", "p99")}
    setup = {path: connects(addresses[f"raw_{path}"], 200) for path in ("direct", "relayed")}
    out["connect_and_first_rtt_direct_ms"] = summary_ms(setup["direct"])
    out["connect_and_first_rtt_relayed_ms"] = summary_ms(setup["relayed"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="MB (10^6 bytes) of bulk transfer each way")
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=1000, help="message-layer requests (TLS) each way")
    parser.add_argument("--registrations", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50, help="registrations in progress at once")
    parser.add_argument("--serve", nargs=3, metavar=("CONFIG", "BROKER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_nofile()  # before the daemons start: they inherit it
    if args.serve:
        serve(Path(args.serve[0]), args.serve[1], Path(args.serve[2]))
        return

    from gwms.cli.demo import twistd_command, wait_for_file
    from gwms.credentials.ca import init_ca, issue_host

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gwms-bench-gcb-"))
    init_ca(work / "creds")
    cert, key = issue_host(work / "creds", "localhost")
    config = work / "bench.toml"
    config.write_text(CONFIG.format(ca=work / "creds" / "ca.pem", cert=cert, key=key, dn=HOST_DN, work=work))
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    try:
        log = work / "gcb.log"
        broker = subprocess.Popen([*twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(log),
                                   "gwms-gcb", "--config", str(config)], stdin=subprocess.DEVNULL,
                                  start_new_session=True)  # inherits the raised RLIMIT_NOFILE
        procs.append(broker)
        broker_address = wait_for_file(work / "gcb.address", broker, 30, log)
        result["broker_rss_kb_at_start"] = rss_kb(broker.pid)
        daemon_log = work / "daemon.log"
        with daemon_log.open("wb") as daemon_out:
            daemon = subprocess.Popen([sys.executable, __file__, "--serve", str(config), broker_address,
                                       str(work / "daemon.json")], stdin=subprocess.DEVNULL,
                                      stdout=daemon_out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(daemon)
        addresses = json.loads(wait_for_file(work / "daemon.json", daemon, 30, daemon_log))
        result["plain"] = plain_relay(addresses, broker.pid, daemon.pid, args)
        run_reactor_phases(addresses, broker_address, broker.pid, config, args, result)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        result["bench_s"] = round(time.perf_counter() - started, 1)
        result["targets"] = ("none set by issue 6: it asks for relayed throughput and added round-trip latency "
                             "against a direct connection, and memory per registered daemon with 1,000 "
                             "registrations")
        from gwms.protocols import relay

        result["context"] = ("all on 127.0.0.1: client, broker (one twistd process) and daemon (one process) "
                             "share the machine's cores; relayed = client -> broker's public port -> tunnel "
                             f"({relay.MAX_DATA // 1024} KiB DATA frames, {relay.INITIAL_WINDOW // 1024} KiB window per stream) -> daemon")
        print(json.dumps(result, indent=2))


def run_reactor_phases(addresses: dict[str, str], broker_address: str, broker_pid: int, config: Path,
                       args: argparse.Namespace, result: dict[str, Any]) -> None:
    from twisted.internet import defer, reactor, task
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    from gwms import classads
    from gwms.config import load_config
    from gwms.gcb.client import BrokerRegistration
    from gwms.protocols.client import Address, ClientSecurity, connect

    security = ClientSecurity.from_config(load_config(config))
    empty = classads.ClassAd()

    class Echo(Protocol):
        def __init__(self) -> None:
            self.got: defer.Deferred[None] = defer.Deferred()

        def dataReceived(self, data: bytes) -> None:
            if not self.got.called:
                self.got.callback(None)

    @defer.inlineCallbacks
    def message_layer() -> Any:
        out: dict[str, Any] = {"calls": args.calls, "level": "DAEMON (mutual TLS, x509)"}
        for path in ("direct", "relayed"):
            address = Address.parse(addresses[f"msg_{path}"])
            setups = []
            for _ in range(20):
                t = time.perf_counter()
                conn = yield connect(reactor, address, "DAEMON", security, connect_timeout=10)
                yield conn.call("BENCH_PING", empty)
                setups.append(time.perf_counter() - t)
                conn.close()
            conn = yield connect(reactor, address, "DAEMON", security, connect_timeout=10)
            times = []
            for i in range(args.calls + 50):
                t = time.perf_counter()
                yield conn.call("BENCH_PING", empty)
                if i >= 50:
                    times.append(time.perf_counter() - t)
            conn.close()
            out[f"call_{path}_ms"] = summary_ms(times)
            out[f"connect_tls_auth_and_first_call_{path}_ms"] = summary_ms(setups)
        out["call_added_ms"] = {k: round(out["call_relayed_ms"][k] - out["call_direct_ms"][k], 4)
                                for k in ("median", "p99")}
        return out

    @defer.inlineCallbacks
    def registrations() -> Any:
        n = args.registrations
        out: dict[str, Any] = {"registrations": n, "level": "DAEMON (mutual TLS, x509)",
                               "concurrency": args.concurrency}
        yield task.deferLater(reactor, 0.5, lambda: None)
        before_rss, before_fds = rss_kb(broker_pid), fds(broker_pid)
        client_before = rss_kb(os.getpid())
        factory = bench_factory()
        regs: list[BrokerRegistration] = []
        publics: dict[str, str] = {}
        done: defer.Deferred[None] = defer.Deferred()
        pending = iter(range(n))

        def start_next() -> None:
            i = next(pending, None)
            if i is None:
                return
            reg = BrokerRegistration(reactor, Address.parse(broker_address), f"bench-{i:05d}", factory, security,
                                     lambda public, i=i: registered(i, public), retry=0.5)
            reg.client.connect_timeout = 30.0  # the broker is busy with handshakes: no spurious timeouts
            regs.append(reg)
            reg.startService()

        def registered(i: int, public: str) -> None:
            first = str(i) not in publics
            publics[str(i)] = public
            if first:
                if len(publics) == n and not done.called:
                    done.callback(None)
                start_next()

        t = time.perf_counter()
        for _ in range(min(args.concurrency, n)):
            start_next()
        yield done
        out["register_all_s"] = round(time.perf_counter() - t, 2)
        out["registrations_per_s"] = round(n / (time.perf_counter() - t), 1)
        yield task.deferLater(reactor, 1.0, lambda: None)  # the last tunnels' greetings
        after_rss, after_fds = rss_kb(broker_pid), fds(broker_pid)
        out["broker_rss_kb_before"] = before_rss
        out["broker_rss_kb_after"] = after_rss
        out["broker_kb_per_registration"] = round((after_rss - before_rss) / n, 1)
        out["broker_fds_before"] = before_fds
        out["broker_fds_after"] = after_fds
        out["broker_fds_per_registration"] = round((after_fds - before_fds) / n, 2)
        out["client_kb_per_registration"] = round((rss_kb(os.getpid()) - client_before) / n, 1)
        # Every tunnel works: an echo through a sample of the public ports.
        sample = random.Random(6).sample(sorted(publics.values()), min(20, n))
        rtts = []
        for public in sample:
            host, port = split(public)
            proto = Echo()
            t0 = time.perf_counter()
            yield connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=10), proto)
            proto.transport.write(HEADER.pack(b"E", 0) + b"x")
            yield proto.got
            rtts.append(time.perf_counter() - t0)
            proto.transport.loseConnection()
        out["sampled_tunnels_echo_ok"] = len(rtts)
        # The registration connections (one TLS message-layer connection per daemon, which
        # BrokerRegistration keeps open) closed: the ports and tunnels stay.
        for reg in regs:
            reg.client.close()
        yield task.deferLater(reactor, 1.5, lambda: None)
        closed_rss = rss_kb(broker_pid)
        out["broker_rss_kb_registration_connections_closed"] = closed_rss  # freed memory stays in Python's arenas:
        out["broker_fds_registration_connections_closed"] = fds(broker_pid)  # RSS hardly drops; the fds do
        for reg in regs:
            reg.stopService()
        return out

    @defer.inlineCallbacks
    def run(_reactor: Any) -> Any:
        result["message_layer"] = yield message_layer()
        if args.registrations:
            result["registrations"] = yield registrations()

    try:
        task.react(run, [])
    except SystemExit as e:
        if e.code not in (0, None):
            raise


if __name__ == "__main__":
    main()
