"""``gwms demo``: a one-host pool with generated credentials, started and shown.

For now the pool is its collector: the demo makes a CA, a host certificate, a user certificate
and a token key, writes a host configuration, starts ``twistd -n gwms-collector`` on
127.0.0.1, advertises an ad as an authenticated daemon, shows ``gwms status``, and stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gwms.cli import UsageError

ONEHOST = """\
# A one-host pool, written by `gwms demo` (conf/onehost.toml is the annotated original).
[pool]
name = "onehost"
collectors = ["{address}"]
ca = "creds/ca.pem"
cert = "creds/host-localhost.pem"
key = "creds/host-localhost.key"
token_signing_key = "creds/pool-signing.key"
audit_log = "log/audit.jsonl"

[security]
methods = ["x509", "token", "fs"]

[security.READ]
allow = ["*"]

[security.WRITE]
allow_regex = ["/O=gwms/OU=Users/CN=.*"]

[security.ADMINISTRATOR]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[security.DAEMON]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[security.NEGOTIATOR]
allow = ["/O=gwms/OU=Hosts/CN=localhost"]

[collector]
listen = "{address}"
address_file = "run/collector.address"
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="start a one-host pool with generated credentials and show it",
                              description=__doc__)
    p.add_argument("--dir", type=Path, help="where to keep credentials, configuration and logs "
                                            "(default: a new temporary directory)")
    p.add_argument("--port", type=int, default=0, help="collector port (default: any free port)")
    p.add_argument("--keep", action="store_true", help="keep the pool running until Ctrl-C")
    p.set_defaults(func=run)


def prepare(directory: Path, port: int = 0) -> Path:
    """Credentials and configuration of a one-host pool in ``directory``; returns the config."""
    from gwms.credentials.ca import init_ca, issue_host, issue_user
    from gwms.credentials.tokens import generate_signing_key

    creds = directory / "creds"
    if not (creds / "ca.pem").exists():
        init_ca(creds, name="gwms demo CA")
        issue_host(creds, "localhost")
        issue_user(creds, os.environ.get("USER", "demo") or "demo")
        generate_signing_key(creds / "pool-signing.key")
    (directory / "log").mkdir(exist_ok=True)
    (directory / "run").mkdir(exist_ok=True)
    config = directory / "onehost.toml"
    config.write_text(ONEHOST.format(address=f"127.0.0.1:{port}"))
    return config


def twistd_command() -> list[str]:
    """How to run twistd with this Python (the venv's script if there is one)."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def start_daemon(role: str, config: Path, log_file: Path) -> subprocess.Popen[bytes]:
    """``twistd -n gwms-<role> --config FILE`` as a child process, logging to ``log_file``."""
    return subprocess.Popen(
        [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile", str(log_file),
         f"gwms-{role}", "--config", str(config)],
        stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for_file(path: Path, process: subprocess.Popen[bytes], deadline_s: float, log_file: Path) -> str:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.poll() is not None:
            raise UsageError(f"the daemon exited with status {process.returncode}; see {log_file}:\n"
                             + log_file.read_text()[-2000:] if log_file.exists() else "")
        time.sleep(0.05)
    raise UsageError(f"the daemon did not start listening within {deadline_s:g} s; see {log_file}")


def run(args: argparse.Namespace) -> int:
    directory = args.dir or Path(tempfile.mkdtemp(prefix="gwms-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"gwms demo: credentials, configuration and logs in {directory}")
    config = prepare(directory, args.port)
    address_file = directory / "run" / "collector.address"
    address_file.unlink(missing_ok=True)
    log_file = directory / "log" / "collector.log"
    collector = start_daemon("collector", config, log_file)
    try:
        address = wait_for_file(address_file, collector, 30, log_file)
        print(f"gwms demo: collector listening on {address} (TLS, x509 and token authentication)")
        env = {**os.environ, "GWMS_CONFIG": str(config)}
        subprocess.run([sys.executable, "-m", "gwms.cli.demo", str(config), address], env=env, check=True)
        print(f"\n$ gwms status --pool {address} --any")
        subprocess.run([sys.executable, "-m", "gwms", "status", "--pool", address, "--any"], env=env, check=True)
        print(f"\n$ gwms status --pool {address} --type Machine --long")
        subprocess.run([sys.executable, "-m", "gwms", "status", "--pool", address, "--type", "Machine",
                        "--long"], env=env, check=True)
        print(f"\nAudit log of authorization decisions: {directory / 'log' / 'audit.jsonl'}")
        if args.keep:
            print(f"gwms demo: running; try GWMS_CONFIG={config} gwms status --any. Ctrl-C stops.")
            collector.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if collector.poll() is None:
            os.killpg(collector.pid, signal.SIGTERM)
            collector.wait(timeout=30)
    print("gwms demo: collector stopped")
    return 0


def advertise_demo_slot(config_path: str, address: str) -> None:
    """Advertise one slot ad the way a startd does: as the host identity, over TLS."""
    from twisted.internet import task

    from gwms import classads
    from gwms.config import load_config
    from gwms.protocols.client import Address, ClientSecurity, CollectorList

    config = load_config(config_path)
    ad = classads.parse_new(
        '[MyType = "Machine"; Name = "slot1@localhost"; Machine = "localhost"; OpSys = "LINUX";'
        ' Arch = "X86_64"; State = "Unclaimed"; Activity = "Idle"; Cpus = 1; Memory = 1024;'
        ' Start = true; Demo = true; ClaimId = "private-claim-capability"]')

    def main(reactor: Any) -> Any:
        collectors = CollectorList(reactor, [Address.parse(address)], ClientSecurity.from_config(config))

        def report(results: list[Any]) -> None:
            for r in results:
                if hasattr(r, "getErrorMessage"):
                    raise SystemExit(f"advertise failed: {r.getErrorMessage()}")
            print("gwms demo: advertised slot1@localhost as /O=gwms/OU=Hosts/CN=localhost (x509 over TLS)")
            collectors.close()

        return collectors.advertise(ad, "ADVERTISE_STARTD").addCallback(report)

    task.react(main, [])


if __name__ == "__main__":
    advertise_demo_slot(sys.argv[1], sys.argv[2])
