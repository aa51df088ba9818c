"""A static pool of real daemons on 127.0.0.1 for integration tests: collector, negotiator,
schedd and startd, each ``twistd -n gwms-<role>`` with the same host configuration."""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

POOL_CONFIG = """
[pool]
name = "itest"
collectors = ["{collector}"]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
audit_log = "{workdir}/audit.jsonl"

[security.READ]
allow = ["*"]
[security.WRITE]
allow_regex = ["fs:.*", "/O=gwms/OU=Users/CN=.*"]
[security.ADMINISTRATOR]
allow = ["{host}"]
[security.DAEMON]
allow = ["{host}"]
[security.NEGOTIATOR]
allow = ["{host}"]

[collector]
listen = "{collector_listen}"
address_file = "{workdir}/collector.address"
sweep_interval = 2

[negotiator]
listen = "127.0.0.1:0"
interval = {negotiator_interval}
min_interval = 0.3
priorities = "{workdir}/priorities.json"
address_file = "{workdir}/negotiator.address"

[schedd]
listen = "127.0.0.1:0"
grid_mapfile = "{workdir}/grid-mapfile"
unix_socket = "{socket_dir}/schedd.sock"
spool = "{workdir}/spool"
update_interval = 2
periodic_interval = {periodic_interval}
proxy_check_interval = {proxy_check_interval}
reconnect_interval = 0.5
address_file = "{workdir}/schedd.address"

[startd]
listen = "127.0.0.1:0"
name = "{startd_name}"
execute = "{execute_dir}"
slots = {slots}
partitionable = {partitionable}
cpus = {cpus}
memory = 4096
update_interval = 5
address_file = "{workdir}/startd-{startd_name}.address"
{startd_extra}
"""

HOST_DN = "/O=gwms/OU=Hosts/CN=localhost"


@dataclass
class Pool:
    workdir: Path
    config: Path
    daemons: dict[str, Any] = field(default_factory=dict)
    start: Callable[..., Any] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"GWMS_CONFIG": str(self.config)}


def write_config(path: Path, creds: Any, workdir: Path, collector: str, collector_listen: str,
                 slots: int = 4, partitionable: bool = False, cpus: int = 4, startd_name: str = "wn1",
                 negotiator_interval: float = 2, periodic_interval: float = 2,
                 socket_dir: Path | None = None, proxy_check_interval: float = 30,
                 execute_dir: Path | None = None, startd_extra: str = "") -> Path:
    """``execute_dir``: the startd's (default: under ``workdir``); ``startd_extra``: more
    ``[startd]`` lines (e.g. an identity switch)."""
    path.write_text(POOL_CONFIG.format(socket_dir=socket_dir or workdir, proxy_check_interval=proxy_check_interval,
        execute_dir=execute_dir or f"{workdir}/execute-{startd_name}", startd_extra=startd_extra,
        collector=collector, collector_listen=collector_listen, ca=creds.ca, cert=creds.host_cert,
        key=creds.host_key, workdir=workdir, host=HOST_DN, slots=slots,
        partitionable="true" if partitionable else "false", cpus=cpus, startd_name=startd_name,
        negotiator_interval=negotiator_interval, periodic_interval=periodic_interval, user=getpass.getuser()))
    return path


def start_pool(creds: Any, workdir: Path, start_daemon: Callable[..., Any], **options: Any) -> Pool:
    (workdir / "grid-mapfile").write_text(f'"/O=gwms/OU=Users/CN=alice" {getpass.getuser()}\n')
    first = write_config(workdir / "collector.toml", creds, workdir, "127.0.0.1:9618", "127.0.0.1:0", **options)
    collector = start_daemon("collector", first, workdir)
    config = write_config(workdir / "pool.toml", creds, workdir, collector.address, collector.address, **options)
    pool = Pool(workdir, config, start=start_daemon)
    pool.daemons["collector"] = collector
    for role in ("negotiator", "schedd", "startd"):
        pool.daemons[role] = start_daemon(role, config, workdir, address_name=None if role != "startd" else
                                          f"startd-{options.get('startd_name', 'wn1')}")
    return pool
