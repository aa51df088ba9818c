"""The glidein's startd configuration from its glidein_config (in memory, plus small files)."""

from __future__ import annotations

import datetime as dt
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from gwms import classads
from gwms.config import parse_config
from gwms.credentials import tokens
from gwms.glidein.startd_config import (
    GlideinConfig,
    GlideinConfigError,
    classad_literal,
    inspect_credential,
    main,
    parse_glidein_config,
    read_glidein_config,
    startd_config_text,
    toml_string,
    write_startd_config,
)

NOW = 1_800_000_000  # a fixed "now" (2027-01-15), so deadlines are exact
START = NOW - 100  # the batch job started 100 s before the startd
HOST_DN = "/O=gwms/OU=Hosts/CN=localhost"


def pem_credential(path: Path, not_after: float, *, chain_not_after: float | None = None) -> Path:
    """A certificate and key in one PEM file expiring at ``not_after`` (optionally followed by an
    issuer certificate expiring at ``chain_not_after``)."""
    def cert(cn: str, until: float) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        built = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                 .serial_number(x509.random_serial_number())
                 .not_valid_before(dt.datetime.fromtimestamp(min(until, NOW) - 86400, dt.UTC))
                 .not_valid_after(dt.datetime.fromtimestamp(until, dt.UTC))
                 .sign(key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return built.public_bytes(serialization.Encoding.PEM), key_pem

    leaf, key = cert("pilot", not_after)
    data = leaf + key
    if chain_not_after is not None:
        data += cert("issuer", chain_not_after)[0]
    path.write_bytes(data)
    return path


@pytest.fixture
def glide(tmp_path: Path) -> Path:
    d = tmp_path / "glide_abc123"
    d.mkdir()
    (d / "files").mkdir()
    (d / "files" / "ca.pem").write_text("a CA bundle\n")
    return d


def base_config(glide: Path, credential: Path, **extra: str) -> str:
    lines = {
        "GLIDEIN_Name": "glidein-7",
        "GLIDEIN_Entry_Name": "ITB_Test",
        "GLIDEIN_Factory": "fact1",
        "GLIDEIN_Client": "frontend1.main",
        "GLIDEIN_Collector": "cm1.example.org:9618, cm2.example.org:9620",
        "GLIDEIN_Credential": str(credential),
        "GLIDEIN_Lifetime": "3600",
        "GLIDEIN_Retire": "3000",
        "GLIDEIN_Max_Idle": "1200",
        "GLIDEIN_Credential_Margin": "300",
        "GLIDEIN_Listen": "127.0.0.1",
        "GLIDEIN_Start_Time": str(START),
        "GLIDEIN_Dir": str(glide),
        "GLIDEIN_CA_File": str(glide / "files" / "ca.pem"),
        **extra,
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items()) + f"GLIDEIN_Trusted={HOST_DN}\n"


def value_of(expression: str) -> object:
    """What the startd's ad will hold for this expression text."""
    ad = classads.ClassAd()
    ad["v"] = classads.parse_expr(expression)
    return classads.evaluate(ad, "v")


def render(text: str, now: float = NOW) -> dict:
    out = startd_config_text(parse_glidein_config(text), now)
    return tomllib.loads(out)


@pytest.fixture
def credential(tmp_path: Path) -> Path:
    return pem_credential(tmp_path / "pilot.pem", NOW + 86400)


# ------------------------------------------------------------------------------------------
# glidein_config


def test_later_lines_win_and_every_trusted_line_counts() -> None:
    config = parse_glidein_config("# written by glidein_startup.sh\nGLIDEIN_Site=A\n\nGLIDEIN_Trusted=/CN=one\n"
                                  "GLIDEIN_Site=B\nGLIDEIN_Trusted=/O=x/CN=two, with = signs\nEMPTY=\n")
    assert config == GlideinConfig(values={"GLIDEIN_Site": "B", "EMPTY": ""},
                                   trusted=("/CN=one", "/O=x/CN=two, with = signs"))


@pytest.mark.parametrize("text, message", [
    ("GLIDEIN_Site=A\nno equals sign\n", "glidein_config: line 2: expected KEY=VALUE, got 'no equals sign'"),
    ("=value\n", "glidein_config: line 1: expected KEY=VALUE, got '=value'"),
    ("GLIDEIN Site=A\n", "glidein_config: line 1: expected KEY=VALUE, got 'GLIDEIN Site=A'"),
    ("1KEY=A\n", "glidein_config: line 1: expected KEY=VALUE, got '1KEY=A'"),
    ("A=1\nB=x\x00y\n", "glidein_config: line 2: control character in the value of B"),
    ("A=1\r\n", "glidein_config: line 1: control character in the value of A"),
])
def test_malformed_glidein_config_lines_are_errors_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(GlideinConfigError) as e:
        parse_glidein_config(text)
    assert str(e.value) == message


def test_a_glidein_config_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "glidein_config"
    path.write_bytes(b"A=1\nB=\xff\n")
    with pytest.raises(GlideinConfigError) as e:
        read_glidein_config(path)
    assert str(e.value) == f"{path}: line 2: not UTF-8 text"
    with pytest.raises(GlideinConfigError) as e:
        read_glidein_config(tmp_path / "missing")
    assert str(e.value) == f"cannot read {tmp_path / 'missing'}: No such file or directory"


# ------------------------------------------------------------------------------------------
# typing and escaping


@pytest.mark.parametrize("value, text", [
    ("4", "4"), ("-12", "-12"), ("0", "0"), ("2.5", "2.5"), ("-0.5e3", "-0.5e3"), ("1e6", "1e6"),
    ("true", "true"), ("FALSE", "false"), ("True", "true"),
    ("007", '"007"'), ("1.", '"1."'), (".5", '".5"'), ("3.11.7", '"3.11.7"'), ("1,2", '"1,2"'),
    ("99999999999999999999", '"99999999999999999999"'), ("", '""'), ("ITB Site", '"ITB Site"'),
    ('say "hi"', '"say \\"hi\\""'), ("back\\slash", '"back\\\\slash"'), ("undefined", '"undefined"'),
    ("x || true", '"x || true"'),
])
def test_numbers_and_booleans_stay_literals_and_the_rest_becomes_strings(value: str, text: str) -> None:
    assert classad_literal(value) == text
    # and what the startd will parse means the value given
    expected = {"true": True, "false": False}.get(value.lower(), value)
    evaluated = value_of(text)
    if isinstance(evaluated, (str, bool)):
        assert evaluated == expected
    else:
        assert evaluated == float(value)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_toml_strings_read_back_exactly(value: str) -> None:
    assert tomllib.loads(f"x = {toml_string(value)}\n")["x"] == value


def test_hostile_toml_values_are_escaped() -> None:
    assert toml_string('a"b\\c\n[pool]\x00\x7f\t') == '"a\\"b\\\\c\\n[pool]\\u0000\\u007F\\t"'


# ------------------------------------------------------------------------------------------
# the startd configuration


def test_the_startd_configuration_has_pool_security_and_startd_sections(glide: Path, credential: Path) -> None:
    text = base_config(glide, credential, GLIDEIN_CPUS="4", GLIDEIN_MaxMemMBs="8000", GLIDEIN_Site="ITB",
                       GLIDEIN_Host_CPUS="8", GLIDEIN_Python_Version="3.11.7", OTHER="not an attribute")
    out = startd_config_text(parse_glidein_config(text), NOW)
    checked = parse_config(out)  # the startd will accept it
    config = tomllib.loads(out)

    assert config["pool"] == {"collectors": ["cm1.example.org:9618", "cm2.example.org:9620"],
                              "ca": str(glide / "files" / "ca.pem"), "proxy": str(credential)}
    assert config["security"]["methods"] == ["x509", "token"]
    assert config["security"]["DAEMON"] == {"allow": [HOST_DN]}
    assert checked.levels["DAEMON"].allow == (HOST_DN,)
    startd = dict(config["startd"])
    attributes = startd.pop("attributes")
    assert startd == {
        "name": "glidein-7", "listen": "127.0.0.1:0", "execute": str(glide / "execute"), "cpus": 4,
        "memory": 8000, "partitionable": True, "address_file": str(glide / "startd.address"),
        "retire_after": 2900, "max_lifetime": 3500, "max_idle": 1200,
        "pilot_credential": str(credential), "identity_switch": "none",
    }
    assert attributes == {
        "GLIDEIN_Name": '"glidein-7"', "GLIDEIN_Entry_Name": '"ITB_Test"', "GLIDEIN_Factory": '"fact1"',
        "GLIDEIN_Client": '"frontend1.main"', "GLIDEIN_Collector": '"cm1.example.org:9618, cm2.example.org:9620"',
        "GLIDEIN_Lifetime": "3600", "GLIDEIN_Retire": "3000", "GLIDEIN_Max_Idle": "1200",
        "GLIDEIN_Credential_Margin": "300", "GLIDEIN_Listen": '"127.0.0.1"', "GLIDEIN_Start_Time": str(START),
        "GLIDEIN_CPUS": "4", "GLIDEIN_MaxMemMBs": "8000", "GLIDEIN_Site": '"ITB"', "GLIDEIN_Host_CPUS": "8",
        "GLIDEIN_Python_Version": '"3.11.7"',
        "GLIDEIN_ToRetire": str(START + 3000), "GLIDEIN_ToDie": str(START + 3600),
    }


def test_the_frontend_files_record_is_always_a_string_attribute(glide: Path, credential: Path) -> None:
    # A SHA-256 of digits and one "e" would otherwise be read as a real (and a huge one).
    numeric_looking = "1" * 30 + "e" + "2" * 33
    attributes = render(base_config(glide, credential, GLIDEIN_Client_Web="http://frontend.example.org/vo",
                                    GLIDEIN_Client_Description=numeric_looking,
                                    GLIDEIN_Other=numeric_looking))["startd"]["attributes"]
    assert attributes["GLIDEIN_Client_Web"] == '"http://frontend.example.org/vo"'
    assert attributes["GLIDEIN_Client_Description"] == f'"{numeric_looking}"'
    assert attributes["GLIDEIN_Other"] == numeric_looking  # other keys keep their literal typing


def test_one_cpu_makes_a_static_slot_and_no_cpus_means_the_whole_machine(glide: Path, credential: Path) -> None:
    one = render(base_config(glide, credential, GLIDEIN_CPUS="1"))["startd"]
    assert (one["cpus"], one["partitionable"]) == (1, False)
    whole = render(base_config(glide, credential))["startd"]
    assert (whole["cpus"], whole["memory"], whole["partitionable"]) == (0, 0, True)


def test_defaults_for_retire_idle_margin_and_listen(glide: Path, credential: Path) -> None:
    text = "".join(line + "\n" for line in base_config(glide, credential).splitlines()
                   if not line.startswith(("GLIDEIN_Retire=", "GLIDEIN_Max_Idle=", "GLIDEIN_Credential_Margin=",
                                           "GLIDEIN_Listen=")))
    startd = render(text)["startd"]
    assert startd["listen"] == "127.0.0.1:0"
    assert startd["max_idle"] == 1200
    assert startd["retire_after"] == 3240 - 100  # lifetime less 10%, from the batch job's start


def test_an_ipv6_listen_address_is_bracketed(glide: Path, credential: Path) -> None:
    assert render(base_config(glide, credential, GLIDEIN_Listen="::"))["startd"]["listen"] == "[::]:0"


def test_a_credential_expiring_before_the_lifetime_shortens_it(glide: Path, tmp_path: Path) -> None:
    short = pem_credential(tmp_path / "short.pem", NOW + 1000)
    config = render(base_config(glide, short))
    # min(lifetime end, expiry - margin) = NOW + 700; retiring at START + 3000 is later, so then too.
    assert (config["startd"]["max_lifetime"], config["startd"]["retire_after"]) == (700, 700)
    assert config["startd"]["attributes"]["GLIDEIN_ToDie"] == str(NOW + 700)
    assert config["startd"]["attributes"]["GLIDEIN_ToRetire"] == str(NOW + 700)


def test_the_chain_certificate_that_expires_first_counts(glide: Path, tmp_path: Path) -> None:
    cred = pem_credential(tmp_path / "proxy.pem", NOW + 86400, chain_not_after=NOW + 2000)
    assert inspect_credential(cred) == ("proxy", NOW + 2000)
    assert render(base_config(glide, cred))["startd"]["max_lifetime"] == 1700


def test_an_expired_credential_or_one_expiring_within_the_margin_is_refused(glide: Path, tmp_path: Path) -> None:
    expired = pem_credential(tmp_path / "expired.pem", NOW - 10)
    with pytest.raises(GlideinConfigError) as e:
        render(base_config(glide, expired))
    assert str(e.value) == (f"the credential {expired} expired at 2027-01-15 07:59:50 UTC: "
                            "the glidein must not start")
    soon = pem_credential(tmp_path / "soon.pem", NOW + 299)
    with pytest.raises(GlideinConfigError) as e:
        render(base_config(glide, soon))
    assert str(e.value) == (f"the credential {soon} expires at 2027-01-15 08:04:59 UTC, within "
                            "GLIDEIN_Credential_Margin (300 s): the glidein must not start")


def test_a_token_credential_is_presented_as_a_token_and_its_expiry_counts(glide: Path, tmp_path: Path) -> None:
    token = tmp_path / "pilot.token"
    token.write_text(tokens.create_token(b"k" * 32, "pilot@pool", "pool", ["ADVERTISE_STARTD"], 1300, now=NOW) + "\n")
    assert inspect_credential(token) == ("token", float(NOW + 1300))
    config = render(base_config(glide, token))
    assert config["pool"]["token"] == str(token) and "proxy" not in config["pool"]
    assert config["startd"]["max_lifetime"] == 1000
    garbage = tmp_path / "garbage"
    garbage.write_text("not a token\n")
    with pytest.raises(GlideinConfigError) as e:
        inspect_credential(garbage)
    assert str(e.value) == f"credential {garbage} is neither PEM nor a token: malformed token"


def test_a_missing_or_broken_credential_file_is_an_error(glide: Path, tmp_path: Path) -> None:
    with pytest.raises(GlideinConfigError) as e:
        render(base_config(glide, tmp_path / "nope.pem"))
    assert str(e.value) == f"credential file {tmp_path / 'nope.pem'} does not exist"
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n")
    with pytest.raises(GlideinConfigError) as e:
        render(base_config(glide, broken))
    assert str(e.value) == f"credential: {broken} holds a truncated or malformed PEM block"


def test_a_lifetime_already_over_is_refused(glide: Path, credential: Path) -> None:
    with pytest.raises(GlideinConfigError) as e:
        render(base_config(glide, credential), now=START + 3600)
    assert str(e.value) == "the glidein's lifetime (3600 s from 2027-01-15 07:58:20 UTC) has already run out"


def test_a_retire_time_already_past_retires_at_once(glide: Path, credential: Path) -> None:
    startd = render(base_config(glide, credential), now=START + 3500)["startd"]
    assert (startd["retire_after"], startd["max_lifetime"]) == (1, 100)  # 0 would mean "never"


@pytest.mark.parametrize("drop, message", [
    ("GLIDEIN_Name", "GLIDEIN_Name is not set"),
    ("GLIDEIN_Dir", "GLIDEIN_Dir is not set"),
    ("GLIDEIN_Credential", "GLIDEIN_Credential is not set"),
    ("GLIDEIN_Collector", "GLIDEIN_Collector is not set"),
    ("GLIDEIN_Lifetime", "GLIDEIN_Lifetime is not set"),
    ("GLIDEIN_Start_Time", "GLIDEIN_Start_Time is not set"),
    ("GLIDEIN_CA_File", "GLIDEIN_CA_File is not set (the description lists no ca file)"),
])
def test_missing_settings_are_named(glide: Path, credential: Path, drop: str, message: str) -> None:
    text = "".join(line + "\n" for line in base_config(glide, credential).splitlines()
                   if not line.startswith(drop + "="))
    with pytest.raises(GlideinConfigError) as e:
        render(text)
    assert str(e.value) == message


@pytest.mark.parametrize("key, value, message", [
    ("GLIDEIN_CPUS", "auto", "GLIDEIN_CPUS must be a whole number, got 'auto'"),
    ("GLIDEIN_Lifetime", "-5", "GLIDEIN_Lifetime must be a whole number, got '-5'"),
    ("GLIDEIN_Collector", " , ", "GLIDEIN_Collector names no collector"),
    ("GLIDEIN_Collector", "cm:99999", ("startd configuration: [pool] collectors bad port in address 'cm:99999' "
                                      "(got ['cm:99999'])")),
])
def test_bad_settings_are_named(glide: Path, credential: Path, key: str, value: str, message: str) -> None:
    with pytest.raises(GlideinConfigError) as e:
        render(base_config(glide, credential, **{key: value}))
    assert str(e.value) == message


def test_hostile_values_cannot_escape_their_toml_strings(glide: Path, credential: Path) -> None:
    evil_dn = '/O=evil"\n[security.ADMINISTRATOR]\nallow = ["*"]\n#\\'
    evil_site = 'x"\n[pool]\ncollectors = ["evil:1"]\n# \\" \x7f \x1b'
    config = parse_glidein_config(base_config(glide, credential, GLIDEIN_Site=evil_site.replace("\n", " ")))
    config = GlideinConfig(values={**config.values, "GLIDEIN_Name": evil_site},
                           trusted=(*config.trusted, evil_dn))
    out = startd_config_text(config, NOW)
    parsed = tomllib.loads(out)
    assert parsed["security"]["DAEMON"]["allow"] == [HOST_DN, evil_dn]
    assert "ADMINISTRATOR" not in parsed["security"]
    assert parsed["pool"]["collectors"] == ["cm1.example.org:9618", "cm2.example.org:9620"]
    assert parsed["startd"]["name"] == evil_site
    attribute = parsed["startd"]["attributes"]["GLIDEIN_Site"]
    assert value_of(attribute) == evil_site.replace("\n", " ")


# ------------------------------------------------------------------------------------------
# the command


def test_main_writes_the_file_and_reports_errors_in_one_line(glide: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # main() uses the real clock: a credential and a start time of now.
    credential = pem_credential(tmp_path / "now.pem", time.time() + 86400)
    config = glide / "glidein_config"
    config.write_text(base_config(glide, credential, GLIDEIN_Start_Time=str(int(time.time()))))
    out = glide / "startd.toml"
    assert main([str(config), str(out)]) == 0
    assert parse_config(out.read_text()).section("startd")["name"] == "glidein-7"
    assert [p.name for p in glide.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    config.write_text(base_config(glide, credential) + "broken line\n")
    assert main([str(config), str(glide / "other.toml")]) == 1
    assert capsys.readouterr().err == f"gwms glidein: {config}: line 16: expected KEY=VALUE, got 'broken line'\n"
    assert not (glide / "other.toml").exists()
    assert main([str(config)]) == 2
    assert capsys.readouterr().err == "usage: python -m gwms.glidein.startd_config GLIDEIN_CONFIG OUT\n"


def test_write_startd_config_replaces_the_file_atomically(glide: Path, credential: Path) -> None:
    config = glide / "glidein_config"
    config.write_text(base_config(glide, credential))
    out = glide / "startd.toml"
    out.write_text("old")
    assert write_startd_config(config, out, now=NOW) == out
    assert tomllib.loads(out.read_text())["startd"]["max_lifetime"] == 3500


def test_the_startd_keeps_the_pilot_credential_and_switches_identity_as_the_entry_says(
        glide: Path, credential: Path) -> None:
    startd = render(base_config(glide, credential))["startd"]
    assert (startd["identity_switch"], startd["pilot_credential"]) == ("none", str(credential))
    assert render(base_config(glide, credential, GLIDEIN_Identity_Switch="glexec"))["startd"]["identity_switch"] == \
        "glexec"
    with pytest.raises(GlideinConfigError) as e:
        render(base_config(glide, credential, GLIDEIN_Identity_Switch="sudo"))
    assert "GLIDEIN_Identity_Switch must be none, setuid or glexec, not 'sudo'" in str(e.value)


def test_an_entry_with_brokers_makes_a_startd_that_listens_on_no_port(glide: Path, credential: Path) -> None:
    pool = render(base_config(glide, credential, GLIDEIN_Brokers="gcb1.example.org:9630, gcb2.example.org:9630"))["pool"]
    assert pool["brokers"] == ["gcb1.example.org:9630", "gcb2.example.org:9630"] and pool["broker_only"] is True
    assert "brokers" not in render(base_config(glide, credential))["pool"]
