"""Submit description files (the ``condor_submit`` language) turned into the job ads of one cluster.

Users paste their existing HTCondor submit files, so the language is HTCondor's: ``name = value``
commands (case-insensitive), ``#`` comment lines, a trailing backslash to continue a line,
``$(macro)`` substitution, and ``queue`` statements in all their list forms.  What comes out
are HTCondor's job attributes (``Cmd``, ``Arguments``, ``RequestMemory``, ...), so that existing
expressions and habits keep working.

Where this parser is stricter than condor_submit, it is on purpose (DESIGN.md: bad input gets
an error that names what and where):

* An unknown ``name = value`` is an error naming the file and line, with the closest known
  command as a suggestion.  condor_submit quietly takes every unknown name for a macro
  definition, so ``executabel = a.out`` only shows up later as a confusing failure.  A name
  is still accepted as a macro when the file uses it as one, ``$(name)``, anywhere.
* A known HTCondor command that gwms does not implement (``priority``, ``request_gpus``, ...)
  is an error rather than silently ignored: ignoring ``hold = true`` would run the job.
* Only the vanilla universe exists here (JobUniverse 5).
* ``queue ... matching``, ``queue ... from script |``, ``$ENV()`` and the other ``$FUNC()``
  macros, ``if``/``include``/``use`` statements and ``@=`` multi-line values are refused
  with an error: reading the schedd's environment or running commands on the user's behalf is
  not something a parser should do, and silently leaving them unexpanded would be worse.

Other differences are listed where they are made (search for "condor_submit").
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gwms import classads

__all__ = [
    "SUPPORTED_COMMANDS",
    "SubmitError",
    "SubmitResult",
    "format_environment",
    "join_arguments",
    "parse_environment",
    "parse_submit",
    "split_arguments",
]


class SubmitError(ValueError):
    """A submit file that cannot be queued: ``job.sub:12: unknown command "executabel" ...``.

    ``filename`` and ``line`` (None when the error concerns the whole file) are kept as
    attributes, and ``reason`` is the message without the location.
    """

    def __init__(self, filename: str, line: int | None, reason: str) -> None:
        self.filename = filename
        self.line = line
        self.reason = reason
        where = filename if line is None else f"{filename}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass
class SubmitResult:
    """The ads of one cluster.

    ``cluster_ad`` holds what every proc has in common; each of ``proc_ads`` holds ``ProcId``
    and every attribute whose value is not the cluster ad's (the way a schedd stores a
    cluster), so a ``queue 100000`` costs one small ad per proc.
    """

    cluster_ad: classads.ClassAd
    proc_ads: list[classads.ClassAd]

    def job_ads(self) -> list[classads.ClassAd]:
        """The full ad of every proc (cluster ad overlaid with the proc ad)."""
        jobs = []
        for proc in self.proc_ads:
            job = classads.ClassAd()
            for name in self.cluster_ad:
                job[name] = self.cluster_ad.lookup(name)  # lookup: copies expressions unevaluated
            for name in proc:
                job[name] = proc.lookup(name)
            jobs.append(job)
        return jobs


# ---------------------------------------------------------------------------------------------
# Arguments and environment strings (HTCondor's V1 and V2 syntaxes)
# ---------------------------------------------------------------------------------------------

# HTCondor's argument splitter (condor_arglist.cpp split_args) separates on exactly these;
# every other character, \v and \f included, is part of an argument.
_ARG_SPACE: Final = " \t\n\r"
_ARG_SPECIAL_RE = re.compile(r"[ \t\n\r']")
_ARG_RUNS_RE = re.compile(r"[ \t\n\r']+|[^ \t\n\r']+")
_ARG_PLAIN_RE = re.compile(r"[^ \t\n\r']+")
# C isspace(): what condor_submit trims around values.
_WS: Final = " \t\n\r\v\f"


def _quote_argument(arg: str) -> str:
    if not arg:
        return "''"
    if not _ARG_SPECIAL_RE.search(arg):
        return arg
    # Like HTCondor's append_arg: each run of white space and single quotes goes inside one
    # single-quoted section, a single quote doubled; everything else stays as it is.
    pieces = []
    for run in _ARG_RUNS_RE.findall(arg):
        if run[0] in " \t\n\r'":
            pieces.append("'" + run.replace("'", "''") + "'")
        else:
            pieces.append(run)
    return "".join(pieces)


def join_arguments(argv: Iterable[str]) -> str:
    """``argv`` as HTCondor's V2 ("raw") arguments string, the value of the ``Arguments``
    attribute: arguments separated by spaces, white space and ``'`` inside single quotes,
    ``''`` for a literal single quote.  :func:`split_arguments` reverses it exactly."""
    parts = []
    for arg in argv:
        if "\x00" in arg:
            raise ValueError(f"an argument cannot contain a NUL character: {arg!r}")
        parts.append(_quote_argument(arg))
    return " ".join(parts)


def split_arguments(v2: str) -> list[str]:
    """The argv that an ``Arguments`` (V2 syntax) string stands for, as HTCondor's starter
    splits it: white space (space, tab, newline, carriage return) separates arguments, single
    quotes group, and ``''`` inside single quotes is a literal single quote.  Double quotes
    have no special meaning here (they do only in the submit file's quoted form).

    Raises ValueError for an unbalanced single quote.
    """
    args: list[str] = []
    buf: list[str] = []
    token = False
    i, n = 0, len(v2)
    while i < n:
        c = v2[i]
        if c == "'":
            start = i
            i += 1
            token = True
            while True:
                j = v2.find("'", i)
                if j < 0:
                    raise ValueError(f"unbalanced single quote in arguments at offset {start}: {v2[start:start + 40]!r}")
                buf.append(v2[i:j])
                if j + 1 < n and v2[j + 1] == "'":  # repeated quote: a literal one
                    buf.append("'")
                    i = j + 2
                    continue
                i = j + 1
                break
        elif c in _ARG_SPACE:
            i += 1
            if token:
                args.append("".join(buf))
                buf = []
                token = False
        else:
            m = _ARG_PLAIN_RE.match(v2, i)
            assert m is not None
            buf.append(m.group(0))
            i = m.end()
            token = True
    if token:
        args.append("".join(buf))
    return args


def format_environment(env: Mapping[str, str]) -> str:
    """``env`` as HTCondor's V2 environment string (the ``Environment`` attribute): the
    ``NAME=value`` entries quoted like arguments.  :func:`parse_environment` reverses it."""
    entries = []
    for name, value in env.items():
        if not name or "=" in name:
            raise ValueError(f"invalid environment variable name {name!r}")
        entries.append(f"{name}={value}")
    return join_arguments(entries)


def parse_environment(v2: str) -> dict[str, str]:
    """The variables of an ``Environment`` (V2 syntax) string, as the starter sets them.

    Entries are split like arguments (:func:`split_arguments`), each is ``NAME=value`` (the
    first ``=`` separates), and a later entry for the same name wins.  Raises ValueError for
    an unbalanced quote, an entry without ``=`` or an empty name.
    """
    env: dict[str, str] = {}
    for entry in split_arguments(v2):
        name, equals, value = entry.partition("=")
        if not equals:
            raise ValueError(f"environment entry {entry!r} has no '=' (expected NAME=value)")
        if not name:
            raise ValueError(f"environment entry {entry!r} has no variable name before '='")
        env[name] = value
    return env


class _BadValue(Exception):
    """A command's value is wrong; the caller adds the file and line."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(reason)
        self.command = command
        self.reason = reason


def _v2_quoted_to_raw(command: str, value: str) -> str:
    """The inside of a submit file's double-quoted (V2) value, ``""`` undoubled
    (HTCondor's V2QuotedToV2Raw)."""
    s = value.lstrip(_WS)
    out = []
    i = 1
    while True:
        j = s.find('"', i)
        if j < 0:
            raise _BadValue(command, f"unbalanced quotes: the opening double quote is never closed in {value!r}")
        out.append(s[i:j])
        if s.startswith('"', j + 1):
            out.append('"')
            i = j + 2
            continue
        rest = s[j + 1 :]
        if rest.strip(_WS):
            raise _BadValue(
                command,
                f"unbalanced quotes: unexpected text after the closing double quote: {rest.strip(_WS)!r} "
                '(to put a double quote inside the quoted value, repeat it: "")',
            )
        return "".join(out)


_ARG_SPLIT_RE = re.compile(r"[ \t\n\r]+")
_V1_TRICKY_RE = re.compile(r"[\"\\']")


def _parse_arguments(value: str) -> str:
    if not _V1_TRICKY_RE.search(value):
        # Old syntax without quotes or backslashes (the common case, and the per-proc one in
        # big clusters): the V2 string is the words joined by single spaces.
        return " ".join(a for a in _ARG_SPLIT_RE.split(value) if a)
    if value.lstrip(_WS).startswith('"'):
        raw = _v2_quoted_to_raw("arguments", value)
        try:
            argv = split_arguments(raw)
        except ValueError as e:
            raise _BadValue("arguments", f"unbalanced quotes: {e}") from None
    else:
        # Old (V1) syntax: white space separates, a double quote must be written \" .
        for m in re.finditer('"', value):
            j = m.start()
            if j == 0 or value[j - 1] != "\\":
                raise _BadValue(
                    "arguments",
                    f"unbalanced quotes: unescaped double quote at column {j + 1} of {value!r} "
                    '(old syntax: write \\" ; new syntax: put the whole value in double quotes)',
                )
        argv = [a for a in _ARG_SPLIT_RE.split(value.replace('\\"', '"')) if a]
    return join_arguments(argv)


def _parse_environment_value(value: str) -> str:
    env: dict[str, str] = {}
    if value.lstrip(_WS).startswith('"'):
        raw = _v2_quoted_to_raw("environment", value)
        try:
            entries = split_arguments(raw)
        except ValueError as e:
            raise _BadValue("environment", f"unbalanced quotes: {e}") from None
    else:
        # Old (V1, Unix) syntax: entries separated by ';' (or a newline), leading white
        # space of each entry dropped, quotes have no meaning (HTCondor's MergeFromV1Raw).
        entries = [e.lstrip(" \t\n\r") for e in re.split(r"[;\n]", value)]
        entries = [e for e in entries if e]
    for entry in entries:
        name, equals, val = entry.partition("=")
        if not equals:
            raise _BadValue("environment", f"missing '=' in environment entry {entry!r} (expected NAME=value)")
        if not name:
            raise _BadValue("environment", f"missing variable name before '=' in environment entry {entry!r}")
        env[name] = val
    return format_environment(env)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

#: The submit commands gwms implements (lower case, as compared).
SUPPORTED_COMMANDS: Final = frozenset(
    {
        "executable",
        "arguments",
        "environment",
        "input",
        "output",
        "error",
        "log",
        "initialdir",
        "transfer_input_files",
        "transfer_output_files",
        "should_transfer_files",
        "when_to_transfer_output",
        "request_cpus",
        "request_memory",
        "request_disk",
        "requirements",
        "rank",
        "periodic_hold",
        "periodic_hold_reason",
        "periodic_hold_subcode",
        "periodic_release",
        "periodic_remove",
        "universe",
        "x509userproxy",
        "delegate_job_gsi_credentials_lifetime",
        "delegate_limited_proxy",
        "getenv",
        "transfer_executable",
        "notification",
        "job_lease_duration",
    }
)

# HTCondor commands people will paste that gwms does not implement.  Refused by name, so the
# message says "not supported" rather than "unknown" (and never "did you mean").
_UNSUPPORTED_COMMANDS: Final = frozenset(
    {
        "accounting_group",
        "accounting_group_user",
        "allowed_execute_duration",
        "allowed_job_duration",
        "batch_name",
        "concurrency_limits",
        "container_image",
        "coresize",
        "cron_day_of_month",
        "cron_day_of_week",
        "cron_hour",
        "cron_minute",
        "cron_month",
        "cuda_version",
        "deferral_time",
        "docker_image",
        "dont_encrypt_input_files",
        "dont_encrypt_output_files",
        "encrypt_execute_directory",
        "encrypt_input_files",
        "encrypt_output_files",
        "erase_output_and_error_on_restart",
        "gpus_minimum_capability",
        "gpus_minimum_memory",
        "gpus_minimum_runtime",
        "hold",
        "hold_kill_sig",
        "image_size",
        "job_max_vacate_time",
        "keep_claim_idle",
        "kill_sig",
        "leave_in_queue",
        "log_xml",
        "machine_count",
        "max_idle",
        "max_materialize",
        "max_retries",
        "max_transfer_input_mb",
        "max_transfer_output_mb",
        "next_job_start_delay",
        "nice_user",
        "notify_user",
        "on_exit_hold",
        "on_exit_hold_reason",
        "on_exit_hold_subcode",
        "on_exit_remove",
        "output_destination",
        "periodic_vacate",
        "priority",
        "rank_expr",
        "remove_kill_sig",
        "retry_until",
        "run_as_owner",
        "skip_filechecks",
        "stream_error",
        "stream_input",
        "stream_output",
        "submit_event_notes",
        "success_exit_code",
        "transfer_input",
        "transfer_output",
        "transfer_error",
        "transfer_output_remaps",
        "transfer_plugins",
        "use_oauth_services",
        "use_x509userproxy",
        "want_graceful_removal",
    }
)

# Statements of condor_submit's language (besides queue) that gwms does not implement.
_STATEMENTS: Final = frozenset({"if", "elif", "else", "endif", "include", "use", "error", "warning"})

# Set by condor_submit itself; a file may read but not assign them.
_RESERVED: Final = frozenset({"cluster", "clusterid", "process", "procid", "item", "itemindex", "row", "step", "dollar", "submit_file"})

# HTCondor's $FUNC() macro functions: refused (see the module docstring).
_MACRO_FUNCTIONS: Final = frozenset(
    {"ENV", "RANDOM_CHOICE", "RANDOM_INTEGER", "INT", "REAL", "CHOICE", "SUBSTR", "BASENAME", "DIRNAME", "EVAL"}
)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ATTR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Attributes this module computes, so that +Attr cannot quietly override them (which command
# sets them, for the message).
_OWN_ATTRIBUTES: Final = {
    "clusterid": None,
    "procid": None,
    "owner": None,
    "mytype": None,
    "targettype": None,
    "jobstatus": None,
    "numjobstarts": None,
    "jobruncount": None,
    "qdate": None,
    "enteredcurrentstatus": None,
    "cmd": "executable",
    "arguments": "arguments",
    "environment": "environment",
    "iwd": "initialdir",
    "in": "input",
    "out": "output",
    "err": "error",
    "userlog": "log",
    "transferinput": "transfer_input_files",
    "transferoutput": "transfer_output_files",
    "shouldtransferfiles": "should_transfer_files",
    "whentotransferoutput": "when_to_transfer_output",
    "requestcpus": "request_cpus",
    "requestmemory": "request_memory",
    "requestdisk": "request_disk",
    "requirements": "requirements",
    "rank": "rank",
    "periodichold": "periodic_hold",
    "periodicholdreason": "periodic_hold_reason",
    "periodicholdsubcode": "periodic_hold_subcode",
    "periodicrelease": "periodic_release",
    "periodicremove": "periodic_remove",
    "jobuniverse": "universe",
    "x509userproxy": "x509userproxy",
    # Read from the proxy file by the schedd, never taken from the submitter: an identity
    # switch may map the job to an account by this DN.
    "x509userproxysubject": None,
    "x509userproxyexpiration": None,
    "delegatejobgsicredentialslifetime": "delegate_job_gsi_credentials_lifetime",
    "delegatelimitedproxy": "delegate_limited_proxy",
    "getenv": "getenv",
    "transferexecutable": "transfer_executable",
    "jobnotification": "notification",
    "jobleaseduration": "job_lease_duration",
}

# Defaults (HTCondor's, see each use).
DEFAULT_REQUEST_MEMORY: Final = 128  # MiB: JOB_DEFAULT_REQUESTMEMORY
# KiB.  HTCondor's JOB_DEFAULT_REQUESTDISK is MAX({1024, (TransferInputSizeMB+1) * 1.25}) * 1024:
# at least 1 GiB, more for big inputs.  We do not stat the user's files here, so we take its floor.
DEFAULT_REQUEST_DISK: Final = 1024 * 1024
DEFAULT_JOB_LEASE_DURATION: Final = 2400  # JOB_DEFAULT_LEASE_DURATION
VANILLA_UNIVERSE: Final = 5
_NOTIFICATION: Final = {"never": 0, "always": 1, "complete": 2, "error": 3}
_BOOLEANS: Final = {"true": True, "t": True, "yes": True, "1": True, "false": False, "f": False, "no": False, "0": False}

# Limits against hostile files.
_MAX_MACRO_DEPTH: Final = 64  # nested $(a) -> $(b) -> ... lookups
_MAX_VALUE: Final = 16 * 1024 * 1024  # characters in one expanded value
_MAX_PER_PROC_TEXT: Final = 256 * 1024 * 1024  # characters of per-proc values in one cluster


def _expr(command: str, text: str, cache: dict[str, classads.ExprTree]) -> classads.ExprTree:
    tree = cache.get(text)
    if tree is None:
        try:
            tree = classads.parse_expr(text)
            if "\\" in text:
                # An escape such as "\377" can make a string that is not UTF-8, which the
                # schedd could store but nobody could read back: refuse it here.
                holder = classads.ClassAd()
                holder["v"] = tree
                classads.decode(classads.encode(holder))
        except classads.ClassAdError as e:
            raise _BadValue(command, f"bad {command} expression: {e}") from None
        cache[text] = tree
    return tree


_QUANTITY_RE = re.compile(r"[ \t\n\r\v\f]*([0-9]+)(?:\.([0-9]*))?[ \t\n\r\v\f]*(?:([KkMmGgTt])[Bb]?)?[ \t\n\r\v\f]*")
_UNITS: Final = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_INT_MAX: Final = (1 << 63) - 1


def _whole(digits: str) -> int:
    """int() of a signed run of ASCII digits, saturated far beyond any limit that matters here
    (Python refuses to convert more than 4300 digits, and nobody needs 20)."""
    sign = -1 if digits.startswith("-") else 1
    digits = digits.lstrip("+-").lstrip("0") or "0"
    if len(digits) > 30:
        return sign * 10**30
    return sign * int(digits)


def _quantity(command: str, value: str, base: int, cache: dict[str, classads.ExprTree]) -> int | classads.ExprTree:
    """HTCondor's parse_int64_bytes: a number (fraction allowed, 3 digits count) with an
    optional K/M/G/T unit (KB, Mb... too), rounded up to units of ``base`` bytes; no unit means
    ``base``.  Anything that does not start like a number is a ClassAd expression, as in
    condor_submit (``request_memory = ifThenElse(...)``)."""
    m = _QUANTITY_RE.fullmatch(value)
    if m:
        whole, fraction, unit = m.groups()
        mult = _UNITS[unit.lower()] if unit else base
        milli = _whole(whole) * 1000 + int((fraction or "")[:3].ljust(3, "0"))
        result = -(-milli * mult // (1000 * base))  # ceiling
        if result > _INT_MAX:
            raise _BadValue(command, f"bad number for {command}: {value!r} is too large")
        return result
    if value.lstrip(_WS)[:1] in tuple("0123456789+-."):
        raise _BadValue(command, f"bad number for {command}: {value!r} (expected a number with an optional unit K, M, G or T, e.g. 2GB)")
    try:
        return _expr(command, value, cache)
    except _BadValue as e:
        raise _BadValue(command, f"bad number for {command}: {value!r} is neither a number nor a ClassAd expression ({e.reason})") from None


def _count(command: str, value: str, cache: dict[str, classads.ExprTree]) -> int | classads.ExprTree:
    """request_cpus: a whole number (no units), or a ClassAd expression as in condor_submit."""
    if re.fullmatch(r"[ \t\n\r\v\f]*[+-]?[0-9]+[ \t\n\r\v\f]*", value):
        return _int_value(command, value)
    if value.lstrip(_WS)[:1] in tuple("0123456789+-."):
        raise _BadValue(command, f"bad number for {command}: {value!r} (expected a whole number)")
    try:
        return _expr(command, value, cache)
    except _BadValue as e:
        raise _BadValue(command, f"bad number for {command}: {value!r} is neither a number nor a ClassAd expression ({e.reason})") from None


def _int_value(command: str, value: str, minimum: int = 0) -> int:
    text = value.strip(_WS)
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise _BadValue(command, f"bad number for {command}: {value!r} (expected an integer)")
    number = _whole(text)
    if number < minimum or number > _INT_MAX:
        raise _BadValue(command, f"bad number for {command}: {number} is out of range")
    return number


def _choice(command: str, value: str, choices: Iterable[str]) -> str:
    upper = value.upper()
    allowed = list(choices)
    if upper not in allowed:
        raise _BadValue(command, f"bad value for {command}: {value!r} (expected one of {', '.join(allowed)})")
    return upper


def _boolean(command: str, value: str) -> bool:
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise _BadValue(command, f"bad value for {command}: {value!r} (expected true or false)") from None


def _file_list(value: str) -> str:
    # HTCondor's file transfer splits these lists on commas; white space around names goes.
    return ",".join(name for name in (part.strip(_WS) for part in value.split(",")) if name)


def _mentions_opsys(expr: classads.ExprTree) -> bool:
    # As condor_submit does: look at the attributes the parsed expression refers to (any
    # OpSys* name: OpSys, OpSysAndVer, OpSysMajorVer, ...), not at the text.
    try:
        refs = classads.ClassAd().externalRefs(expr)
    except (ValueError, SystemError, RuntimeError):  # e.g. a name that is not UTF-8
        return "opsys" in repr(expr).lower()
    return any(ref.rsplit(".", 1)[-1].lower().startswith("opsys") for ref in refs)


class _Context:
    """What the attribute builders need besides command values."""

    __slots__ = ("exprs", "submit_dir")

    def __init__(self, submit_dir: str) -> None:
        self.submit_dir = submit_dir
        self.exprs: dict[str, classads.ExprTree] = {}  # parsed expressions by text


def _abs(base: str, path: str) -> str:
    # os.path.join, not normpath/resolve: "a/../b" means something else under symlinks, and
    # condor_submit does the same.
    return os.path.join(base, path)


def _iwd(ctx: _Context, initialdir: str | None) -> str:
    return ctx.submit_dir if initialdir is None else _abs(ctx.submit_dir, initialdir)


# Each builder takes the (expanded, stripped, "" -> None) values of its commands and returns
# attributes.  A builder runs once per queue statement when its values are the same for every
# proc, else once per proc.


def _b_executable(ctx: _Context, exe: str | None) -> dict[str, object]:
    if exe is None:
        raise _BadValue("executable", "no executable given (or it is empty): add 'executable = <program>'")
    # condor_submit resolves the executable against the submit directory, not initialdir.
    return {"Cmd": _abs(ctx.submit_dir, exe)}


def _b_initialdir(ctx: _Context, initialdir: str | None) -> dict[str, object]:
    return {"Iwd": _iwd(ctx, initialdir)}


def _b_log(ctx: _Context, log: str | None, initialdir: str | None) -> dict[str, object]:
    return {} if log is None else {"UserLog": _abs(_iwd(ctx, initialdir), log)}


def _b_proxy(ctx: _Context, proxy: str | None, initialdir: str | None) -> dict[str, object]:
    return {} if proxy is None else {"x509userproxy": _abs(_iwd(ctx, initialdir), proxy)}


# The proxy the shadow delegates to the job (GSI delegation: the starter makes the key pair, the
# shadow signs a new proxy with the user's):
#   delegate_job_GSI_credentials_lifetime = SECONDS   HTCondor's: the delegated proxy's lifetime,
#       at most the user's proxy's; 0 = the user's proxy's whole remaining lifetime. Without it,
#       24 hours (HTCondor's DELEGATE_JOB_GSI_CREDENTIALS_LIFETIME default), not recorded.
#   delegate_limited_proxy = true                     gwms's own (the seed notes Condor could not
#       do this): the delegated proxy is a Globus limited proxy, which can authenticate but not
#       start jobs. (A limited user proxy always yields a limited delegated one.)
def _b_delegation_lifetime(ctx: _Context, value: str | None) -> dict[str, object]:
    if value is None:
        return {}
    return {"DelegateJobGSICredentialsLifetime": _int_value("delegate_job_GSI_credentials_lifetime", value)}


def _b_transfer(ctx: _Context, should: str | None, when: str | None) -> dict[str, object]:
    # HTCondor's current defaults: IF_NEEDED, ON_EXIT.
    stf = "IF_NEEDED" if should is None else _choice("should_transfer_files", should, ("YES", "NO", "IF_NEEDED"))
    if stf == "NO":
        if when is not None:
            raise _BadValue("when_to_transfer_output", "when_to_transfer_output makes no sense with should_transfer_files = NO")
        return {"ShouldTransferFiles": stf}
    wtto = "ON_EXIT" if when is None else _choice("when_to_transfer_output", when, ("ON_EXIT", "ON_EXIT_OR_EVICT"))
    return {"ShouldTransferFiles": stf, "WhenToTransferOutput": wtto}


def _b_requirements(ctx: _Context, requirements: str | None) -> dict[str, object]:
    clauses = []
    mentions_opsys = False
    if requirements is not None:
        user = _expr("requirements", requirements, ctx.exprs)
        mentions_opsys = _mentions_opsys(user)
        clauses.append(f"({user!r})")  # classad2's own printing: canonical, no // comment left
    clauses += ["(TARGET.Cpus >= RequestCpus)", "(TARGET.Memory >= RequestMemory)", "(TARGET.Disk >= RequestDisk)"]
    if not mentions_opsys:
        clauses.append('(TARGET.OpSys == "LINUX")')
    return {"Requirements": _expr("requirements", " && ".join(clauses), ctx.exprs)}


def _b_universe(ctx: _Context, universe: str | None) -> dict[str, object]:
    if universe is not None and universe.lower() != "vanilla":
        raise _BadValue("universe", f"universe {universe!r} is not supported: only the vanilla universe is supported")
    return {"JobUniverse": VANILLA_UNIVERSE}


def _simple(attr: str, command: str, convert: Callable[[_Context, str], object], default: object = None) -> Callable[..., dict[str, object]]:
    def build(ctx: _Context, value: str | None) -> dict[str, object]:
        if value is None:
            return {} if default is None else {attr: default}
        return {attr: convert(ctx, value)}

    build.__name__ = f"_b_{command}"
    return build


def _expression(command: str) -> Callable[[_Context, str], object]:
    return lambda ctx, value: _expr(command, value, ctx.exprs)


_Builder = Callable[..., dict[str, object]]

_BUILDERS: Final[list[tuple[tuple[str, ...], _Builder]]] = [
    (("executable",), _b_executable),
    (("arguments",), _simple("Arguments", "arguments", lambda ctx, v: _parse_arguments(v), "")),
    (("environment",), _simple("Environment", "environment", lambda ctx, v: _parse_environment_value(v), "")),
    (("input",), _simple("In", "input", lambda ctx, v: v, "/dev/null")),
    (("output",), _simple("Out", "output", lambda ctx, v: v, "/dev/null")),
    (("error",), _simple("Err", "error", lambda ctx, v: v, "/dev/null")),
    (("initialdir",), _b_initialdir),
    (("log", "initialdir"), _b_log),
    (("x509userproxy", "initialdir"), _b_proxy),
    (("delegate_job_gsi_credentials_lifetime",), _b_delegation_lifetime),
    (("delegate_limited_proxy",), _simple("DelegateLimitedProxy", "delegate_limited_proxy",
                                          lambda ctx, v: _boolean("delegate_limited_proxy", v))),
    (("transfer_input_files",), _simple("TransferInput", "transfer_input_files", lambda ctx, v: _file_list(v))),
    (("transfer_output_files",), _simple("TransferOutput", "transfer_output_files", lambda ctx, v: _file_list(v))),
    (("should_transfer_files", "when_to_transfer_output"), _b_transfer),
    (("request_cpus",), _simple("RequestCpus", "request_cpus", lambda ctx, v: _count("request_cpus", v, ctx.exprs), 1)),
    (("request_memory",), _simple("RequestMemory", "request_memory", lambda ctx, v: _quantity("request_memory", v, 1 << 20, ctx.exprs), DEFAULT_REQUEST_MEMORY)),
    (("request_disk",), _simple("RequestDisk", "request_disk", lambda ctx, v: _quantity("request_disk", v, 1 << 10, ctx.exprs), DEFAULT_REQUEST_DISK)),
    (("requirements",), _b_requirements),
    (("rank",), _simple("Rank", "rank", _expression("rank"), 0.0)),
    (("periodic_hold",), _simple("PeriodicHold", "periodic_hold", _expression("periodic_hold"), False)),
    (("periodic_hold_reason",), _simple("PeriodicHoldReason", "periodic_hold_reason", _expression("periodic_hold_reason"))),
    (("periodic_hold_subcode",), _simple("PeriodicHoldSubCode", "periodic_hold_subcode", _expression("periodic_hold_subcode"))),
    (("periodic_release",), _simple("PeriodicRelease", "periodic_release", _expression("periodic_release"), False)),
    (("periodic_remove",), _simple("PeriodicRemove", "periodic_remove", _expression("periodic_remove"), False)),
    (("universe",), _b_universe),
    (("getenv",), _simple("GetEnv", "getenv", lambda ctx, v: _boolean("getenv", v), False)),
    (("transfer_executable",), _simple("TransferExecutable", "transfer_executable",
                                       lambda ctx, v: _boolean("transfer_executable", v))),
    (("notification",), _simple("JobNotification", "notification", lambda ctx, v: _NOTIFICATION[_choice("notification", v, ("NEVER", "ALWAYS", "COMPLETE", "ERROR")).lower()], 0)),
    (("job_lease_duration",), _simple("JobLeaseDuration", "job_lease_duration", lambda ctx, v: _int_value("job_lease_duration", v), DEFAULT_JOB_LEASE_DURATION)),
]


def _custom_builder(key: str, attr: str) -> _Builder:
    def build(ctx: _Context, value: str | None) -> dict[str, object]:
        if value is None:
            return {}
        return {attr: _expr(f"+{attr}", value, ctx.exprs)}

    return build


# ---------------------------------------------------------------------------------------------
# Macros
# ---------------------------------------------------------------------------------------------

_MACRO_RE = re.compile(r"\$\([ \t]*([A-Za-z_][A-Za-z0-9_.]*)[ \t]*(?::([^)]*))?\)")
_FUNC_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)\(")
# $(name) uses anywhere in a file (not $$(name): that is the match-time kind).
_USE_RE = re.compile(r"(?<!\$)\$\([ \t]*([A-Za-z_][A-Za-z0-9_.]*)[ \t]*[:)]")


class _MacroError(Exception):
    pass


def _skip_match_time(text: str, i: int) -> int:
    """End of the ``$$(...)`` starting at ``i`` (parentheses nest, as in ``$$([a(b)])``)."""
    depth = 0
    for j in range(i + 2, len(text)):
        c = text[j]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)  # unclosed: the rest is left as it is


class _Ref:
    """A per-proc macro (``$(Process)``, a queue variable, ...) left in a :data:`_Template`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


# An expanded value: a str when it is the same for every proc of a queue statement, else a
# tuple of literal pieces and _Refs that is filled in for each proc.
_Template = str | tuple[str | _Ref, ...]


class _Compiled:
    """A template ready to fill in quickly: ``fmt.format(*values of names)``."""

    __slots__ = ("fmt", "names", "static_len")

    def __init__(self, template: tuple[str | _Ref, ...]) -> None:
        pieces = []
        names = []
        static_len = 0
        for part in template:
            if isinstance(part, _Ref):
                pieces.append(f"{{{len(names)}}}")
                names.append(part.name)
            else:
                pieces.append(part.replace("{", "{{").replace("}", "}}"))
                static_len += len(part)
        self.fmt = "".join(pieces)
        self.names = tuple(names)
        self.static_len = static_len

    def render(self, proc: Mapping[str, str]) -> str:
        values = [proc[name] for name in self.names]
        if len(values) > 1 and self.static_len + sum(map(len, values)) > _MAX_VALUE:
            raise _MacroError(f"a value expands to more than {_MAX_VALUE} characters")
        return self.fmt.format(*values)


class _Expander:
    """$(name) expansion for the procs of one queue statement.

    Values are expanded when used, at queue time, as condor_submit does, so a command may
    refer to a macro defined after it.  Expansion is done once per statement: what depends on
    the proc (``$(Process)``, ``$(Item)``, queue variables: the ``dynamic`` names) is left in
    the result as a _Ref, so that each proc costs one ``str.format`` and not a re-expansion.
    Values of queue variables are data, inserted as they are (condor_submit would expand
    ``$(...)`` inside them again).
    """

    def __init__(self, defs: Mapping[str, str], fixed: Mapping[str, str], dynamic: frozenset[str]) -> None:
        self.defs = defs
        self.fixed = fixed
        self.dynamic = dynamic
        self.memo: dict[str, _Template] = {}

    def value(self, name: str) -> _Template:
        """The expanded value of macro or command ``name`` ("" if undefined)."""
        return self._lookup(name, None, [])

    def expand(self, text: str) -> _Template:
        return self._expand(text, [])

    def _expand(self, text: str, stack: list[str]) -> _Template:
        if "$" not in text:
            return text
        out: list[str | _Ref] = []
        dynamic = False
        pos = 0
        size = 0
        while True:
            i = text.find("$", pos)
            if i < 0:
                out.append(text[pos:])
                break
            out.append(text[pos:i])
            if text.startswith("$$(", i):  # match-time substitution: for the negotiator, left alone
                j = _skip_match_time(text, i)
                out.append(text[i:j])
                pos = j
                continue
            m = _MACRO_RE.match(text, i)
            if m:
                value = self._lookup(m.group(1).lower(), m.group(2), stack)
                if isinstance(value, str):
                    out.append(value)
                    size += len(value)
                else:
                    out.extend(value)
                    dynamic = True
                    size += sum(len(part) for part in value if isinstance(part, str))
                if size > _MAX_VALUE:
                    raise _MacroError(f"a value expands to more than {_MAX_VALUE} characters")
                pos = m.end()
                continue
            f = _FUNC_RE.match(text, i)
            if f and (f.group(1).upper() in _MACRO_FUNCTIONS or re.fullmatch(r"F[FPNXDQABW]+", f.group(1).upper())):
                raise _MacroError(f"the macro function ${f.group(1)}() is not supported by gwms")
            out.append("$")
            pos = i + 1
        if not dynamic:
            return "".join(out)  # type: ignore[arg-type]
        merged: list[str | _Ref] = []
        for part in out:
            if isinstance(part, str):
                if not part:
                    continue
                if merged and isinstance(merged[-1], str):
                    merged[-1] = merged[-1] + part  # type: ignore[operator]
                    continue
            merged.append(part)
        return tuple(merged)

    def _lookup(self, name: str, default: str | None, stack: list[str]) -> _Template:
        if name in self.dynamic:
            return (_Ref(name),)
        fixed = self.fixed.get(name)
        if fixed is not None:
            return fixed
        raw = self.defs.get(name)
        if raw is None:
            if default is None:
                return ""  # undefined macros expand to nothing, as in condor_submit
            return self._expand(default, stack)
        hit = self.memo.get(name)
        if hit is not None:
            return hit
        if name in stack:
            cycle = " -> ".join([*stack[stack.index(name) :], name])
            raise _MacroError(f"macro $({name}) refers to itself: {cycle}")
        if len(stack) >= _MAX_MACRO_DEPTH:
            raise _MacroError(f"macros nest deeper than {_MAX_MACRO_DEPTH} levels: {' -> '.join(stack[:5])} -> ...")
        stack.append(name)
        result = self._expand(raw, stack)
        stack.pop()
        self.memo[name] = result
        return result


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------


def _check_text(text: str, fail: Callable[[int | None, str], SubmitError], what: str) -> None:
    if "\x00" in text:
        offset = text.index("\x00")
        raise fail(text.count("\n", 0, offset) + 1, f"NUL character in {what}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: classad2 crashes on them
            raise fail(text.count("\n", 0, e.start) + 1, f"{what} is not valid Unicode text ({e.reason})") from None


@dataclass
class _Statement:
    """The procs of one queue statement, before they are split into cluster and proc ads."""

    first_proc: int
    count: int
    static: dict[str, object]
    rows: list[dict[str, object]] | None  # per-proc attributes, when some vary


# White space is C isspace() throughout, as in condor_submit (\s would also match Unicode spaces).
_SLICE_RE = re.compile(r"\[[ \t]*([+-]?[0-9]*)[ \t]*(?::[ \t]*([+-]?[0-9]*)[ \t]*(?::[ \t]*([+-]?[0-9]*)[ \t]*)?)?\]")
_ITEM_SPLIT_RE = re.compile(r"[, \t\n\r\v\f]+")
_ROW_SPLIT_RE = re.compile(r"[ \t\n\r\v\f]*,[ \t\n\r\v\f]*|[ \t\n\r\v\f]+")
_QUEUE_USAGE: Final = "expected 'queue [N]' or 'queue [N] [VAR[, VAR...]] in|from (items)' or 'queue [N] [VARS] from FILE'"


def _present(value: str) -> str | None:
    # An empty value is the same as no value at all, as in condor_submit.
    return value.strip(_WS) or None


def _value_key(value: object) -> tuple[str, object]:
    # Equality of attribute values, for finding what all procs share.  Expressions compare by
    # classad2's canonical text; the type name keeps True apart from 1.
    kind = type(value)
    if kind is str or kind is int or kind is bool or kind is float:
        return (kind.__name__, value)
    return ("expr", repr(value))


class _Parser:
    def __init__(
        self,
        text: str,
        filename: str,
        cluster_id: int,
        owner: str,
        iwd: Path,
        read_file: Callable[[Path], str],
        max_procs: int,
    ) -> None:
        self.text = text
        self.filename = filename
        self.cluster_id = cluster_id
        self.owner = owner
        self.iwd = str(iwd)
        self.read_file = read_file
        self.max_procs = max_procs
        self.defs: dict[str, str] = {}  # lower-case name -> raw (unexpanded) value
        self.def_lines: dict[str, int] = {}
        self.custom: dict[str, str] = {}  # "+name" key -> attribute name as last spelt
        self.statements: list[_Statement] = []
        self.total = 0
        self.saw_queue = False
        self.defs_version = 0
        self.last_key: object = None
        self.last_analysis: tuple[dict[str, object], list[tuple[tuple[str, ...], _Builder, list[object], bool]]] = ({}, [])
        self.per_proc_text = 0
        self.ctx = _Context(self.iwd)
        self.used = {m.group(1).lower() for m in _USE_RE.finditer(text)}

    def error(self, line: int | None, reason: str) -> SubmitError:
        return SubmitError(self.filename, line, reason)

    # --- lines ---------------------------------------------------------------------------

    def parse(self) -> None:
        lines = self.text.split("\n")
        n = len(lines)
        i = 0
        while i < n:
            number = i + 1
            line = lines[i].rstrip("\r")
            i += 1
            stripped = line.strip(_WS)
            if not stripped or stripped.startswith("#"):
                continue  # comment lines are not continued
            # A trailing backslash continues the line; the next line's leading white space goes,
            # and comment lines inside the continuation are skipped.
            while line.endswith("\\") and i < n:
                following = lines[i].rstrip("\r")
                i += 1
                if following.lstrip(_WS).startswith("#"):
                    continue
                line = line[:-1] + following.lstrip(_WS)
            line = line.removesuffix("\\")
            stripped = line.strip(_WS)
            if not stripped:
                continue
            if re.match(r"(?i)queue(?=[ \t\n\r\v\f]|$)", stripped):
                i = self.queue(stripped, number, lines, i)
            else:
                self.assignment(stripped, number)
        if not self.saw_queue:
            raise self.error(None, "no queue statement: add 'queue' after the commands to submit one job")
        if self.total == 0:
            raise self.error(None, "the queue statements queue no jobs (every one asks for 0 procs or has no items)")

    def assignment(self, line: str, number: int) -> None:
        first = re.split(r"[ \t\n\r\v\f=(]", line, maxsplit=1)[0].lower()
        name, equals, value = line.partition("=")
        name = name.strip(_WS)
        value = value.strip(_WS)
        if first in _STATEMENTS and (not equals or name.lower() != first):
            raise self.error(number, f"the {first!r} statement of condor_submit is not supported by gwms")
        if not equals:
            raise self.error(number, f'missing "=": expected "command = value", got {line[:80]!r}')
        if name.endswith("@"):
            raise self.error(number, "multi-line values (name @=end ... @end) are not supported by gwms")
        if not name:
            raise self.error(number, f"missing command name before '=': {line[:80]!r}")
        if name.startswith("+") or name.lower().startswith("my."):
            self.custom_attribute(name, value, number)
            return
        if name.lower() == "queue":
            raise self.error(number, "queue is a statement, not a command: write 'queue' or 'queue N' without '='")
        if not _NAME_RE.fullmatch(name):
            raise self.error(number, f"invalid command name {name[:80]!r} (names are letters, digits, '_' and '.')")
        key = name.lower()
        if key in _RESERVED:
            raise self.error(number, f"$({name}) is set by the queue statement and cannot be assigned")
        if key in _UNSUPPORTED_COMMANDS or (key.startswith("request_") and key not in SUPPORTED_COMMANDS):
            raise self.error(number, f'command "{name}" is not supported by gwms')
        if key not in SUPPORTED_COMMANDS and key not in self.used:
            # condor_submit would take this for a macro nobody uses; almost always a typo.
            close = difflib.get_close_matches(key, sorted(SUPPORTED_COMMANDS), n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise self.error(
                number,
                f'unknown command "{name}"{hint}; to define a macro, use it somewhere as $({name})',
            )
        self.define(key, value, number)

    def custom_attribute(self, name: str, value: str, number: int) -> None:
        attr = (name[1:] if name.startswith("+") else name[3:]).strip(_WS)
        if not _ATTR_RE.fullmatch(attr):
            raise self.error(number, f"invalid attribute name {attr[:80]!r} in {name[:80]!r}")
        owner_command = _OWN_ATTRIBUTES.get(attr.lower(), "")
        if owner_command != "":
            how = f"use the {owner_command} command" if owner_command else "it is set by gwms"
            raise self.error(number, f"attribute {attr} cannot be set with {name}: {how}")
        if not value:
            raise self.error(number, f"missing value for {name} (a ClassAd expression)")
        key = "+" + attr.lower()
        self.custom[key] = attr
        self.define(key, value, number)

    def define(self, key: str, value: str, number: int) -> None:
        if "$" in value and key in value.lower():
            # name = $(name) more: the reference is to the previous value (condor's rule), so
            # substitute it now; otherwise it would be an endless self-reference.
            previous = self.defs.get(key, "")
            pattern = re.compile(r"\$\([ \t]*" + re.escape(key) + r"[ \t]*(?::([^)]*))?\)", re.IGNORECASE)
            value = pattern.sub(lambda m: previous if key in self.defs else (m.group(1) or ""), value)
            if len(value) > _MAX_VALUE:
                raise self.error(number, f"$({key}) grows to more than {_MAX_VALUE} characters by referring to itself")
        self.defs[key] = value
        self.def_lines[key] = number
        self.defs_version += 1

    # --- queue ---------------------------------------------------------------------------

    def queue(self, line: str, number: int, lines: list[str], i: int) -> int:
        """Queue the procs of one statement; returns the index of the next line to read."""
        self.saw_queue = True
        fixed = self.fixed_macros()
        expander = _Expander(self.defs, fixed, frozenset())
        try:
            rest = expander.expand(line[5:].strip(_WS))
        except _MacroError as e:
            raise self.error(number, str(e)) from None
        assert isinstance(rest, str)  # no per-proc names in this expander
        rest = rest.strip(_WS)

        count = 1
        m = re.match(r"([^ \t\n\r\v\f]+)[ \t\n\r\v\f]*", rest)
        if m and re.fullmatch(r"[+-]?[0-9]+", m.group(1)):
            count = _whole(m.group(1))
            rest = rest[m.end() :]
            if count < 0:
                raise self.error(number, f"bad queue statement: the count {count} is negative")
        elif m and m.group(1)[0] in "0123456789+-":
            raise self.error(number, f"bad queue statement: {m.group(1)!r} is not a number of jobs; {_QUEUE_USAGE}")

        names: list[str] = []
        items: list[list[str]] | None = None  # one value per name, per item
        indexes: list[int] = []
        if rest:
            kw = re.match(r"(?is)(.*?)(?<![A-Za-z0-9_.])(in|from|matching)(?![A-Za-z0-9_.])[ \t\n\r\v\f]*(.*)$", rest)
            if not kw:
                raise self.error(number, f"bad queue statement: {_QUEUE_USAGE}")
            var_text, keyword, tail = kw.group(1).strip(_WS), kw.group(2).lower(), kw.group(3)
            names = self.queue_variables(var_text, number)
            if keyword == "matching":
                raise self.error(number, "'queue ... matching' (file globbing) is not supported by gwms; list the files with 'in' or 'from'")
            slice_ = None
            if tail.startswith("["):
                sm = _SLICE_RE.match(tail)
                if not sm:
                    raise self.error(number, f"bad queue statement: bad slice {tail[:tail.find(']') + 1 or 40]!r} (expected [start:stop:step] with whole numbers)")
                slice_ = self.slice(sm, number)
                tail = tail[sm.end() :].strip(_WS)
            if keyword == "in":
                if len(names) > 1:
                    raise self.error(number, "'queue ... in' sets one variable; use 'from' to set several")
                values, i = self.in_list(tail, number, lines, i)
                rows = [[v] for v in values]
            else:
                raw_rows, i = self.from_rows(tail, number, lines, i)
                rows = [self.split_row(row, len(names)) for row in raw_rows]
            indexes = list(range(len(rows)))
            if slice_ is not None:
                indexes = indexes[slice_]
            items = [rows[k] for k in indexes]
        else:
            indexes = [0]

        n_items = 1 if items is None else len(items)
        procs = count * n_items
        if self.total + procs > self.max_procs:
            raise self.error(
                number, f"too many jobs: this queue statement would bring the cluster to {self.total + procs} procs, over the limit of {self.max_procs}"
            )
        self.run_statement(number, count, names, items, indexes, fixed)
        return i

    def queue_variables(self, text: str, number: int) -> list[str]:
        if not text:
            return ["item"]
        names = [n for n in _ITEM_SPLIT_RE.split(text) if n]
        seen: set[str] = set()
        result = []
        for name in names:
            key = name.lower()
            if not _NAME_RE.fullmatch(name):
                raise self.error(number, f"bad queue statement: {name[:40]!r} is not a variable name; {_QUEUE_USAGE}")
            if key in _RESERVED and key != "item":
                raise self.error(number, f"bad queue statement: $({name}) is set by condor_submit and cannot be a queue variable")
            if key in _UNSUPPORTED_COMMANDS:
                raise self.error(number, f'bad queue statement: command "{name}" is not supported by gwms')
            if key.startswith(("+", "my.")):
                raise self.error(number, f"bad queue statement: {name!r} cannot be a queue variable")
            if key in seen:
                raise self.error(number, f"bad queue statement: variable {name} is listed twice")
            seen.add(key)
            result.append(key)
        return result

    def slice(self, m: re.Match[str], number: int) -> slice:
        start, stop, step = (_whole(g) if g not in (None, "") else None for g in m.groups())
        if step == 0 or (step is not None and step < 0):
            raise self.error(number, "bad queue statement: the slice step must be positive")
        return slice(start, stop, step)

    def list_lines(self, number: int, lines: list[str], i: int, what: str) -> tuple[list[str], int]:
        """Lines after a queue statement's '(' up to the line that starts with ')'."""
        body = []
        while i < len(lines):
            line = lines[i].rstrip("\r")
            i += 1
            stripped = line.strip(_WS)
            if stripped.startswith(")"):
                if stripped[1:].strip(_WS):
                    raise self.error(i, f"unexpected text after the ')' that closes the {what} of the queue statement on line {number}")
                return body, i
            if not stripped or stripped.startswith("#"):
                continue
            body.append(stripped)
        raise self.error(number, f"the {what} of this queue statement has no closing ')' line")

    def in_list(self, tail: str, number: int, lines: list[str], i: int) -> tuple[list[str], int]:
        if tail.startswith("("):
            close = tail.find(")")
            if close >= 0:
                if tail[close + 1 :].strip(_WS):
                    raise self.error(number, f"bad queue statement: unexpected text after ')': {tail[close + 1:][:40]!r}")
                text = tail[1:close]
            else:
                body, i = self.list_lines(number, lines, i, "item list")
                text = " ".join([tail[1:], *body])
        else:
            text = tail
        return [item for item in _ITEM_SPLIT_RE.split(text) if item], i

    def from_rows(self, tail: str, number: int, lines: list[str], i: int) -> tuple[list[str], int]:
        if tail.startswith("("):
            if ")" in tail:
                raise self.error(number, "bad queue statement: the rows of 'from (...)' go on their own lines, ending with a line ')'")
            body, i = self.list_lines(number, lines, i, "row list")
            first = tail[1:].strip(_WS)
            return ([first] if first else []) + body, i
        if not tail:
            raise self.error(number, f"bad queue statement: 'from' needs a file name or a '(' list; {_QUEUE_USAGE}")
        if tail.endswith("|"):
            raise self.error(number, "'queue ... from command |' (running a program) is not supported by gwms")
        path = Path(tail)
        if not path.is_absolute():
            path = Path(self.iwd) / path
        try:
            content = self.read_file(path)
        except (OSError, UnicodeError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise self.error(number, f"cannot read the item file {str(path)!r} of this queue statement: {reason}") from None
        if not isinstance(content, str):
            raise self.error(number, f"cannot read the item file {str(path)!r}: not text")

        def fail(line: int | None, reason: str) -> SubmitError:
            return self.error(number, f"{path}:{line}: {reason}")

        _check_text(content, fail, "the item file")
        rows = [line.strip(_WS) for line in content.split("\n")]
        return [row for row in rows if row], i

    @staticmethod
    def split_row(row: str, n: int) -> list[str]:
        # condor_submit: split on commas and/or white space until every variable has a value;
        # the last one takes the rest of the line; missing values are empty.
        if n == 1:
            return [row]
        parts = _ROW_SPLIT_RE.split(row, maxsplit=n - 1)
        parts = [p.strip(_WS) for p in parts]
        return parts + [""] * (n - len(parts))

    def fixed_macros(self) -> dict[str, str]:
        return {"cluster": str(self.cluster_id), "clusterid": str(self.cluster_id), "dollar": "$", "submit_file": self.filename}

    # --- one statement's procs -------------------------------------------------------------

    def run_statement(
        self,
        number: int,
        count: int,
        names: list[str],
        items: list[list[str]] | None,
        indexes: list[int],
        fixed: dict[str, str],
    ) -> None:
        n_items = 1 if items is None else len(items)
        procs = count * n_items
        if procs == 0:
            return
        first = self.total
        # Names that vary from proc to proc in this statement; the rest are fixed values, so
        # that a plain "queue 100000" expands and builds everything exactly once.  $(Process)
        # always varies, even for one proc: then consecutive statements with no definition
        # between them share one analysis (a file of a million "queue" lines costs what
        # "queue 1000000" costs).
        dynamic: set[str] = {"process", "procid"}
        fixed = dict(fixed)
        if count > 1:
            dynamic.add("step")
        else:
            fixed["step"] = "0"
        if items is not None and n_items > 1:
            dynamic |= {"itemindex", "row", *names}
        elif items is not None:
            fixed["itemindex"] = fixed["row"] = str(indexes[0])
            for name, value in zip(names, items[0]):
                fixed[name] = value
        else:
            fixed["itemindex"] = fixed["row"] = "0"
        key = (self.defs_version, frozenset(dynamic), tuple(sorted(fixed.items())))
        reused = key == self.last_key
        if reused:
            static, varying = self.last_analysis
        else:
            static, varying = self.analyse(number, names, _Expander(self.defs, fixed, frozenset(dynamic)))
            self.last_key, self.last_analysis = key, (static, varying)

        rows: list[dict[str, object]] | None = None
        if varying:
            rows = self.proc_rows(varying, number, first, count, names, items, indexes)
        last = self.statements[-1] if self.statements else None
        if reused and last is not None and last.first_proc + last.count == first:
            last.count += procs  # the same commands as the statement before: one statement
            if rows is not None and last.rows is not None:
                last.rows.extend(rows)
        else:
            self.statements.append(_Statement(first, procs, static, rows))
        self.total += procs

    def analyse(
        self, number: int, names: list[str], expander: _Expander
    ) -> tuple[dict[str, object], list[tuple[tuple[str, ...], _Builder, list[object], bool]]]:
        """Build what is the same for every proc of a statement; compile the rest."""
        builders = list(_BUILDERS) + [((key,), _custom_builder(key, attr)) for key, attr in self.custom.items()]
        static: dict[str, object] = {}
        varying: list[tuple[tuple[str, ...], _Builder, list[object], bool]] = []
        for inputs, build in builders:
            templates = [self.command_value(expander, name, number) for name in inputs]
            if all(isinstance(t, str) for t in templates):
                values = [_present(t) for t in templates]  # type: ignore[arg-type]
                static.update(self.build(build, values, number, names))
                continue
            compiled: list[object] = [_present(t) if isinstance(t, str) else _Compiled(t) for t in templates]
            refs = {ref for c in compiled if isinstance(c, _Compiled) for ref in c.names}
            # Values that do not depend on the proc number are the same for every step of an
            # item: build them once per item.
            per_item = not refs & {"process", "procid", "step"}
            varying.append((inputs, build, compiled, per_item))
        return static, varying

    def proc_rows(
        self,
        varying: list[tuple[tuple[str, ...], _Builder, list[object], bool]],
        number: int,
        first: int,
        count: int,
        names: list[str],
        items: list[list[str]] | None,
        indexes: list[int],
    ) -> list[dict[str, object]]:
        """The attributes that vary, for every proc of one statement (the hot loop of a big
        cluster: keep it lean)."""
        ctx = self.ctx
        rows: list[dict[str, object]] = []
        proc_values: dict[str, str] = {}
        proc = first
        k = 0
        text_size = self.per_proc_text
        try:
            for index in range(1 if items is None else len(items)):
                if items is not None:
                    proc_values["itemindex"] = proc_values["row"] = str(indexes[index])
                    for name, value in zip(names, items[index]):
                        proc_values[name] = value
                item_cache: dict[int, dict[str, object]] = {}
                for step in range(count):
                    proc_values["process"] = proc_values["procid"] = str(proc)
                    proc_values["step"] = str(step)
                    row: dict[str, object] = {}
                    for k, (_, build, compiled, per_item) in enumerate(varying):
                        attrs = item_cache.get(k) if per_item else None
                        if attrs is None:
                            values = []
                            for c in compiled:
                                if c.__class__ is _Compiled:
                                    text = c.render(proc_values)  # type: ignore[attr-defined]
                                    text_size += len(text)
                                    values.append(text.strip(_WS) or None)
                                else:
                                    values.append(c)  # the same for every proc (or None)
                            attrs = build(ctx, *values)
                            if per_item:
                                item_cache[k] = attrs
                        row.update(attrs)
                    if text_size > _MAX_PER_PROC_TEXT:
                        raise self.error(number, f"too much per-job text: the values that differ between jobs exceed {_MAX_PER_PROC_TEXT} characters")
                    rows.append(row)
                    proc += 1
        except _MacroError as e:
            raise self.error(number, f"{e} (proc {proc})") from None
        except _BadValue as e:
            raise self.bad_value(e, number, names, proc) from None
        self.per_proc_text = text_size
        return rows

    def command_value(self, expander: _Expander, name: str, number: int) -> _Template:
        try:
            return expander.value(name)
        except _MacroError as e:
            raise self.error(self.def_lines.get(name, number), f"{self.display(name)}: {e}") from None

    def display(self, key: str) -> str:
        return "+" + self.custom[key] if key.startswith("+") else key

    def build(self, build: _Builder, values: list[str | None], number: int, queue_vars: list[str]) -> dict[str, object]:
        try:
            return build(self.ctx, *values)
        except _BadValue as e:
            raise self.bad_value(e, number, queue_vars) from None

    def bad_value(self, e: _BadValue, number: int, queue_vars: list[str], proc: int | None = None) -> SubmitError:
        command = e.command.lower()
        if command in queue_vars or command not in self.def_lines:
            line = number  # the value came from the queue statement (or is missing)
        else:
            line = self.def_lines[command]
        where = "" if proc is None else f" (proc {proc}, queued on line {number})"
        return self.error(line, f"{e.reason}{where}")

    # --- result --------------------------------------------------------------------------

    def result(self, now: int) -> SubmitResult:
        statements = [s for s in self.statements if s.count]
        # What every proc shares goes to the cluster ad: the same static value in every
        # statement, or a per-proc value that turned out the same for every proc.
        shared: dict[str, object] = {}
        for name, value in statements[0].static.items():
            key = _value_key(value)
            if all(name in s.static and _value_key(s.static[name]) == key for s in statements[1:]):
                shared[name] = value
        varying_names = {name for s in statements if s.rows for row in s.rows for name in row}
        for name in varying_names:
            shared.pop(name, None)
            value = _same_everywhere(statements, name)
            if value is not _MISSING:
                shared[name] = value

        cluster = classads.ClassAd()
        cluster["MyType"] = "Job"
        cluster["TargetType"] = "Machine"
        cluster["ClusterId"] = self.cluster_id
        cluster["Owner"] = self.owner
        cluster["JobStatus"] = 1  # Idle
        cluster["NumJobStarts"] = 0
        cluster["JobRunCount"] = 0
        cluster["QDate"] = now
        cluster["EnteredCurrentStatus"] = now
        for name, value in shared.items():
            cluster[name] = value

        proc_ads: list[classads.ClassAd] = []
        new_ad = classads.ClassAd
        for s in statements:
            base = [(name, value) for name, value in s.static.items() if name not in shared]
            for proc, row in enumerate(s.rows or itertools.repeat({}, s.count), start=s.first_proc):
                ad = new_ad()
                ad["ProcId"] = proc
                for name, value in base:
                    ad[name] = value
                for name, value in row.items():
                    if name not in shared:
                        ad[name] = value
                proc_ads.append(ad)
        return SubmitResult(cluster, proc_ads)


_MISSING: Final = object()


def _same_everywhere(statements: list[_Statement], name: str) -> object:
    """The value of ``name`` if every proc has it and all are equal, else _MISSING."""
    first: object = _MISSING
    for s in statements:
        if name in s.static:
            values: Iterable[object] = (s.static[name],)
        elif s.rows is None:
            return _MISSING
        else:
            values = (row.get(name, _MISSING) for row in s.rows)
        for value in values:
            if value is _MISSING:
                return _MISSING
            if first is _MISSING:
                first = value
            elif _value_key(value) != _value_key(first):
                return _MISSING
    return first


def _is_clean(value: str) -> bool:
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _default_read_file(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def parse_submit(
    text: str,
    *,
    filename: str = "<submit>",
    cluster_id: int,
    owner: str,
    iwd: Path,
    read_file: Callable[[Path], str] | None = None,
    max_procs: int = 1_000_000,
    now: int | None = None,
) -> SubmitResult:
    """Parse a submit description file into the ads of cluster ``cluster_id``.

    ``iwd`` is the (absolute) directory the user submits from: relative ``executable``,
    ``initialdir`` and ``queue ... from FILE`` paths are resolved against it, and it is the
    job's ``Iwd`` unless ``initialdir`` says otherwise.  ``read_file`` reads the files of
    ``queue ... from FILE`` (default: the file as UTF-8).  ``max_procs`` bounds the number of
    procs of the whole file.  ``now`` (seconds since the epoch) becomes ``QDate`` and
    ``EnteredCurrentStatus``.

    Any problem with the text raises :class:`SubmitError` naming the file and line, before
    anything is returned: a file with an error queues nothing.
    """
    if not isinstance(text, str):
        raise TypeError(f"submit text must be str, not {type(text).__name__}")
    if not Path(iwd).is_absolute():
        raise ValueError(f"iwd must be an absolute path, not {str(iwd)!r}")
    if max_procs < 1:
        raise ValueError("max_procs must be at least 1")
    if cluster_id < 0:
        raise ValueError("cluster_id must not be negative")
    # These end up in ClassAd strings too, and classad2 crashes the process on a lone surrogate
    # (what os.fsdecode makes of a directory name that is not UTF-8).
    for what, given in (("owner", owner), ("filename", filename)):
        if not _is_clean(given):
            raise ValueError(f"{what} must be Unicode text without NUL or lone surrogates: {given!r}")
    if not _is_clean(str(iwd)):
        raise SubmitError(filename, None, f"the submit directory {str(iwd)!r} is not valid Unicode (or holds a NUL)")
    _check_text(text, lambda line, reason: SubmitError(filename, line, reason), "the submit file")
    parser = _Parser(text, filename, cluster_id, owner, Path(iwd), read_file or _default_read_file, max_procs)
    parser.parse()
    return parser.result(int(time.time()) if now is None else now)
