"""The glidein's startd configuration, written from its ``glidein_config``.

``glidein_startup.sh`` collects what it knows in ``glidein_config`` (KEY=VALUE lines: its options,
the entry's attributes, what validation scripts measured) and then runs::

    python -m gwms.glidein.startd_config GLIDEIN_CONFIG OUT

which writes the TOML host configuration ``twistd -n gwms-startd --config OUT`` reads. Every
``GLIDEIN_*`` setting becomes a slot attribute (as in glideinWMS, where frontends and users
match on GLIDEIN_Site, GLIDEIN_Entry_Name, ...), except the ones that are local paths or lists
meant for the startd itself.

The glidein's end is computed here once: it dies at the earlier of its lifetime (counted from
when the batch job started, which is what the batch system's wall-time limit counts from) and
its credential's expiry less a margin (a startd whose certificate has expired can no longer
talk to the pool, and jobs it runs could not be reported).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gwms import classads
from gwms.config import ConfigError, parse_config

__all__ = [
    "HIDDEN",
    "STRINGS",
    "GlideinConfig",
    "GlideinConfigError",
    "classad_literal",
    "inspect_credential",
    "main",
    "parse_glidein_config",
    "read_glidein_config",
    "startd_config_text",
    "toml_string",
    "write_startd_config",
]

#: glidein_config keys that are not slot attributes: local paths and the startd's own lists.
HIDDEN = frozenset({"GLIDEIN_Trusted", "GLIDEIN_Credential", "GLIDEIN_Dir", "GLIDEIN_CA_File"})
#: The one key that may appear many times: one line per trusted identity, in order.
TRUSTED = "GLIDEIN_Trusted"
#: glidein_config keys that are always ClassAd strings, whatever they look like: a hex hash can
#: look like a number ("1e5..." is a real), and matching on it must not depend on its luck.
STRINGS = frozenset({"GLIDEIN_Client_Web", "GLIDEIN_Client_Description"})
DEFAULT_MAX_IDLE = 1200
DEFAULT_CREDENTIAL_MARGIN = 300
DEFAULT_LISTEN = "127.0.0.1"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Literals kept as they are. No leading zeros: "007" is a name (classad2 would read it as octal).
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_REAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+([eE][+-]?[0-9]+)?|[eE][+-]?[0-9]+)")
_INT64 = range(-(2**63), 2**63)


class GlideinConfigError(ValueError):
    """A glidein_config, or a setting in it, that cannot make a startd configuration."""


@dataclass(frozen=True)
class GlideinConfig:
    """The settings of a glidein_config: ``values`` with later lines winning, and every
    GLIDEIN_Trusted line in ``trusted``."""

    values: dict[str, str] = field(default_factory=dict)
    trusted: tuple[str, ...] = ()


def parse_glidein_config(text: str, source: str = "glidein_config") -> GlideinConfig:
    """KEY=VALUE lines (blank lines and ``#`` comments allowed); later lines win. A line that is
    not KEY=VALUE is an error naming the line: a half-written setting must stop the glidein,
    not silently fall back to a default."""
    values: dict[str, str] = {}
    trusted: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not _KEY.fullmatch(key):
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise GlideinConfigError(f"{source}: line {number}: expected KEY=VALUE, got {shown!r}")
        if "\x00" in value or "\r" in value:
            raise GlideinConfigError(f"{source}: line {number}: control character in the value of {key}")
        if key == TRUSTED:
            trusted.append(value)
        else:
            values[key] = value
    return GlideinConfig(values=values, trusted=tuple(trusted))


def read_glidein_config(path: Path) -> GlideinConfig:
    """Read and parse a glidein_config file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise GlideinConfigError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GlideinConfigError(f"{path}: line {line}: not UTF-8 text") from None
    return parse_glidein_config(text, str(path))


def classad_literal(value: str) -> str:
    """``value`` as ClassAd expression text: integers, reals and true/false stay literals (so
    that ``GLIDEIN_CPUS >= 4`` works), anything else is a ClassAd string."""
    if _INTEGER.fullmatch(value) and int(value) in _INT64:
        return value
    if _REAL.fullmatch(value):
        return value
    if value.lower() in ("true", "false"):
        return value.lower()
    try:
        return classads.quote(value)
    except classads.ClassAdError as e:
        raise GlideinConfigError(str(e)) from None


def _classad_string(value: str) -> str:
    try:
        return classads.quote(value)
    except classads.ClassAdError as e:
        raise GlideinConfigError(str(e)) from None


def toml_string(value: str) -> str:
    """A TOML basic string holding exactly ``value`` (quotes, backslashes and every control
    character escaped)."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            # A lone surrogate (from surrogateescape) has no UTF-8 form; TOML cannot carry it.
            raise GlideinConfigError(f"cannot write {value!r} as TOML: it holds a lone surrogate")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(toml_string(v) for v in values) + "]"


def inspect_credential(path: Path) -> tuple[str, float | None]:
    """What the pilot credential is and when it stops being usable: ``("proxy", expiry)`` for a
    PEM file (anything with ``-----BEGIN``), ``("token", expiry)`` for a bearer token (its
    ``exp``; None if it has none). Expiry in epoch seconds.

    For PEM, the earliest notAfter of the certificates in the file: a proxy is no better than
    the certificate that issued it, whatever its own dates say.
    """
    from gwms.credentials.tokens import TokenError, decode_token_unverified
    from gwms.credentials.x509 import (
        CredentialError,
        load_certificates,
        read_credential_file,
    )

    data = read_credential_file(path, "credential", GlideinConfigError, max_bytes=1 << 20)
    if b"-----BEGIN" in data:
        try:
            certs = load_certificates(path)
        except CredentialError as e:
            raise GlideinConfigError(f"credential: {e}") from None
        return "proxy", min(c.not_valid_after_utc.timestamp() for c in certs)
    try:
        _, claims = decode_token_unverified(data.decode("ascii").strip())
    except (TokenError, UnicodeDecodeError) as e:
        raise GlideinConfigError(f"credential {path} is neither PEM nor a token: {e}") from None
    exp = claims.get("exp")
    # Only for the glidein's own deadline: the collector verifies the token itself.
    valid = isinstance(exp, (int, float)) and not isinstance(exp, bool)
    return "token", float(exp) if valid else None


def _int_setting(values: dict[str, str], key: str, default: int | None = None) -> int:
    raw = values.get(key)
    if raw is None:
        if default is None:
            raise GlideinConfigError(f"{key} is not set")
        return default
    if not re.fullmatch(r"[0-9]+", raw):
        raise GlideinConfigError(f"{key} must be a whole number, got {raw!r}")
    return int(raw)


def _required(values: dict[str, str], key: str) -> str:
    value = values.get(key)
    if not value:
        raise GlideinConfigError(f"{key} is not set")
    return value


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def startd_config_text(config: GlideinConfig, now: float | None = None) -> str:
    """The startd's TOML configuration for ``config``, checked with :func:`gwms.config.parse_config`.

    ``now`` is when the startd starts (epoch seconds; default: now): its retire_after,
    max_lifetime and max_idle count from then.
    """
    now = time.time() if now is None else now
    v = config.values
    name = _required(v, "GLIDEIN_Name")
    glide_dir = _required(v, "GLIDEIN_Dir")
    credential = _required(v, "GLIDEIN_Credential")
    ca = v.get("GLIDEIN_CA_File")
    if not ca:
        # Without the pool's CA the startd can authenticate no collector and no schedd.
        raise GlideinConfigError("GLIDEIN_CA_File is not set (the description lists no ca file)")
    collectors = [c.strip() for c in _required(v, "GLIDEIN_Collector").split(",") if c.strip()]
    if not collectors:
        raise GlideinConfigError("GLIDEIN_Collector names no collector")
    listen_host = v.get("GLIDEIN_Listen") or DEFAULT_LISTEN
    listen = f"[{listen_host}]:0" if ":" in listen_host else f"{listen_host}:0"

    start_time = _int_setting(v, "GLIDEIN_Start_Time")
    lifetime = _int_setting(v, "GLIDEIN_Lifetime")
    retire = _int_setting(v, "GLIDEIN_Retire", lifetime - lifetime // 10)
    max_idle = _int_setting(v, "GLIDEIN_Max_Idle", DEFAULT_MAX_IDLE)
    margin = _int_setting(v, "GLIDEIN_Credential_Margin", DEFAULT_CREDENTIAL_MARGIN)
    cpus = _int_setting(v, "GLIDEIN_CPUS", 0)
    memory = _int_setting(v, "GLIDEIN_MaxMemMBs", 0)

    # Deadlines as epoch seconds, then as the startd's seconds from its start.
    to_die = start_time + lifetime
    kind, expiry = inspect_credential(Path(credential))
    if expiry is not None:
        if expiry <= now:
            raise GlideinConfigError(f"the credential {credential} expired at {_iso(expiry)}: "
                                     "the glidein must not start")
        if expiry - margin <= now:
            raise GlideinConfigError(
                f"the credential {credential} expires at {_iso(expiry)}, within GLIDEIN_Credential_Margin "
                f"({margin} s): the glidein must not start")
        to_die = min(to_die, int(expiry - margin))
    max_lifetime = to_die - int(now)
    if max_lifetime <= 0:
        raise GlideinConfigError(
            f"the glidein's lifetime ({lifetime} s from {_iso(start_time)}) has already run out")
    to_retire = min(start_time + retire, to_die)
    # At least one second: 0 would mean "never" to the startd, the opposite of "retire now".
    retire_after = max(1, to_retire - int(now))

    attributes = {key: _classad_string(value) if key in STRINGS else classad_literal(value)
                  for key, value in v.items() if key.startswith("GLIDEIN_") and key not in HIDDEN}
    attributes["GLIDEIN_ToRetire"] = str(int(now) + retire_after)
    attributes["GLIDEIN_ToDie"] = str(to_die)
    for key, text in attributes.items():
        try:
            classads.parse_expr(text)
        except classads.ClassAdError as e:
            raise GlideinConfigError(f"{key}: not a ClassAd expression: {e}") from None

    identity_switch = v.get("GLIDEIN_Identity_Switch") or "none"
    if identity_switch not in ("none", "setuid", "glexec"):
        raise GlideinConfigError(f"GLIDEIN_Identity_Switch must be none, setuid or glexec, not {identity_switch!r}")
    # A node that can only connect out: the startd listens on no port and registers with the
    # entry's connection brokers (gwms.gcb), which relay the schedds' connections to it.
    brokers = [b.strip() for b in v.get("GLIDEIN_Brokers", "").split(",") if b.strip()]
    lines = [
        "# Written by gwms.glidein.startd_config from the glidein's glidein_config.",
        "[pool]",
        f"collectors = {_toml_list(collectors)}",
        *([f"brokers = {_toml_list(brokers)}", "broker_only = true"] if brokers else []),
        f"ca = {toml_string(ca)}",
        f"{kind} = {toml_string(credential)}",
        "",
        "[security]",
        'methods = ["x509", "token"]',
        "",
        "[security.DAEMON]",
        f"allow = {_toml_list(config.trusted)}",
        "",
        "[startd]",
        f"name = {toml_string(name)}",
        f"listen = {toml_string(listen)}",
        f"execute = {toml_string(os.path.join(glide_dir, 'execute'))}",
        f"cpus = {cpus}",
        f"memory = {memory}",
        f"partitionable = {'false' if cpus == 1 else 'true'}",
        f"address_file = {toml_string(os.path.join(glide_dir, 'startd.address'))}",
        f"retire_after = {retire_after}",
        f"max_lifetime = {max_lifetime}",
        f"max_idle = {max_idle}",
        # The glidein's own credential: the startd keeps it 0600, and a switching plugin makes
        # sure no job can read it.
        f"pilot_credential = {toml_string(credential)}",
        # none (the default: one Owner's jobs per glidein), setuid or glexec, from the entry's
        # attributes: what the site's nodes allow.
        f"identity_switch = {toml_string(identity_switch)}",
        "",
        "[startd.attributes]",
        *(f"{key} = {toml_string(text)}" for key, text in attributes.items()),
        "",
    ]
    text = "\n".join(lines)
    try:
        parse_config(text, source="startd configuration")
    except ConfigError as e:
        raise GlideinConfigError(str(e)) from None
    return text


def write_startd_config(glidein_config: Path, out: Path, now: float | None = None) -> Path:
    """Read ``glidein_config``, write the startd's configuration to ``out`` (atomically: the
    startd never reads half a file), return ``out``."""
    text = startd_config_text(read_glidein_config(glidein_config), now)
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=".startd-config-", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gwms.glidein.startd_config GLIDEIN_CONFIG OUT``; errors are one line on stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m gwms.glidein.startd_config GLIDEIN_CONFIG OUT", file=sys.stderr)
        return 2
    try:
        write_startd_config(Path(args[0]), Path(args[1]))
    except GlideinConfigError as e:
        print(f"gwms glidein: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
