"""Host configuration: one TOML file per host, a section per role plus ``[pool]`` and ``[security]``.

Every key every role understands is declared here, in one place, so that a typo is an error at
start-up (naming the key and the file) rather than a silent default, and so that the README's
configuration reference can be checked against this table. Relative paths are resolved against
the directory of the file, which is what an operator editing ``site.toml`` expects.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

LEVELS = (
    "READ",
    "WRITE",
    "ADMINISTRATOR",
    "DAEMON",
    "NEGOTIATOR",
    "ADVERTISE_STARTD",
    "ADVERTISE_SCHEDD",
    "ADVERTISE_MASTER",
    "ADVERTISE_FACTORY",
    "ADVERTISE_FRONTEND",
)
REQUIREMENTS = ("REQUIRED", "PREFERRED", "OPTIONAL", "NEVER")
DEFAULT_PORT = 9618
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Key:
    kind: str  # str, path, int, float, bool, table, strlist, address, addrlist, requirement, networks, limits
    default: Any
    doc: str


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, DEFAULT_PORT
    host = host.strip("[]")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad port in address {value!r}")
    return host, int(port)


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; the port defaults to 9618, HTCondor's) -> (host, port)."""
    try:
        return _address(value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


POOL_KEYS: dict[str, Key] = {
    "name": Key("str", "gwms", "The pool's name; also the issuer that tokens of this pool carry."),
    "collectors": Key("addrlist", [f"127.0.0.1:{DEFAULT_PORT}"], "Collectors of the pool, host:port; "
                      "updates go to all, queries to the first that answers."),
    "ca": Key("path", None, "PEM file of the CA certificates this host trusts."),
    "cert": Key("path", None, "This host's certificate (PEM); with key, the x509 identity it presents."),
    "key": Key("path", None, "The private key of cert (mode 0600)."),
    "proxy": Key("path", None, "An RFC 3820 proxy file (cert, key and chain) to present instead of cert/key."),
    "token": Key("path", None, "A file holding the bearer token this host presents."),
    "token_signing_key": Key("path", None, "The pool's token signing key, for daemons that verify tokens."),
    "max_frame_bytes": Key("int", DEFAULT_MAX_FRAME, "Largest frame accepted, checked before buffering."),
    "connect_timeout": Key("float", 2.0, "Seconds to wait for a TCP connection before failing over."),
    "request_timeout": Key("float", 60.0, "Seconds to wait for the reply to one command."),
    "idle_timeout": Key("float", 600.0, "Seconds a server keeps a connection that sends no complete frame."),
    "audit_log": Key("path", None, "File receiving one JSON line per authorization decision."),
    "brokers": Key("addrlist", [], "GCB brokers (host:port of their registration service) a startd, schedd or "
                                   "negotiator registers with, to be reachable through them from outside a firewall "
                                   "(collectors do not: the pool names their addresses)."),
    "broker_only": Key("bool", False, "With brokers: listen on no TCP port at all, reachable only through them."),
    "connect_back": Key("bool", True, "Ask a brokered daemon to connect to this one (which must listen on TCP) "
                                      "instead of going through the broker's relay, when it can (HTCondor's CCB "
                                      "way); the relay remains the fallback."),
}

SECURITY_KEYS: dict[str, Key] = {
    "methods": Key("strlist", ["x509", "token", "fs"], "Authentication methods, in order of preference "
                   "(x509, token, fs, anonymous, or module:Class of a site plugin)."),
    "authentication": Key("requirement", "REQUIRED", "Default authentication requirement for every level but READ."),
    "encryption": Key("requirement", "REQUIRED", "Default encryption requirement for every level but READ."),
    "authorizer": Key("str", "lists", "The IAuthorizer plugin: 'lists' or module:Class."),
}

LEVEL_KEYS: dict[str, Key] = {
    "authentication": Key("requirement", None, "REQUIRED, PREFERRED, OPTIONAL or NEVER for this level."),
    "encryption": Key("requirement", None, "REQUIRED, PREFERRED, OPTIONAL or NEVER for this level."),
    "methods": Key("strlist", None, "Methods accepted for this level (default: [security] methods)."),
    "allow": Key("strlist", [], "Identities allowed, exactly as authenticated ('*' allows anyone, "
                 "including anonymous clients)."),
    "allow_regex": Key("strlist", [], "Regular expressions an allowed identity matches in full."),
    "deny": Key("strlist", [], "Identities denied; deny wins over allow."),
    "deny_regex": Key("strlist", [], "Regular expressions of denied identities."),
    "allow_networks": Key("networks", ["0.0.0.0/0", "::/0"], "Networks (CIDR) clients may come from."),
    "deny_networks": Key("networks", [], "Networks (CIDR) refused, e.g. a blocked site."),
}

COLLECTOR_KEYS: dict[str, Key] = {
    "listen": Key("address", f"127.0.0.1:{DEFAULT_PORT}", "TCP address the collector listens on."),
    "unix_socket": Key("path", None, "A UNIX socket for local clients (fs authentication)."),
    "ad_lifetime": Key("float", 900.0, "Seconds an ad lives unless it sets ClassAdLifetime (HTCondor's CLASSAD_LIFETIME)."),
    "max_ad_lifetime": Key("float", 86400.0, "Upper bound on an ad-supplied ClassAdLifetime."),
    "sweep_interval": Key("float", 5.0, "Seconds between removals of expired ads."),
    "private_attributes": Key("strlist", ["ClaimId", "ClaimIdList", "Capability", "ChildClaimIds"],
                              "Attributes only NEGOTIATOR-level queries may read."),
    "max_ads": Key("int", 1_000_000, "Most ads stored; updates beyond are refused."),
    "name": Key("str", None, "Name of the collector's own ad (default: the pool name and the address)."),
    "address_file": Key("path", None, "File the collector writes its actual address to once it listens "
                        "(useful with port 0)."),
}

SCHEDD_KEYS: dict[str, Key] = {
    "listen": Key("address", "127.0.0.1:9615", "TCP address the schedd listens on (remote submission, negotiator)."),
    "unix_socket": Key("path", None, "A UNIX socket for local submission (fs authentication)."),
    "name": Key("str", None, "The schedd's name (default: schedd@<host>)."),
    "spool": Key("path", "spool", "Directory of the durable job queue (job_queue.db) and history."),
    "grid_mapfile": Key("path", None, "'\"DN\" user' lines mapping remote identities to local users."),
    "uid_domain": Key("str", None, "Domain of submitter names user@domain (default: the pool name)."),
    "update_interval": Key("float", 60.0, "Seconds between Scheduler/Submitter ad updates."),
    "periodic_interval": Key("float", 60.0, "Seconds between periodic_hold/release/remove evaluations."),
    "reconnect_interval": Key("float", 5.0, "Seconds between a shadow's attempts to reach a lost starter."),
    "proxy_check_interval": Key("float", 30.0, "Seconds between checks of the users' x509userproxy files: a refreshed "
                                               "proxy is delegated again to the running job; an expired one holds it."),
    "negotiator": Key("address", None, "Negotiator to poke (RESCHEDULE) when jobs arrive (default: from the collector)."),
    "address_file": Key("path", None, "File the schedd writes its actual address to once it listens."),
}

STARTD_KEYS: dict[str, Key] = {
    "listen": Key("address", "127.0.0.1:0", "TCP address the startd listens on."),
    "name": Key("str", None, "Machine name used in slot names slotN@NAME (default: the host name)."),
    "execute": Key("path", "execute", "Directory under which each job gets a fresh sandbox."),
    "slots": Key("int", 1, "Number of static slots (ignored when partitionable)."),
    "partitionable": Key("bool", False, "One partitionable slot carved into dynamic slots per job."),
    "cpus": Key("int", 0, "CPUs to offer (0: what the machine has)."),
    "memory": Key("int", 0, "Memory to offer in MB (0: what the machine has)."),
    "disk": Key("int", 0, "Disk to offer in KiB (0: free space of the execute directory)."),
    "start": Key("str", "true", "START expression: which jobs this machine accepts."),
    "rank": Key("str", "0", "The machine's Rank of jobs."),
    "attributes": Key("table", {}, "Extra attributes for the machine ads (name = ClassAd expression text)."),
    "identity_switch": Key("str", "none", "The IIdentitySwitch plugin: none, setuid, glexec, or module:Class."),
    "allow_shared_identity": Key("bool", False, "With identity_switch = none, run jobs of more than one Owner as the "
                                                "startd's user (dangerous: each can read and kill the others' jobs)."),
    "grid_mapfile": Key("path", None, "'\"DN\" account' and 'user account' lines mapping a job's proxy DN or Owner to a "
                                      "local account (setuid and the stock glexec helper)."),
    "min_job_uid": Key("int", 1000, "The lowest uid setuid and glexec run jobs as (system accounts are below)."),
    "glexec_command": Key("strlist", [], "The glexec plugin's helper command (default: gwms's stock helper, which "
                                         "maps with the grid-mapfile and switches with setpriv or runuser)."),
    "pilot_credential": Key("path", None, "The glidein's own credential (its proxy or token), which jobs must not "
                                          "be able to read (set by glidein_startup.sh)."),
    "update_interval": Key("float", 300.0, "Seconds between slot ad updates (and on every change)."),
    "claim_worklife": Key("float", 1200.0, "Seconds a claim may run further jobs without a new negotiation."),
    "idle_claim_timeout": Key("float", 600.0, "Seconds a claim may sit without a job before it is released."),
    "shutdown_grace": Key("float", 10.0, "Seconds a job gets between SIGTERM and SIGKILL at shutdown."),
    "address_file": Key("path", None, "File the startd writes its actual address to once it listens."),
    # A glidein's lifetime (glidein_startup.sh sets these; 0 means never):
    "retire_after": Key("float", 0.0, "Seconds after start when the startd retires: it takes no new claims, "
                                      "lets running jobs finish and exits when none is left (GLIDEIN_Retire_Time)."),
    "max_lifetime": Key("float", 0.0, "Seconds after start when the startd shuts down, running jobs or not "
                                      "(GLIDEIN_ToDie)."),
    "max_idle": Key("float", 0.0, "Seconds without any claim after which the startd exits (GLIDEIN_Max_Idle)."),
}

NEGOTIATOR_KEYS: dict[str, Key] = {
    "listen": Key("address", "127.0.0.1:0", "TCP address the negotiator listens on (RESCHEDULE)."),
    "name": Key("str", None, "The negotiator's name (default: negotiator@<host>)."),
    "interval": Key("float", 60.0, "Seconds between negotiation cycles."),
    "min_interval": Key("float", 2.0, "Shortest time between cycles when schedds ask for one."),
    "priorities": Key("path", "priorities.json", "File of user priorities (persisted across restarts)."),
    "half_life": Key("float", 86400.0, "Priority half-life in seconds (HTCondor's PRIORITY_HALFLIFE)."),
    "address_file": Key("path", None, "File the negotiator writes its actual address to once it listens."),
}

FACTORY_KEYS: dict[str, Key] = {
    "name": Key("str", None, "The factory's name (default: factory@<host>)."),
    "collectors": Key("addrlist", None, "The glidein collector(s): where the factory advertises its entries and "
                                        "reads the frontends' requests (default: [pool] collectors)."),
    "work_dir": Key("path", "factory", "Directory of the glidein records (factory.db), the served glidein files "
                                       "and the local glideins' scratch directories."),
    "web_listen": Key("address", "127.0.0.1:0", "TCP address of the web server that serves the glidein files."),
    "web_url": Key("str", None, "URL glideins fetch their files from (default: http://<web_listen>/, as bound)."),
    "address_file": Key("path", None, "File the factory writes its web server's address (host:port) to once it "
                                       "listens."),
    "cycle_interval": Key("float", 60.0, "Seconds between factory cycles (read requests, submit, query, advertise)."),
    "stale_after": Key("float", 86400.0, "Seconds a glidein may stay queued, or unknown to its grid, before the "
                                         "factory removes and forgets it."),
    "validation_scripts": Key("strlist", [], "Site validation scripts (paths), run by every glidein after the "
                                             "stock ones."),
    "wheelhouse": Key("path", None, "Directory of wheels (gwms and its dependencies) served to glideins, which "
                                    "then install them into a private environment instead of using the node's."),
    "ca": Key("path", None, "CA bundle the glideins trust (default: [pool] ca)."),
    "credential": Key("path", None, "Pilot credential given to glideins: PEM certificate and key, or a token "
                                    "file (an entry may name its own; default: the proxy X509_USER_PROXY names)."),
    "token_signing_key": Key("path", None, "The pool's token signing key, for entries with pilot_token: each "
                                           "glidein gets a token of its own."),
    "token_issuer": Key("str", None, "The issuer of the glideins' tokens (default: the pool's name)."),
}

# [factory.entry.NAME]: one per Grid CE or batch queue.
ENTRY_KEYS: dict[str, Key] = {
    "grid": Key("str", "local", "The IGridSubmitter plugin: local, slurm, ssh, or module:Class."),
    "contact": Key("str", "", "Where the plugin submits: for ssh, user@host or user@host:port; the local and "
                              "slurm plugins need none (it is advertised as GLIDEIN_Contact)."),
    "enabled": Key("bool", True, "A disabled entry is advertised as such and submits nothing."),
    "attributes": Key("table", {}, "Attributes the entry publishes and its glideins carry (GLIDEIN_Site, "
                                   "GLIDEIN_CPUS, GLIDEIN_MaxMemMBs, ...: name = value)."),
    "allowed_frontends": Key("strlist", [], "Authenticated identities of the frontends whose requests count."),
    "max_glideins": Key("int", 1000, "Most glideins at the entry (queued, running and held)."),
    "max_idle": Key("int", 100, "Most glideins queued (idle) at the entry."),
    "max_held": Key("int", 50, "Held glideins beyond which the entry submits no more."),
    "frontend_limits": Key("limits", {}, "Per frontend identity: a table of max_glideins, max_idle, max_held and "
                                        "submit_rate."),
    "submit_rate": Key("float", 60.0, "Most glideins submitted per minute."),
    "max_walltime": Key("float", 86400.0, "Seconds a glidein lives at most (GLIDEIN_Max_Walltime); it retires "
                                          "a tenth earlier."),
    "max_idle_time": Key("float", 1200.0, "Seconds a glidein waits for a claim before it exits (GLIDEIN_Max_Idle)."),
    "failure_backoff": Key("float", 300.0, "Seconds a glidein that failed validation holds its batch slot before "
                                           "exiting, so that a broken node does not take the next one."),
    "credential": Key("path", None, "This entry's pilot credential (default: [factory] credential)."),
    "credential_margin": Key("float", 300.0, "Seconds before its credential expires that a glidein shuts down."),
    "pilot_token": Key("bool", False, "Give each glidein a token of its own instead of a credential: pool-signed, "
                                      "for ADVERTISE_STARTD only, subject glidein-<id>@<factory>, for the glidein's "
                                      "lifetime (needs [factory] token_signing_key)."),
    "python": Key("str", None, "The node's Python for the startd (default: python3 on the PATH)."),
    "worker_listen": Key("str", "127.0.0.1", "Address the glideins' startds listen on: 0.0.0.0 for every "
                                             "interface of a worker node, which then advertises the address it "
                                             "reaches the pool's collector from."),
    "brokers": Key("strlist", [], "GCB brokers (host:port) the glideins register with: for nodes that can only "
                                  "connect out, their startds listen on no port and are reached through them."),
    "http_proxy": Key("str", None, "HTTP proxy (a Squid near the workers, http://host:port) the glideins fetch "
                                   "their files through; the files are content-addressed and cacheable."),
    "worker_dir": Key("str", None, "Directory on the worker node under which a Slurm glidein makes its own "
                                   "(slurm, and ssh with remote_batch = slurm; default: $TMPDIR, else /tmp). A fork "
                                   "glidein runs in the remote work area."),
    "partition": Key("str", None, "Slurm partition (slurm, and ssh with remote_batch = slurm)."),
    "account": Key("str", None, "Slurm account charged for the glideins."),
    "qos": Key("str", None, "Slurm quality of service."),
    "slurm_options": Key("strlist", [], "More sbatch options, each one word (e.g. \"--mem=2G\", "
                                        "\"--constraint=cvmfs\")."),
    "nodes": Key("int", 1, "Nodes per Slurm job: with more than 1, one glidein starts on each node (srun)."),
    "remote_batch": Key("str", "fork", "For ssh: the batch system on the remote host: slurm, or fork (glideins run "
                                       "as processes of the remote host)."),
    "remote_dir": Key("str", ".gwms", "For ssh: the remote work area (relative to the remote home, or absolute)."),
    "ssh_key": Key("path", None, "For ssh: the private key to log in with."),
    "ssh_known_hosts": Key("path", None, "For ssh: known_hosts file with the remote's host key (strict checking; "
                                         "default: ~/.ssh/known_hosts)."),
    "ssh_options": Key("strlist", [], "For ssh: more ssh -o options (e.g. \"ConnectTimeout=20\")."),
}

FRONTEND_KEYS: dict[str, Key] = {
    "name": Key("str", None, "The frontend's name (default: frontend@<host>)."),
    "glidein_collectors": Key("addrlist", None, "Where the factories' entries are and the requests go (default: "
                                                "[pool] collectors)."),
    "pool_collectors": Key("addrlist", None, "The pool's collectors: the glideins join them and the frontend "
                                             "counts its glideins there (default: [pool] collectors)."),
    "schedds": Key("strlist", [], "Schedd addresses (host:port) to read jobs from (default: every schedd in the "
                                  "pool collector)."),
    "trusted": Key("strlist", [], "Identities the glideins' startds allow at DAEMON level: the pool's schedds."),
    "pilot_credential": Key("path", None, "A pilot credential (proxy or token file) the frontend hands to the "
                                          "factories, sealed with each factory's public key, for its glideins."),
    "cycle_interval": Key("float", 60.0, "Seconds between frontend cycles."),
    "validation_scripts": Key("strlist", [], "The VO's own validation scripts (paths): the frontend serves them and "
                                             "every glidein it asks for runs them after the factory's."),
    "work_dir": Key("path", "frontend", "Directory of the files the frontend serves to glideins."),
    "web_listen": Key("address", "127.0.0.1:0", "TCP address of the web server for the frontend's glidein files "
                                                "(started only with validation_scripts)."),
    "web_url": Key("str", None, "URL glideins fetch the frontend's files from (default: http://<web_listen>/)."),
    "max_idle": Key("int", 5000, "Most idle glideins requested over all groups."),
    "max_running": Key("int", 50000, "Most glideins over all groups."),
}

# [frontend.group.NAME]: which jobs, which entries, how hard to push.
GROUP_KEYS: dict[str, Key] = {
    "match": Key("str", "true", "ClassAd expression, job as MY and entry as TARGET: may the job run there "
                                "(e.g. stringListMember(TARGET.GLIDEIN_Site, MY.DESIRED_Sites))."),
    "job_constraint": Key("str", "true", "ClassAd expression over the job: which idle jobs the group serves."),
    "idle_per_entry": Key("int", 100, "Most idle glideins requested at one entry."),
    "max_idle": Key("int", 1000, "Most idle glideins the group requests in total."),
    "curb_idle": Key("int", 200, "Once the group has this many idle glideins, new requests are halved."),
    "max_running": Key("int", 10000, "Most glideins of the group in total."),
    "ramp_up": Key("int", 20, "Most a request at one entry grows per cycle (0: no limit)."),
    "remove_excess": Key("str", "IDLE", "What to ask when fewer glideins are wanted than wait: NO, WAIT, IDLE "
                                        "or ALL (glideinWMS's ReqRemoveExcess)."),
}

# `twistd -n gwms-gcb`: the connection broker for daemons that can only connect out.
GCB_KEYS: dict[str, Key] = {
    "listen": Key("address", "127.0.0.1:9630", "TCP address of the registration service (the message layer)."),
    "tunnel_listen": Key("address", "127.0.0.1:9631", "TCP address where registered daemons open their tunnel."),
    "public_host": Key("str", None, "Host name or address published for the relayed ports (default: the listen "
                                    "host)."),
    "registration_level": Key("str", "DAEMON", "Authorization level REGISTER needs (DAEMON; READ lets anyone "
                                               "register, as the seed's GCB did)."),
    "address_file": Key("path", None, "File the broker writes its registration address to once it listens."),
}

# `twistd -n gwms-pool`: every central role of a one-host pool in one process.
ONEHOST_KEYS: dict[str, Key] = {
    "glidein_collector_listen": Key("address", "127.0.0.1:9619", "TCP address of the glidein collector (the "
                                                                  "pool's collector is [collector] listen)."),
    "glidein_collector_address_file": Key("path", None, "File the glidein collector writes its address to."),
    "credentials": Key("path", "credentials", "Where gwms-pool makes (once) and keeps the pool's CA, host and "
                                              "glidein certificates when [pool] ca is not set."),
}

# Sections with named sub-tables of their own schema: [factory.entry.NAME], [frontend.group.NAME].
SUBTABLES: dict[str, tuple[str, dict[str, Key]]] = {
    "factory": ("entry", ENTRY_KEYS),
    "frontend": ("group", GROUP_KEYS),
}

SECTIONS: dict[str, dict[str, Key]] = {
    "pool": POOL_KEYS,
    "security": SECURITY_KEYS,
    "collector": COLLECTOR_KEYS,
    "schedd": SCHEDD_KEYS,
    "startd": STARTD_KEYS,
    "negotiator": NEGOTIATOR_KEYS,
    "factory": FACTORY_KEYS,
    "frontend": FRONTEND_KEYS,
    "onehost": ONEHOST_KEYS,
    "gcb": GCB_KEYS,
}


def _check_value(kind: str, value: Any, base: Path) -> Any:
    if value is None:
        return None
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise ValueError("must be a file path (a string)")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if kind in ("strlist", "addrlist", "networks"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of strings")
        if kind == "addrlist":
            return [_address(v) for v in value]
        if kind == "networks":
            return [ipaddress.ip_network(v, strict=False) for v in value]
        return list(value)
    if kind == "table":
        if not isinstance(value, dict):
            raise ValueError("must be a table")
        return dict(value)
    if kind == "address":
        if not isinstance(value, str):
            raise ValueError("must be a host:port string")
        return _address(value)
    if kind == "limits":
        if not isinstance(value, dict):
            raise ValueError("must be a table of tables")
        limits = {}
        for who, table in value.items():
            if not isinstance(table, dict) or not all(
                    k in ("max_glideins", "max_idle", "max_held", "submit_rate") and isinstance(v, (int, float))
                    and not isinstance(v, bool) and v >= 0 and (k == "submit_rate" or isinstance(v, int))
                    for k, v in table.items()):
                raise ValueError(f"entry {who!r} must be a table of max_glideins, max_idle, max_held (integers >= 0) "
                                 "and submit_rate (glideins a minute)")
            limits[who] = dict(table)
        return limits
    if kind == "requirement":
        if not isinstance(value, str) or value.upper() not in REQUIREMENTS:
            raise ValueError(f"must be one of {', '.join(REQUIREMENTS)}")
        return value.upper()
    raise AssertionError(kind)


def _check_table(table: Mapping[str, Any], keys: Mapping[str, Key], where: str, source: str,
                 base: Path, subtables: Callable[[str, Any], bool] = lambda k, v: False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in table.items():
        if subtables(name, value):
            continue
        key = keys.get(name)
        if key is None:
            known = ", ".join(sorted(keys))
            raise ConfigError(f"{source}: unknown key {name!r} in [{where}] (known keys: {known})")
        try:
            out[name] = _check_value(key.kind, value, base)
        except ValueError as e:
            raise ConfigError(f"{source}: [{where}] {name} {e} (got {value!r})") from None
    for name, key in keys.items():
        if name not in out:
            out[name] = _check_value(key.kind, key.default, base) if key.default is not None else None
    return out


@dataclass(frozen=True)
class LevelPolicy:
    """Authentication, encryption and authorization settings of one authorization level."""

    authentication: str
    encryption: str
    methods: tuple[str, ...]
    allow: tuple[str, ...] = ()
    allow_regex: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    deny_regex: tuple[str, ...] = ()
    allow_networks: tuple[Any, ...] = ()
    deny_networks: tuple[Any, ...] = ()
    lists_configured: bool = False


@dataclass(frozen=True)
class HostConfig:
    source: str
    pool: dict[str, Any]
    security: dict[str, Any]
    levels: dict[str, LevelPolicy]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """A role's section, with defaults for keys the file does not set."""
        if name in self.sections:
            return self.sections[name]
        return _check_section({}, name, SECTIONS[name], self.source, Path("."))


def _levels(security_table: Mapping[str, Any], security: dict[str, Any], source: str,
            base: Path) -> dict[str, LevelPolicy]:
    levels: dict[str, LevelPolicy] = {}
    list_keys = ("allow", "allow_regex", "deny", "deny_regex")
    for level in LEVELS:
        raw = security_table.get(level, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: [security.{level}] must be a table")
        table = _check_table(raw, LEVEL_KEYS, f"security.{level}", source, base)
        if level == "READ":
            auth_default, enc_default = "OPTIONAL", "OPTIONAL"
        else:
            auth_default, enc_default = security["authentication"], security["encryption"]
        levels[level] = LevelPolicy(
            authentication=table["authentication"] or auth_default,
            encryption=table["encryption"] or enc_default,
            methods=tuple(table["methods"] or security["methods"]),
            allow=tuple(table["allow"]),
            allow_regex=tuple(table["allow_regex"]),
            deny=tuple(table["deny"]),
            deny_regex=tuple(table["deny_regex"]),
            allow_networks=tuple(table["allow_networks"]),
            deny_networks=tuple(table["deny_networks"]),
            lists_configured=any(k in raw for k in list_keys),
        )
    return levels


def _check_section(table: Mapping[str, Any], name: str, keys: Mapping[str, Key], source: str,
                   base: Path) -> dict[str, Any]:
    sub = SUBTABLES.get(name)
    if sub is None:
        return _check_table(table, keys, name, source, base)
    sub_name, sub_keys = sub
    out = _check_table(table, keys, name, source, base, subtables=lambda k, v: k == sub_name)
    named = table.get(sub_name, {})
    if not isinstance(named, dict) or not all(isinstance(v, dict) for v in named.values()):
        raise ConfigError(f"{source}: [{name}.{sub_name}] must hold tables, one per name: [{name}.{sub_name}.NAME]")
    out[sub_name] = {n: _check_table(t, sub_keys, f"{name}.{sub_name}.{n}", source, base) for n, t in named.items()}
    return out


def parse_config(text: str, source: str = "<config>", base: Path | None = None) -> HostConfig:
    """Parse and check the TOML text of a host configuration."""
    base = base or Path(".")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}] (known sections: {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a [section]")
    pool = _check_table(data.get("pool", {}), POOL_KEYS, "pool", source, base)
    security_table = data.get("security", {})
    security = _check_table(security_table, SECURITY_KEYS, "security", source, base,
                            subtables=lambda k, v: k in LEVELS and isinstance(v, dict))
    levels = _levels(security_table, security, source, base)
    sections = {name: _check_section(data.get(name, {}), name, keys, source, base)
                for name, keys in SECTIONS.items() if name not in ("pool", "security")}
    return HostConfig(source=source, pool=pool, security=security, levels=levels, sections=sections)


def load_config(path: str | Path) -> HostConfig:
    """Read and check a host configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read configuration {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_config(text, source=str(path), base=path.resolve().parent)


def reference_markdown() -> str:
    """The configuration reference as Markdown tables (pasted into the README; a test keeps the
    two in step)."""
    out = []
    for section, keys in SECTIONS.items():
        out.append(f"**`[{section}]`**\n")
        out.append("| key | default | meaning |\n| --- | --- | --- |")
        for name, key in keys.items():
            default = "" if key.default is None else f"`{key.default!r}`".replace("|", "\\|")
            out.append(f"| `{name}` | {default} | {key.doc} |")
        out.append("")
        if section in SUBTABLES:
            sub_name, sub_keys = SUBTABLES[section]
            out.append(f"**`[{section}.{sub_name}.NAME]`**, one per {sub_name}:\n")
            out.append("| key | default | meaning |\n| --- | --- | --- |")
            for name, key in sub_keys.items():
                default = "" if key.default is None else f"`{key.default!r}`".replace("|", "\\|")
                out.append(f"| `{name}` | {default} | {key.doc} |")
            out.append("")
        if section == "security":
            out.append(f"**`[security.LEVEL]`**, for each level ({', '.join(LEVELS)}):\n")
            out.append("| key | default | meaning |\n| --- | --- | --- |")
            for name, key in LEVEL_KEYS.items():
                default = "" if key.default is None else f"`{key.default!r}`"
                out.append(f"| `{name}` | {default} | {key.doc} |")
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown())
