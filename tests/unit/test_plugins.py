"""The twistd plugin file: every role is found, and builds its service."""

from pathlib import Path

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from zope.interface.verify import verifyObject

ROOT = Path(__file__).resolve().parents[2]
ROLES = {"gwms-collector", "gwms-negotiator", "gwms-schedd", "gwms-startd", "gwms-factory", "gwms-frontend", "gwms-pool",
         "gwms-gcb"}


def test_every_role_is_a_twistd_plugin_that_builds_its_service(tmp_path):
    found = {p.tapname: p for p in getPlugins(IServiceMaker) if p.tapname.startswith("gwms-")}
    assert set(found) == ROLES
    config = tmp_path / "site.toml"
    config.write_text(f'[collector]\nlisten = "127.0.0.1:0"\n[schedd]\nspool = "{tmp_path}/spool"\n'
                      f'[startd]\nexecute = "{tmp_path}/execute"\n')
    for name, maker in found.items():
        assert verifyObject(IPlugin, maker) and verifyObject(IServiceMaker, maker)
        options = maker.options()
        options.parseOptions(["--config", str(config)])
        service = maker.makeService(options)
        assert IService.providedBy(service), name


def test_options_refuse_a_bad_config_with_a_readable_message(tmp_path):
    import pytest
    from twisted.python import usage

    maker = next(p for p in getPlugins(IServiceMaker) if p.tapname == "gwms-collector")
    bad = tmp_path / "bad.toml"
    bad.write_text("[collector]\nlistn = 1\n")
    with pytest.raises(usage.UsageError, match="unknown key 'listn' in \\[collector\\]"):
        maker.options().parseOptions(["--config", str(bad)])
    with pytest.raises(usage.UsageError, match="--config FILE is required"):
        maker.options().parseOptions([])


def test_plugin_directory_has_no_init_and_no_reactor_import():
    plugins = ROOT / "twisted" / "plugins"
    assert not (plugins / "__init__.py").exists()
    text = (plugins / "gwms_plugins.py").read_text()
    assert "reactor" not in text.replace("no reactor import", "")
