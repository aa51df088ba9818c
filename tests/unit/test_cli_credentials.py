"""``gwms ca``, ``gwms proxy`` and ``gwms token`` through their argparse handlers."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import stat
from pathlib import Path

import pytest

from gwms.cli import dispatch
from gwms.cli import credentials
from gwms.credentials import ca
from gwms.credentials.tokens import verify_token, load_signing_key
from gwms.credentials.x509 import (
    create_proxy,
    is_limited_proxy,
    is_proxy,
    load_credential,
    write_credential,
)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Parse and run like ``gwms.cli.main``: a UsageError is exit code 2 with a one-line message."""
    parser = argparse.ArgumentParser(prog="gwms")
    sub = parser.add_subparsers(dest="command")
    credentials.register(sub)
    code = dispatch(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "ca"
    ca.init_ca(directory)
    ca.issue_user(directory, "alice")
    return directory


def timeleft_seconds(out: str) -> int:
    h, m, s = re.search(r"^timeleft\s*: (\d+):(\d\d):(\d\d)$", out, re.M).groups()
    return int(h) * 3600 + int(m) * 60 + int(s)


def field(out: str, name: str) -> str:
    return re.search(rf"^{name}\s*: (.*)$", out, re.M).group(1)


# --------------------------------------------------------------------------------------------
# gwms ca

def test_ca_init_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "ca"
    code, out, _ = run(["ca", "init", str(directory), "--name", "Site CA"], capsys)
    assert code == 0 and out.split() == [str(directory / "ca.pem"), str(directory / "ca.key")]
    code, _, err = run(["ca", "init", str(directory)], capsys)
    assert code == 2 and "already holds a CA" in err and "Traceback" not in err
    code, _, _ = run(["ca", "init", str(directory), "--force"], capsys)
    assert code == 0

    code, out, _ = run(["ca", "issue", str(directory), "--host", "localhost", "--alt", "h1",
                        "--alt", "10.1.2.3"], capsys)
    assert code == 0
    assert out.split() == [str(directory / "host-localhost.pem"),
                           str(directory / "host-localhost.key")]
    code, out, _ = run(["ca", "issue", str(directory), "--user", "bob", "--days", "3"], capsys)
    assert code == 0 and (directory / "user-bob.pem").exists()
    cert = load_credential(directory / "user-bob.pem", directory / "user-bob.key").cert
    assert cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) < dt.timedelta(days=3)


