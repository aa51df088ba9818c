"""``gwms ca``, ``gwms proxy`` and ``gwms token``: the credential tools.

They mirror the commands grid users already know (grid-proxy-init, grid-proxy-info, condor_token_*)
in defaults and output, so that habits and scripts carry over. Every error a user can fix
(missing file, wrong key, expired proxy, bad token) becomes a one-line ``UsageError``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

from gwms.cli import UsageError
from gwms.credentials import ca as _ca
from gwms.credentials import tokens as _tokens
from gwms.credentials.x509 import (
    INDEPENDENT_OID,
    LIMITED_PROXY_OID,
    Credential,
    CredentialError,
    EncryptedKeyError,
    create_proxy,
    dn_string,
    load_certificates,
    load_credential,
    proxy_policy,
    verify_chain,
    write_credential,
    write_private_file,
)

__all__ = ["register", "format_timeleft", "default_proxy_path"]

Handler = Callable[[argparse.Namespace], int]


def _user_errors(func: Handler) -> Handler:
    """Turn the refusals of the credential modules into one-line usage errors."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (CredentialError, _tokens.TokenError) as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise UsageError(f"{where}{e.strerror or e}") from None

    return wrapper


def format_timeleft(seconds: float) -> str:
    """``H:MM:SS`` as grid-proxy-info prints it (hours may exceed 24; 0:00:00 once expired)."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def default_proxy_path() -> str:
    """Where Globus tools look for the user's proxy: $X509_USER_PROXY, else /tmp/x509up_u<uid>."""
    return os.environ.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}"


# --------------------------------------------------------------------------------------------
# gwms ca

@_user_errors
def _ca_init(args: argparse.Namespace) -> int:
    cert, key = _ca.init_ca(Path(args.directory), name=args.name, force=args.force)
    print(cert)
    print(key)
    return 0


