from pathlib import Path

import pytest

from gwms.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_static_pool_example_parses_with_paths_relative_to_the_file():
    config = load_config(ROOT / "conf" / "static-pool.toml")
    assert config.pool["ca"] == ROOT / "conf" / "creds" / "ca.pem"
    assert config.pool["collectors"] == [("127.0.0.1", 9618)]
    assert config.levels["READ"].allow == ("*",)
    assert config.section("collector")["listen"] == ("127.0.0.1", 9618)


def test_defaults_are_secure_for_everything_but_read():
    config = parse_config("")
    assert (config.levels["READ"].authentication, config.levels["READ"].encryption) == ("OPTIONAL", "OPTIONAL")
    for level in ("WRITE", "ADMINISTRATOR", "DAEMON", "NEGOTIATOR", "ADVERTISE_STARTD"):
        assert config.levels[level].authentication == "REQUIRED"
        assert config.levels[level].encryption == "REQUIRED"
        assert config.levels[level].allow == ()


def test_unknown_key_is_an_error_naming_key_and_file():
    with pytest.raises(ConfigError, match=r"site.toml: unknown key 'listn' in \[collector\]"):
        parse_config('[collector]\nlistn = "x"\n', source="site.toml")


def test_unknown_section_and_level_key_are_errors():
    with pytest.raises(ConfigError, match=r"unknown section \[colector\]"):
        parse_config("[colector]\n", source="site.toml")
    with pytest.raises(ConfigError, match=r"unknown key 'alow' in \[security.READ\]"):
        parse_config('[security.READ]\nalow = ["*"]\n', source="site.toml")


def test_bad_values_are_errors_that_say_what_was_expected():
    with pytest.raises(ConfigError, match=r"\[security.WRITE\] authentication must be one of"):
        parse_config('[security.WRITE]\nauthentication = "SOMETIMES"\n')
    with pytest.raises(ConfigError, match=r"\[pool\] max_frame_bytes must be an integer"):
        parse_config('[pool]\nmax_frame_bytes = "big"\n')
    with pytest.raises(ConfigError, match=r"bad port"):
        parse_config('[collector]\nlisten = "host:99999"\n')
    with pytest.raises(ConfigError, match=r"not valid TOML"):
        parse_config('[pool\n')
    with pytest.raises(ConfigError, match=r"allow_networks"):
        parse_config('[security.READ]\nallow_networks = ["not-a-net"]\n')


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "nope.toml")


def test_factory_entries_and_frontend_groups_are_named_tables_checked_key_by_key():
    config = parse_config('[factory.entry.ce1]\nattributes = { GLIDEIN_Site = "X" }\n'
                          'frontend_limits = { "fe" = { max_idle = 3, submit_rate = 1.5 } }\n'
                          '[frontend.group.main]\nmatch = "true"\n')
    entry = config.section("factory")["entry"]["ce1"]
    assert entry["grid"] == "local" and entry["attributes"] == {"GLIDEIN_Site": "X"}
    assert entry["frontend_limits"] == {"fe": {"max_idle": 3, "submit_rate": 1.5}}
    assert config.section("frontend")["group"]["main"]["idle_per_entry"] == 100
    assert parse_config("").section("factory")["entry"] == {}
    for text, message in (
            ("[factory.entry.ce1]\nmax_idel = 3\n", "unknown key 'max_idel' in [factory.entry.ce1]"),
            ("[factory.entry]\nce1 = 3\n", "[factory.entry] must hold tables, one per name"),
            ('[factory.entry.ce1]\nfrontend_limits = { "fe" = { max_idle = -1 } }\n',
             "entry 'fe' must be a table of max_glideins, max_idle, max_held"),
            ("[frontend.group.main]\nramp_up = \"fast\"\n", "[frontend.group.main] ramp_up must be an integer")):
        with pytest.raises(ConfigError) as e:
            parse_config(text)
        assert message in str(e.value)