def test_ca_issue_needs_exactly_one_of_host_or_user(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(["ca", "issue", str(tmp_path), "--host", "a", "--user", "b"], capsys)
    assert info.value.code == 2
    code, _, err = run(["ca", "issue", str(tmp_path), "--user", "../x"], capsys)
    assert code == 2 and "must not contain" in err


def test_ca_issue_pilot_makes_a_certificate_glideins_can_serve_and_connect_with(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography import x509 as cx509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    directory = tmp_path / "ca"
    assert run(["ca", "init", str(directory)], capsys)[0] == 0
    code, out, _ = run(["ca", "issue", str(directory), "--pilot", "cmsprod", "--alt", "wn.example.org"], capsys)
    assert code == 0
    cert_path, key_path = (Path(p) for p in out.split())
    cert = load_credential(cert_path, key_path).cert
    assert cert.subject.rfc4514_string() == "CN=cmsprod,OU=Pilots,O=gwms"
    usages = cert.extensions.get_extension_for_class(cx509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    names = cert.extensions.get_extension_for_class(cx509.SubjectAlternativeName).value
    assert names.get_values_for_type(cx509.DNSName) == ["wn.example.org"]
    assert cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) < dt.timedelta(days=30)
    code, _, err = run(["ca", "issue", str(directory), "--pilot", "p2", "--alt", "a", "--alt", "b"], capsys)
    assert code == 2 and "a pilot certificate names one host" in err


# --------------------------------------------------------------------------------------------
# gwms proxy

def test_proxy_init_and_info(pki: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "x509up"
    code, out, _ = run(["proxy", "init", "--cert", str(pki / "user-alice.pem"),
                        "--key", str(pki / "user-alice.key"), "--out", str(out_path),
                        "--hours", "2", "--bits", "1024"], capsys)
    assert code == 0 and "Your identity: /O=gwms/OU=Users/CN=alice" in out
    assert stat.S_IMODE(out_path.stat().st_mode) == 0o600
    proxy = load_credential(out_path)
    assert is_proxy(proxy.cert) and not is_limited_proxy(proxy.cert)
    assert proxy.cert.public_key().key_size == 1024

    code, out, _ = run(["proxy", "info", str(out_path)], capsys)
    assert code == 0
    assert field(out, "identity") == "/O=gwms/OU=Users/CN=alice"
    assert field(out, "subject").startswith("/O=gwms/OU=Users/CN=alice/CN=")
    assert field(out, "issuer") == "/O=gwms/OU=Users/CN=alice"
    assert field(out, "type") == "RFC 3820 compliant impersonation proxy"
    assert field(out, "strength") == "1024 bits"
    assert field(out, "limited") == "no"
    assert field(out, "path") == str(out_path)
    assert 2 * 3600 - 60 <= timeleft_seconds(out) <= 2 * 3600

    code, out, _ = run(["proxy", "info", str(out_path), "--ca", str(pki / "ca.pem")], capsys)
    assert code == 0 and field(out, "verification") == "valid"


def test_proxy_init_limited_and_env_defaults(pki: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "env-proxy"
    monkeypatch.setenv("X509_USER_CERT", str(pki / "user-alice.pem"))
    monkeypatch.setenv("X509_USER_KEY", str(pki / "user-alice.key"))
    monkeypatch.setenv("X509_USER_PROXY", str(out_path))
    code, _, _ = run(["proxy", "init", "--limited", "--bits", "1024"], capsys)
    assert code == 0 and is_limited_proxy(load_credential(out_path).cert)
    code, out, _ = run(["proxy", "info"], capsys)  # default path from X509_USER_PROXY
    assert code == 0
    assert field(out, "type") == "RFC 3820 compliant limited proxy"
    assert field(out, "limited") == "yes"
    assert 12 * 3600 - 60 <= timeleft_seconds(out) <= 12 * 3600  # grid-proxy-init's 12 h


def test_proxy_of_a_proxy_from_the_proxy_file(pki: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "p1", tmp_path / "p2"
    assert run(["proxy", "init", "--cert", str(pki / "user-alice.pem"), "--key",
                str(pki / "user-alice.key"), "--out", str(first), "--bits", "1024"], capsys)[0] == 0
    # the proxy file holds its own key: no --key needed
    assert run(["proxy", "init", "--cert", str(first), "--out", str(second), "--hours", "1",
                "--bits", "1024"], capsys)[0] == 0
    code, out, _ = run(["proxy", "info", str(second), "--json", "--ca", str(pki / "ca.pem")],
                       capsys)
    info = json.loads(out)
    assert code == 0 and info["verification"] == "valid"
    assert info["identity"] == "/O=gwms/OU=Users/CN=alice"
    assert info["subject"].count("/CN=") == 3 and info["limited"] is False


def test_proxy_info_of_an_end_entity_certificate(pki: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["proxy", "info", str(pki / "user-alice.pem"), "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["type"] == "end entity certificate"
    assert info["identity"] == info["subject"] == "/O=gwms/OU=Users/CN=alice"
    assert info["strength"] == 2048


def test_proxy_info_with_ca_on_an_expired_proxy_exits_1(pki: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    user = load_credential(pki / "user-alice.pem", pki / "user-alice.key")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=5)
    path = tmp_path / "old"
    write_credential(path, create_proxy(user, 1, key_bits=1024, now=past))
    code, out, _ = run(["proxy", "info", str(path)], capsys)
    assert code == 0 and field(out, "timeleft") == "0:00:00"
    code, out, _ = run(["proxy", "info", str(path), "--ca", str(pki / "ca.pem")], capsys)
    assert code == 1
    assert re.match(r"certificate /O=gwms/OU=Users/CN=alice/CN=\d+ expired at ",
                    field(out, "verification"))
    code, out, _ = run(["proxy", "info", str(path), "--ca", str(pki / "ca.pem"), "--json"], capsys)
    assert code == 1 and "expired at" in json.loads(out)["verification"]
    assert json.loads(out)["timeleft"] == "0:00:00"


def test_proxy_errors_are_one_line_usage_errors(pki: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["proxy", "init", "--cert", str(tmp_path / "missing.pem"), "--key",
                        str(pki / "user-alice.key"), "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "missing.pem does not exist" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run(["proxy", "init", "--cert", str(pki / "user-alice.pem"), "--key",
                        str(pki / "ca.key"), "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "does not belong to certificate /O=gwms/OU=Users/CN=alice" in err
    code, _, err = run(["proxy", "info", str(pki / "user-alice.pem"), "--ca",
                        str(tmp_path / "noca.pem")], capsys)
    assert code == 2 and "noca.pem does not exist" in err
    code, _, err = run(["proxy", "info", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "p").exists()


def test_format_timeleft() -> None:
    assert credentials.format_timeleft(-5) == "0:00:00"
    assert credentials.format_timeleft(3661.9) == "1:01:01"
    assert credentials.format_timeleft(100 * 3600) == "100:00:00"


# --------------------------------------------------------------------------------------------
# gwms token

def test_token_keygen_create_and_verify(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    key_path = tmp_path / "pool.key"
    assert run(["token", "keygen", str(key_path)], capsys)[0] == 0
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    code, _, err = run(["token", "keygen", str(key_path)], capsys)
    assert code == 2 and "already exists" in err

    code, out, _ = run(["token", "create", "--signing-key", str(key_path), "--subject",
                        "glidein@site", "--hours", "1", "--scope", "read", "ADVERTISE_STARTD"],
                       capsys)
    assert code == 0
    token = out.strip()
    claims = verify_token(token, {"POOL": load_signing_key(key_path)}, "gwms")
    assert claims.subject == "glidein@site"
    assert claims.scopes == frozenset({"READ", "ADVERTISE_STARTD"})
    assert 3590 <= claims.expires_at - claims.issued_at <= 3601

    code, out, _ = run(["token", "info", token], capsys)
    assert code == 0 and "signature not checked" in out
    assert field(out, "subject") == "glidein@site"
    assert field(out, "scope") == "condor:/READ condor:/ADVERTISE_STARTD"


def test_token_create_to_file_with_issuer_and_kid(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    key_path, out_path = tmp_path / "k", tmp_path / "tok"
    run(["token", "keygen", str(key_path)], capsys)
    code, out, _ = run(["token", "create", "--signing-key", str(key_path), "--subject", "s",
                        "--hours", "0.5", "--scope", "WRITE", "--issuer", "pool.example",
                        "--kid", "K2", "--out", str(out_path)], capsys)
    assert code == 0 and str(out_path) in out
    assert stat.S_IMODE(out_path.stat().st_mode) == 0o600
    token = out_path.read_text().strip()
    assert token not in out
    claims = verify_token(token, {"K2": load_signing_key(key_path)}, "pool.example")
    assert claims.allows("WRITE") and not claims.allows("READ")
    code, out, _ = run(["token", "info", str(out_path)], capsys)  # a file works too
    assert code == 0 and field(out, "issuer") == "pool.example" and field(out, "key id") == "K2"


def test_token_errors_are_usage_errors(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["token", "create", "--signing-key", str(tmp_path / "none"), "--subject",
                        "s", "--hours", "1", "--scope", "READ"], capsys)
    assert code == 2 and "does not exist" in err
    key_path = tmp_path / "k"
    run(["token", "keygen", str(key_path)], capsys)
    code, _, err = run(["token", "create", "--signing-key", str(key_path), "--subject", "s",
                        "--hours", "1", "--scope", "NOT A LEVEL"], capsys)
    assert code == 2 and "not an authorization level" in err
    code, _, err = run(["token", "info", "not-a-token"], capsys)
    assert code == 2 and "malformed token" in err


def test_gwms_main_exit_codes(pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """Through the real entry point: exit 1 for an invalid chain, 2 for a usage error.

    The parser is limited to this module's commands so the test does not depend on the other
    tools' modules.
    """
    import gwms.cli

    def build_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="gwms")
        sub = parser.add_subparsers(dest="command")
        sub.required = True
        credentials.register(sub)
        return parser

    monkeypatch.setattr(gwms.cli, "build_parser", build_parser)
    main = gwms.cli.main

    user = load_credential(pki / "user-alice.pem", pki / "user-alice.key")
    path = tmp_path / "old"
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=5)
    write_credential(path, create_proxy(user, 1, key_bits=1024, now=past))
    with pytest.raises(SystemExit) as info:
        main(["proxy", "info", str(path), "--ca", str(pki / "ca.pem")])
    assert info.value.code == 1 and "expired at" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["proxy", "info", str(tmp_path / "missing")])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("gwms proxy: certificate file ")


def test_proxy_renew_keeps_a_fresh_proxy_and_renews_a_short_one_from_the_long_one(
        pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_proxy, short = tmp_path / "long", tmp_path / "x509up"
    assert run(["proxy", "init", "--cert", str(pki / "user-alice.pem"), "--key", str(pki / "user-alice.key"),
                "--out", str(long_proxy), "--hours", "168", "--bits", "1024"], capsys)[0] == 0
    renew = ["proxy", "renew", "--from", str(long_proxy), "--out", str(short), "--hours", "12", "--bits", "1024"]
    code, out, _ = run(renew, capsys)  # no short proxy yet: made
    assert code == 0 and "renewed from" in out
    first = load_credential(short)
    assert first.chain[0] == load_credential(long_proxy).cert  # signed by the long-lived proxy
    assert stat.S_IMODE(short.stat().st_mode) == 0o600
    code, out, _ = run(renew + ["--min-left", "4"], capsys)  # 12 h left, 4 wanted: left alone
    assert code == 0 and "not renewed" in out and load_credential(short).cert == first.cert
    code, out, _ = run(renew + ["--min-left", "13"], capsys)  # less than 13 h left: renewed
    assert code == 0 and "renewed from" in out and load_credential(short).cert != first.cert
    assert run(renew + ["--limited", "--min-left", "13"], capsys)[0] == 0
    assert is_limited_proxy(load_credential(short).cert)


def test_proxy_renew_says_why_it_cannot_renew(pki: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    short = tmp_path / "x509up"
    expired = tmp_path / "expired"
    issuer = load_credential(pki / "user-alice.pem", pki / "user-alice.key")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=10)
    write_credential(expired, create_proxy(issuer, hours=1, key_bits=1024, now=past))
    code, _, err = run(["proxy", "renew", "--from", str(expired), "--out", str(short)], capsys)
    assert code == 2 and "the long-lived credential expired; renew it by hand" in err
    assert not short.exists()
    code, _, err = run(["proxy", "renew", "--from", str(tmp_path / "missing"), "--out", str(short)], capsys)
    assert code == 2 and "missing" in err