@_user_errors
def _ca_issue(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if args.host is not None:
        days = args.days if args.days is not None else 825
        cert, key = _ca.issue_host(directory, args.host, days=days, extra_names=args.alt or ())
    elif args.pilot is not None:
        if len(args.alt) > 1:
            raise UsageError("a pilot certificate names one host (--alt HOST; default: localhost)")
        days = args.days if args.days is not None else 30
        cert, key = _ca.issue_pilot(directory, args.pilot, args.alt[0] if args.alt else "localhost", days=days)
    else:
        if args.alt:
            raise UsageError("--alt only applies to host certificates (--host)")
        days = args.days if args.days is not None else 365
        cert, key = _ca.issue_user(directory, args.user, days=days)
    print(cert)
    print(key)
    return 0


# --------------------------------------------------------------------------------------------
# gwms proxy

def _load_issuer(cert_path: str, key_path: str | None) -> Credential:
    """Load the signing credential, asking for the pass phrase on a terminal if it needs one."""
    try:
        return load_credential(cert_path, key_path)
    except EncryptedKeyError:
        if not sys.stdin.isatty():
            raise
    phrase = getpass.getpass("Enter GRID pass phrase for this identity: ")
    return load_credential(cert_path, key_path, password=phrase.encode())


@_user_errors
def _proxy_init(args: argparse.Namespace) -> int:
    home_globus = Path.home() / ".globus"
    cert_path = args.cert or os.environ.get("X509_USER_CERT") or str(home_globus / "usercert.pem")
    key_path = args.key or os.environ.get("X509_USER_KEY")
    if key_path is None:
        # A proxy file (or a combined PEM) carries its own key; otherwise grid-proxy-init's default.
        issuer = _load_issuer(cert_path, None)
        if issuer.key is None:
            default_key = home_globus / "userkey.pem"
            if not default_key.exists():
                raise UsageError(f"{cert_path} holds no private key; give --key "
                                 "(or set X509_USER_KEY)")
            issuer = _load_issuer(cert_path, str(default_key))
    else:
        issuer = _load_issuer(cert_path, key_path)
    out = args.out or default_proxy_path()
    proxy = create_proxy(issuer, hours=args.hours, limited=args.limited, key_bits=args.bits)
    write_credential(out, proxy)
    identity = next((c for c in (proxy.cert, *proxy.chain) if proxy_policy(c) is None),
                    issuer.cert)
    print(f"Your identity: {dn_string(identity.subject)}")
    print(f"Proxy written to {out}")
    print(f"Your proxy is valid until: {proxy.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    return 0


@_user_errors
def _proxy_renew(args: argparse.Namespace) -> int:
    """Keep a short proxy fresh from a long-lived credential, for cron: a new proxy is made only
    when the current one has less than --min-left; the long-lived credential must not need a
    pass phrase (a week-long proxy made with `gwms proxy init --hours 168`, or an unencrypted
    robot key). Exit 0 when the proxy is fresh, 2 (a one-line error) when it could not be renewed."""
    out = args.out or default_proxy_path()
    now = _dt.datetime.now(_dt.timezone.utc)
    min_left = _dt.timedelta(hours=args.min_left)
    try:
        current = load_credential(out)
        left = min([current.cert.not_valid_after_utc, *(c.not_valid_after_utc for c in current.chain)]) - now
    except (CredentialError, OSError):
        current, left = None, _dt.timedelta(0)
    if current is not None and left >= min_left:
        print(f"{out}: still valid for {format_timeleft(left.total_seconds())} (at least "
              f"{format_timeleft(min_left.total_seconds())} wanted): not renewed")
        return 0
    try:
        issuer = load_credential(args.source, args.key)
    except EncryptedKeyError:
        raise UsageError(f"{args.source}: the key needs a pass phrase; `gwms proxy renew` runs unattended: "
                         "renew from a long-lived proxy or an unencrypted key") from None
    source_left = min([issuer.cert.not_valid_after_utc, *(c.not_valid_after_utc for c in issuer.chain)]) - now
    if source_left.total_seconds() <= 0:
        raise UsageError(f"{args.source}: the long-lived credential expired; renew it by hand (gwms proxy init)")
    proxy = create_proxy(issuer, hours=args.hours, limited=args.limited, key_bits=args.bits)
    write_credential(out, proxy)  # atomically: a job reading the file never sees half of it
    end = proxy.cert.not_valid_after_utc
    print(f"{out}: renewed from {args.source}, valid until {end:%Y-%m-%d %H:%M:%S} UTC")
    if source_left < min_left + _dt.timedelta(hours=args.hours):
        print(f"warning: {args.source} itself is valid for only {format_timeleft(source_left.total_seconds())} more",
              file=sys.stderr)
    return 0


def _strength(cert: x509.Certificate) -> int | None:
    public = cert.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        return 256
    if isinstance(public, ed448.Ed448PublicKey):
        return 456
    return getattr(public, "key_size", None)


def _cert_type(cert: x509.Certificate) -> str:
    policy = proxy_policy(cert)
    if policy is None:
        return "end entity certificate"
    if policy == LIMITED_PROXY_OID:
        return "RFC 3820 compliant limited proxy"
    if policy == INDEPENDENT_OID:
        return "RFC 3820 compliant independent proxy"
    return "RFC 3820 compliant impersonation proxy"


@_user_errors
def _proxy_info(args: argparse.Namespace) -> int:
    path = args.path or default_proxy_path()
    cred = load_credential(path)
    full = [cred.cert, *cred.chain]
    identity = next((c for c in full if proxy_policy(c) is None), cred.cert)
    limited = any(proxy_policy(c) == LIMITED_PROXY_OID for c in full)
    now = _dt.datetime.now(_dt.timezone.utc)
    not_after = min(c.not_valid_after_utc for c in full)
    info: dict[str, Any] = {
        "subject": dn_string(cred.cert.subject),
        "issuer": dn_string(cred.cert.issuer),
        "identity": dn_string(identity.subject),
        "type": _cert_type(cred.cert),
        "strength": _strength(cred.cert),
        "path": os.path.abspath(path),
        "timeleft": format_timeleft((not_after - now).total_seconds()),
        "limited": limited,
    }
    code = 0
    if args.ca:
        trusted = load_certificates(args.ca)  # an unreadable CA file is a usage error, not "invalid"
        try:
            verify_chain(full, trusted, now=now)
            info["verification"] = "valid"
        except CredentialError as e:
            info["verification"] = str(e)
            code = 1
    if args.json:
        info["not_after"] = not_after.isoformat()
        info["timeleft_s"] = max(0, int((not_after - now).total_seconds()))
        print(json.dumps(info, indent=2))
    else:
        for name, value in info.items():
            if name == "strength":
                value = f"{value} bits" if value else "unknown"
            elif name == "limited":
                value = "yes" if value else "no"
            print(f"{name:<12}: {value}")
    return code


# --------------------------------------------------------------------------------------------
# gwms token

def _level(text: str) -> str:
    text = text.strip()
    if text.startswith(_tokens.SCOPE_PREFIX):
        text = text[len(_tokens.SCOPE_PREFIX):]
    return text.upper()


@_user_errors
def _token_create(args: argparse.Namespace) -> int:
    if not args.hours > 0:
        raise UsageError(f"--hours must be positive, not {args.hours}")
    key = _tokens.load_signing_key(args.signing_key)
    token = _tokens.create_token(key, args.subject, args.issuer, [_level(s) for s in args.scope],
                                 lifetime_s=args.hours * 3600.0, kid=args.kid)
    if args.out:
        write_private_file(args.out, (token + "\n").encode("ascii"))
        print(f"token written to {args.out}")
    else:
        print(token)
    return 0


@_user_errors
def _token_keygen(args: argparse.Namespace) -> int:
    _tokens.generate_signing_key(args.file, overwrite=args.force)
    print(f"signing key written to {args.file}")
    return 0


def _read_token_arg(text: str) -> str:
    if os.path.isfile(text):
        with open(text, "r", encoding="ascii", errors="replace") as f:
            return f.read(_tokens.MAX_TOKEN_LENGTH + 2).strip()
    return text.strip()


def _show_time(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 2**40:
        return _dt.datetime.fromtimestamp(value, _dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC")
    return repr(value)


@_user_errors
def _token_info(args: argparse.Namespace) -> int:
    header, claims = _tokens.decode_token_unverified(_read_token_arg(args.token))
    print(f"{'algorithm':<10}: {header.get('alg')}")
    print(f"{'key id':<10}: {header.get('kid', 'POOL')}")
    print(f"{'subject':<10}: {claims.get('sub')}")
    print(f"{'issuer':<10}: {claims.get('iss')}")
    print(f"{'issued':<10}: {_show_time(claims.get('iat'))}")
    exp = claims.get("exp")
    line = _show_time(exp)
    if isinstance(exp, (int, float)) and not isinstance(exp, bool):
        left = exp - time.time()
        line += " (expired)" if left <= 0 else f" (timeleft {format_timeleft(left)})"
    print(f"{'expires':<10}: {line}")
    print(f"{'scope':<10}: {claims.get('scope', '')}")
    print(f"{'token id':<10}: {claims.get('jti')}")
    print("signature not checked")
    return 0


# --------------------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ca``, ``proxy`` and ``token`` commands to the ``gwms`` parser."""
    ca = subparsers.add_parser("ca", help="a small CA for a pool: host and user certificates")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION")
    ca_sub.required = True
    p = ca_sub.add_parser("init", help="create a CA in DIR")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--name", default="gwms CA", help="CA common name (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(func=_ca_init)
    p = ca_sub.add_parser("issue", help="issue a host, user or pilot certificate from the CA in DIR")
    p.add_argument("directory", metavar="DIR")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--host", metavar="NAME", help="host certificate for NAME")
    who.add_argument("--user", metavar="NAME", help="user certificate for NAME")
    who.add_argument("--pilot", metavar="NAME", help="pilot certificate (OU=Pilots, CN=NAME) for glideins: "
                                                     "a client to the collector and a server to schedds")
    p.add_argument("--alt", metavar="NAME", action="append", default=[],
                   help="extra DNS name or IP address for a host certificate (repeatable); for a pilot, "
                        "the one host its certificate names (default: localhost)")
    p.add_argument("--days", type=int, default=None,
                   help="lifetime in days (default: 825 for hosts, 365 for users, 30 for pilots)")
    p.set_defaults(func=_ca_issue)

    proxy = subparsers.add_parser("proxy", help="RFC 3820 proxy certificates")
    proxy_sub = proxy.add_subparsers(dest="proxy_command", metavar="ACTION")
    proxy_sub.required = True
    p = proxy_sub.add_parser("init", help="create a proxy (like grid-proxy-init)")
    p.add_argument("--cert", help="certificate (default: $X509_USER_CERT, ~/.globus/usercert.pem)")
    p.add_argument("--key", help="private key (default: $X509_USER_KEY, ~/.globus/userkey.pem)")
    p.add_argument("--out", help="proxy file (default: $X509_USER_PROXY, /tmp/x509up_u<uid>)")
    p.add_argument("--hours", type=float, default=12.0, help="lifetime (default: %(default)s)")
    p.add_argument("--limited", action="store_true", help="make a limited proxy")
    p.add_argument("--bits", type=int, default=2048, help="key size (default: %(default)s)")
    p.set_defaults(func=_proxy_init)
    p = proxy_sub.add_parser("renew", help="renew a short proxy from a long-lived credential when it runs low "
                                           "(for cron)")
    p.add_argument("--from", dest="source", required=True, metavar="LONG",
                   help="the long-lived credential: a long proxy, or a certificate with an unencrypted key")
    p.add_argument("--key", help="the key of --from, if it is in a file of its own")
    p.add_argument("--out", help="the short proxy (default: $X509_USER_PROXY, /tmp/x509up_u<uid>)")
    p.add_argument("--hours", type=float, default=12.0, help="lifetime of a new proxy (default: %(default)s)")
    p.add_argument("--min-left", type=float, default=4.0, metavar="HOURS",
                   help="renew when less than this is left (default: %(default)s)")
    p.add_argument("--limited", action="store_true", help="make a limited proxy")
    p.add_argument("--bits", type=int, default=2048, help="key size (default: %(default)s)")
    p.set_defaults(func=_proxy_renew)
    p = proxy_sub.add_parser("info", help="describe a proxy (like grid-proxy-info)")
    p.add_argument("path", nargs="?", metavar="PROXY",
                   help="proxy file (default: $X509_USER_PROXY, /tmp/x509up_u<uid>)")
    p.add_argument("--ca", metavar="CA.pem", help="verify the chain against these CAs")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=_proxy_info)

    token = subparsers.add_parser("token", help="pool-signed bearer tokens")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION")
    token_sub.required = True
    p = token_sub.add_parser("create", help="sign a token")
    p.add_argument("--signing-key", required=True, metavar="FILE")
    p.add_argument("--subject", required=True)
    p.add_argument("--hours", type=float, required=True)
    p.add_argument("--scope", nargs="+", required=True, metavar="LEVEL",
                   help="authorization levels, e.g. READ ADVERTISE_STARTD")
    p.add_argument("--issuer", default="gwms", help="(default: %(default)s)")
    p.add_argument("--kid", default="POOL", help="key id (default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help="write the token here (mode 0600)")
    p.set_defaults(func=_token_create)
    p = token_sub.add_parser("keygen", help="create a pool signing key")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=_token_keygen)
    p = token_sub.add_parser("info", help="show a token's claims (signature NOT checked)")
    p.add_argument("token", metavar="TOKEN_OR_FILE")
    p.set_defaults(func=_token_info)
