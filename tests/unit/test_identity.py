"""Identity switching: the mapping rules, the setuid and glexec plugins' launch specs, the stock
glexec helper's decisions, and the startd's side (shared identity, modes, accounting)."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from gwms import classads
from gwms.config import ConfigError, parse_config
from gwms.interfaces import IIdentitySwitch
from gwms.plugins import IDENTITY_SWITCHES, load_plugin
from gwms.plugins import glexec_helper as helper
from gwms.plugins.identity import (
    GlexecIdentitySwitch,
    GridMap,
    IdentityError,
    JobIdentity,
    NoIdentitySwitch,
    SetuidIdentitySwitch,
    hand_over,
    helper_environment,
    map_account,
    stock_helper_command,
)
from gwms.protocols.messages import CommandError
from gwms.schedd.mapping import MappingError, parse_grid_mapfile
from gwms.startd.service import Startd

import startd_fakes
from startd_fakes import FakeRequest, ad

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="as root: chown to other accounts")

ALICE_DN = "/O=gwms/OU=Users/CN=alice"
BOB_DN = "/O=gwms/OU=Users/CN=bob"

# A passwd of our own: the rules must not depend on the accounts of the machine running the tests.
ACCOUNTS = {
    "root": (0, 0), "toor": (0, 100), "wheelie": (1500, 0), "daemon": (1, 1), "svc": (999, 999),
    "nobody": (65534, 65534), "alice": (1001, 1001), "bob": (1002, 1002), "carol": (1003, 1003),
}


def _entry(name: str) -> pwd.struct_passwd:
    uid, gid = ACCOUNTS[name]
    return pwd.struct_passwd((name, "x", uid, gid, "", f"/home/{name}", "/bin/sh"))


@pytest.fixture
def passwd(monkeypatch):
    def getpwnam(name: str) -> pwd.struct_passwd:
        if name not in ACCOUNTS:
            raise KeyError(name)
        return _entry(name)

    monkeypatch.setattr("gwms.plugins.identity.pwd.getpwnam", getpwnam)
    monkeypatch.setattr("gwms.plugins.identity.os.getgrouplist",
                        lambda name, gid: [gid, 4000 + ACCOUNTS[name][0]])
    return getpwnam


def job(owner: str = "alice", dn: str | None = None, **extra: Any) -> classads.ClassAd:
    ad = classads.ClassAd()
    ad["Owner"] = owner
    ad["ClusterId"], ad["ProcId"] = 1, 0
    ad["Cmd"] = "/bin/true"
    if dn is not None:
        ad["x509UserProxySubject"] = dn
    for k, v in extra.items():
        ad[k] = v
    return ad


# -- the mapping rules ---------------------------------------------------------------------------

MAPPING = {ALICE_DN: "alice", BOB_DN: "carol", "dave": "bob", "/O=gwms/CN=admin": "root"}


def test_a_mapped_dn_wins_over_the_owner(passwd):
    assert map_account("alice", BOB_DN, MAPPING).pw_name == "carol"
    assert map_account("bob", ALICE_DN, MAPPING).pw_name == "alice"


def test_without_a_mapped_dn_the_owner_line_then_the_owner_itself(passwd):
    assert map_account("dave", None, MAPPING).pw_name == "bob"  # 'dave bob'
    assert map_account("alice", None, MAPPING).pw_name == "alice"  # a local account
    assert map_account("alice", "/O=gwms/CN=stranger", MAPPING).pw_name == "alice"  # DN unmapped: Owner


@pytest.mark.parametrize("owner, dn, why", [
    ("root", None, "refusing to run a job as root"),
    ("admin", "/O=gwms/CN=admin", "refusing to run a job as root"),  # a DN mapped to root
    ("toor", None, "uid 0"),
    ("wheelie", None, "primary group is 0"),
    ("daemon", None, "system account 'daemon' (uid 1 is below 1000)"),
    ("svc", None, "system account 'svc' (uid 999 is below 1000)"),
    ("nobody", None, "overflow uid"),
    ("mallory", None, "no local account 'mallory'"),
    ("mallory", "/O=gwms/CN=stranger", "the job's DN /O=gwms/CN=stranger is not in the grid-mapfile"),
    ("", None, "neither an Owner nor a mapped proxy DN"),
    ("-alice", None, "not a local account name"),
])
def test_refusals(passwd, owner, dn, why):
    with pytest.raises(IdentityError) as e:
        map_account(owner, dn, MAPPING)
    assert why in str(e.value)


def test_the_system_account_limit_is_configurable(passwd):
    assert map_account("svc", None, {}, min_uid=500).pw_uid == 999
    with pytest.raises(IdentityError):
        map_account("daemon", None, {}, min_uid=500)
    with pytest.raises(IdentityError, match="root"):
        map_account("root", None, {}, min_uid=0)  # root never, whatever the limit


def test_the_worker_grid_mapfile_holds_dn_and_owner_lines_and_the_schedds_only_dns():
    text = f'# worker\n"{ALICE_DN}" alice\n"{BOB_DN}" carol,bob\ndave bob\n'
    assert parse_grid_mapfile(text, owners=True) == {ALICE_DN: "alice", BOB_DN: "carol", "dave": "bob"}
    with pytest.raises(MappingError, match="expected '\"DN\" user'"):
        parse_grid_mapfile(text)
    with pytest.raises(MappingError, match=r"<grid-mapfile>:1: expected .* or 'owner account'"):
        parse_grid_mapfile("Not/An/Owner alice\n", owners=True)


def test_the_grid_mapfile_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "grid-mapfile"
    path.write_text("dave alice\n")
    grid = GridMap(path)
    assert grid.get() == {"dave": "alice"}
    path.write_text("dave bob\nerin carol\n")
    assert grid.get() == {"dave": "bob", "erin": "carol"}
    path.write_text("bad line here\n")
    with pytest.raises(IdentityError, match="bad grid-mapfile"):
        grid.get()
    path.unlink()
    with pytest.raises(IdentityError, match="cannot read the grid-mapfile"):
        grid.get()
    assert GridMap(None).get() == {}


# -- setuid ----------------------------------------------------------------------------------------

def test_setuid_prepares_a_root_sandbox_and_launches_as_the_account(passwd, tmp_path, monkeypatch):
    switch = SetuidIdentitySwitch(min_uid=1000)
    assert verifyObject(IIdentitySwitch, switch) and switch.name == "setuid"
    sandbox = tmp_path / "dir_1"
    sandbox.mkdir(mode=0o755)
    identity = switch.prepare_sandbox(job("alice", ALICE_DN), sandbox)
    assert identity == JobIdentity(uid=1001, gid=1001, user="alice", groups=(1001, 5001), dn=ALICE_DN)
    assert stat.S_IMODE(sandbox.stat().st_mode) == 0o700 and sandbox.stat().st_uid == os.geteuid()
    handed = []
    monkeypatch.setattr("gwms.plugins.identity.hand_over", lambda box, uid, gid: handed.append((box, uid, gid)))
    spec = switch.launch(job("alice", ALICE_DN), ["/bin/sh", "-c", "id"], {"PATH": "/bin", "LD_PRELOAD": "x"}, sandbox)
    assert (spec.uid, spec.gid, spec.groups) == (1001, 1001, (1001, 5001))
    assert spec.argv == ("/bin/sh", "-c", "id") and spec.env == {"PATH": "/bin", "LD_PRELOAD": "x"}
    assert handed == [(sandbox, 1001, 1001)]
    with pytest.raises(IdentityError, match="as root"):
        switch.prepare_sandbox(job("root"), tmp_path)
    with pytest.raises(IdentityError, match="no local account 'mallory'"):
        switch.check_job(job("mallory"))


@as_root
def test_the_sandbox_is_handed_over_without_following_links(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("root's")
    box = tmp_path / "dir_1"
    box.mkdir(mode=0o700)
    (box / "input.txt").write_text("in")
    (box / "link").symlink_to(outside)
    os.link(outside, box / "hardlink")  # two links: never ours to give away
    (box / "someone_elses").write_text("x")
    os.chown(box / "someone_elses", 2222, 2222)
    hand_over(box, 1234, 1235)
    assert (box.stat().st_uid, box.stat().st_gid, stat.S_IMODE(box.stat().st_mode)) == (1234, 1235, 0o700)
    assert (box / "input.txt").stat().st_uid == 1234
    assert outside.stat().st_uid == os.geteuid()  # neither through the link nor the hard link
    assert (box / "link").lstat().st_uid == os.geteuid()
    assert (box / "someone_elses").stat().st_uid == 2222


def _config(tmp_path: Path, text: str = "") -> Any:
    return parse_config(f'[pool]\nca = "{tmp_path}/ca.pem"\n[startd]\nexecute = "{tmp_path}/execute"\n{text}',
                        str(tmp_path / "host.toml"))


def test_the_plugins_are_registered_and_need_a_root_startd(tmp_path, monkeypatch):
    assert IDENTITY_SWITCHES["setuid"] == "gwms.plugins.identity:SetuidIdentitySwitch"
    assert IDENTITY_SWITCHES["glexec"] == "gwms.plugins.identity:GlexecIdentitySwitch"
    monkeypatch.setattr("gwms.plugins.identity.os.geteuid", lambda: 0)
    (tmp_path / "map").write_text(f'"{ALICE_DN}" alice\n')
    config = _config(tmp_path, f'grid_mapfile = "{tmp_path}/map"\n')
    setuid = load_plugin("identity switch", "setuid", IDENTITY_SWITCHES, IIdentitySwitch, config)
    assert setuid.name == "setuid" and setuid.grid_map.get() == {ALICE_DN: "alice"} and setuid.min_uid == 1000
    glexec = load_plugin("identity switch", "glexec", IDENTITY_SWITCHES, IIdentitySwitch, config)
    assert glexec.command == tuple(stock_helper_command(tmp_path / "map", tmp_path / "ca.pem"))
    assert glexec.command[:3] == (sys.executable, "-I", str(Path(helper.__file__)))
    custom = _config(tmp_path, 'glexec_command = ["/usr/sbin/glexec"]\n')
    assert load_plugin("identity switch", "glexec", IDENTITY_SWITCHES, IIdentitySwitch, custom).command == (
        "/usr/sbin/glexec",)
    (tmp_path / "map").write_text("this is not a mapping\n")
    with pytest.raises(ConfigError, match="grid_mapfile"):
        load_plugin("identity switch", "setuid", IDENTITY_SWITCHES, IIdentitySwitch, config)
    monkeypatch.setattr("gwms.plugins.identity.os.geteuid", lambda: 1000)
    for name in ("setuid", "glexec"):
        with pytest.raises(ConfigError, match=f"identity_switch = {name} needs a startd running as root"):
            load_plugin("identity switch", name, IDENTITY_SWITCHES, IIdentitySwitch, _config(tmp_path))


# -- glexec ------------------------------------------------------------------------------------------

def test_only_harmless_variables_reach_the_helper_the_rest_travels_renamed():
    env = {"PATH": "/usr/bin", "HOME": "/sb", "LC_ALL": "C", "GWMS_JOB_MARKER": "m", "LD_PRELOAD": "/sb/evil.so",
           "LD_LIBRARY_PATH": "/opt/lib", "OPENSSL_CONF": "/sb/o.cnf", "GREETING": "hi there",
           "GLEXEC_CLIENT_CERT": "/home/bob/proxy", "GWMS_GLEXEC_SAVED_X": "forged", "BASH_FUNC_f%%": "() { :; }"}
    out, dropped = helper_environment(env, "/sb/.x509up", "alice")
    assert out == {
        "PATH": "/usr/bin", "HOME": "/sb", "LC_ALL": "C", "GWMS_JOB_MARKER": "m",
        "GWMS_GLEXEC_SAVED_LD_PRELOAD": "/sb/evil.so", "GWMS_GLEXEC_SAVED_LD_LIBRARY_PATH": "/opt/lib",
        "GWMS_GLEXEC_SAVED_OPENSSL_CONF": "/sb/o.cnf", "GWMS_GLEXEC_SAVED_GREETING": "hi there",
        "GWMS_GLEXEC_SAVED": "LD_PRELOAD LD_LIBRARY_PATH OPENSSL_CONF GREETING",
        "GLEXEC_CLIENT_CERT": "/sb/.x509up", "GLEXEC_SOURCE_PROXY": "/sb/.x509up", "GWMS_JOB_OWNER": "alice"}
    assert sorted(dropped) == ["BASH_FUNC_f%%", "GLEXEC_CLIENT_CERT", "GWMS_GLEXEC_SAVED_X"]
    out, _ = helper_environment({"PATH": "/bin"}, None, "bob")
    assert out == {"PATH": "/bin", "GWMS_JOB_OWNER": "bob"}


def test_glexec_launches_the_helper_in_front_of_the_job_without_switching_itself(passwd, tmp_path, monkeypatch):
    switch = GlexecIdentitySwitch(["/opt/glexec", "--"])
    assert verifyObject(IIdentitySwitch, switch) and switch.name == "glexec"
    monkeypatch.setattr("gwms.plugins.identity.hand_over", lambda box, uid, gid: None)
    box = tmp_path / "dir_1"
    box.mkdir()
    (box / ".x509up").write_text("proxy")
    (box / "mine.pem").write_text("proxy")
    (tmp_path / "elsewhere.pem").write_text("proxy")
    assert switch.prepare_sandbox(job("alice"), box).user == "alice"
    spec = switch.launch(job("alice"), ["job.sh", "a"], {"PATH": "/bin", "X509_USER_PROXY": str(box / ".x509up")}, box)
    assert spec.argv == ("/opt/glexec", "--", "job.sh", "a")
    assert (spec.uid, spec.gid, spec.groups) == (None, None, None)
    assert spec.env["GLEXEC_CLIENT_CERT"] == spec.env["GLEXEC_SOURCE_PROXY"] == str(box / ".x509up")
    assert spec.env["GWMS_JOB_OWNER"] == "alice" and spec.env["X509_USER_PROXY"] == str(box / ".x509up")
    # The proxy the helper reads (as root) must be a file in the sandbox, never one elsewhere.
    path = switch.proxy_path
    assert path(job(), {"X509_USER_PROXY": "mine.pem"}, box) == str(box / "mine.pem")
    assert path(job(), {"X509_USER_PROXY": str(tmp_path / "elsewhere.pem")}, box) is None
    assert path(job(), {"X509_USER_PROXY": "../elsewhere.pem"}, box) is None
    assert path(job(x509userproxy="/home/alice/mine.pem"), {}, box) == str(box / "mine.pem")
    assert path(job(x509userproxy="/home/alice/absent.pem"), {}, box) is None
    (box / "link.pem").symlink_to(tmp_path / "elsewhere.pem")
    assert path(job(), {"X509_USER_PROXY": "link.pem"}, box) is None


# -- the stock helper ---------------------------------------------------------------------------------

def test_helper_arguments():
    assert helper.parse_arguments(["--grid-mapfile", "/m", "--ca=/ca", "--min-uid", "500", "--", "-x", "y"]) == (
        {"grid-mapfile": "/m", "ca": "/ca", "min-uid": "500"}, ["-x", "y"])
    assert helper.parse_arguments(["/bin/id", "-u"]) == ({}, ["/bin/id", "-u"])
    for bad, why in ((["--"], "no command"), (["--ca"], "needs a value"), (["--bogus", "x"], "unknown option")):
        with pytest.raises(helper.Refused, match=why):
            helper.parse_arguments(bad)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from gwms.credentials import ca as ca_tools
    from gwms.credentials import x509

    base = tmp_path_factory.mktemp("pki")
    ca_tools.init_ca(base / "ca", name="gwms test CA")
    ca_tools.init_ca(base / "other", name="some other CA")
    proxies = {}
    for name, where in (("alice", "ca"), ("bob", "ca"), ("forged-alice", "other")):
        cert, key = ca_tools.issue_user(base / where, name.split("-")[-1])
        proxy = x509.create_proxy(x509.load_credential(cert, key), hours=1, key_bits=2048)
        x509.write_credential(base / f"{name}.proxy", proxy)
        proxies[name] = str(base / f"{name}.proxy")
    return {"ca": str(base / "ca" / "ca.pem"), **proxies}


def test_helper_maps_the_verified_proxy_dn_else_the_owner(passwd, tmp_path, pki):
    mapfile = tmp_path / "map"
    mapfile.write_text(f'"{ALICE_DN}" alice\n"{BOB_DN}" carol\ndave bob\n')
    options = {"grid-mapfile": str(mapfile), "ca": pki["ca"]}
    account, dn = helper.decide(options, {"GLEXEC_CLIENT_CERT": pki["bob"], "GWMS_JOB_OWNER": "alice"})
    assert (account.pw_name, dn) == ("carol", BOB_DN)
    account, dn = helper.decide(options, {"GLEXEC_SOURCE_PROXY": pki["alice"], "GWMS_JOB_OWNER": "x"})
    assert (account.pw_name, dn) == ("alice", ALICE_DN)
    assert helper.decide(options, {"GWMS_JOB_OWNER": "dave"})[0].pw_name == "bob"
    with pytest.raises(helper.Refused, match="does not verify"):  # alice's DN, another CA
        helper.decide(options, {"GLEXEC_CLIENT_CERT": pki["forged-alice"], "GWMS_JOB_OWNER": "alice"})
    with pytest.raises(helper.Refused, match="no CA"):
        helper.decide({"grid-mapfile": str(mapfile)}, {"GLEXEC_CLIENT_CERT": pki["alice"]})
    with pytest.raises(helper.Refused, match="as root"):
        helper.decide(options, {"GWMS_JOB_OWNER": "root"})
    with pytest.raises(helper.Refused, match="no local account 'mallory'"):
        helper.decide(options, {"GWMS_JOB_OWNER": "mallory"})
    (tmp_path / "link").symlink_to(pki["alice"])
    with pytest.raises(helper.Refused, match="cannot read the proxy"):
        helper.decide(options, {"GLEXEC_CLIENT_CERT": str(tmp_path / "link")})


@as_root
def test_helper_switches_with_setpriv_in_its_accounts_sandbox_only(passwd, tmp_path, monkeypatch, capsys):
    box = tmp_path / "dir_1"
    box.mkdir()
    monkeypatch.chdir(box)
    monkeypatch.setenv("GWMS_JOB_OWNER", "alice")
    monkeypatch.delenv("GLEXEC_CLIENT_CERT", raising=False)
    monkeypatch.delenv("GLEXEC_SOURCE_PROXY", raising=False)
    monkeypatch.setenv("GWMS_GLEXEC_SAVED", "LD_LIBRARY_PATH")
    monkeypatch.setenv("GWMS_GLEXEC_SAVED_LD_LIBRARY_PATH", "/opt/lib")
    execs = []

    def execve(path, argv, env):
        execs.append((argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(helper.os, "execve", execve)
    # The sandbox is root's, not alice's: refused.
    assert helper.main(["--", "/bin/id", "-u"]) == 126
    assert "belongs to uid 0: refusing to run it there" in capsys.readouterr().err
    os.chown(box, 1001, 1001)
    monkeypatch.setattr(helper.shutil, "which", lambda name, path: f"/usr/bin/{name}")
    with pytest.raises(SystemExit):
        helper.main(["--", "/bin/id", "-u"])
    argv, env = execs[-1]
    assert argv == ["/usr/bin/setpriv", "--reuid=1001", "--regid=1001", "--init-groups", "--",
                    "/bin/sh", "-c", helper.RESTORE, "gwms-glexec", "LD_LIBRARY_PATH", "--", "/bin/id", "-u"]
    assert "GWMS_GLEXEC_SAVED" not in env and env["GWMS_GLEXEC_SAVED_LD_LIBRARY_PATH"] == "/opt/lib"
    # No setpriv: runuser, keeping the environment (-p).
    monkeypatch.setattr(helper.shutil, "which", lambda name, path: "/usr/sbin/runuser" if name == "runuser" else None)
    monkeypatch.delenv("GWMS_GLEXEC_SAVED")
    with pytest.raises(SystemExit):
        helper.main(["/bin/id"])
    assert execs[-1][0] == ["/usr/sbin/runuser", "-p", "-u", "alice", "--", "/bin/id"]
    monkeypatch.setenv("GWMS_GLEXEC_SAVED", "LD_X;reboot")
    assert helper.main(["/bin/id"]) == 126
    assert "not a variable name" in capsys.readouterr().err


def test_helper_refuses_unless_root(monkeypatch, capsys):
    monkeypatch.setattr(helper.os, "geteuid", lambda: 1000)
    assert helper.main(["/bin/true"]) == 126
    assert capsys.readouterr().err == "gwms-glexec: must run as root to switch identity (runs as uid 1000)\n"


def test_the_restore_stage_gives_the_saved_variables_back_exactly():
    value = "a b\n$HOME `x` 'q'"
    env = {"PATH": "/usr/bin:/bin", "GWMS_GLEXEC_SAVED_LD_FOO": value, "GWMS_GLEXEC_SAVED_GREETING": "hi"}
    out = subprocess.run(["/bin/sh", "-c", helper.RESTORE, "gwms-glexec", "LD_FOO", "GREETING", "--",
                          "/bin/sh", "-c", 'printf "%s|%s|" "$LD_FOO" "$GREETING"; env | grep -c GWMS_ || true'],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout == f"{value}|hi|0\n"


# -- the startd's side ---------------------------------------------------------------------------------

class FakeProcess(startd_fakes.FakeProcess):
    """The startd's fake job process, which also asks the identity switch how it would launch."""

    def __init__(self, reactor, switch, job, argv, env, sandbox, stdin, stdout, stderr, marker):
        super().__init__(reactor, switch, job, argv, env, sandbox, stdin, stdout, stderr, marker)
        self.spec = switch.launch(job, argv, env, sandbox)


@pytest.fixture
def logged():
    events: list[tuple[str, str]] = []

    def observe(event: dict) -> None:
        events.append((event.get("log_level").name if event.get("log_level") else "", formatEvent(event)))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def startd(tmp_path, switch=None, text=""):
    clock = MemoryReactorClock()
    config = parse_config(f'[startd]\nexecute = "{tmp_path}/execute"\ncpus = 2\nmemory = 4000\ndisk = 100000\n'
                          f'name = "wn"\nslots = 2\n{text}')
    s = Startd(clock, config, switch or NoIdentitySwitch(), process_factory=FakeProcess)
    s.address = "127.0.0.1:1"
    return clock, s


def claim(s, owner, slot="slot1@wn", **extra):
    cap = s.slot_ad(s.slots[slot])["ClaimId"]
    return s.request_claim(FakeRequest(ad(ClaimId=cap, JobAd=job(owner, **extra), Schedd="schedd")))["ClaimId"]


def run(s, claim_id, owner, **extra):
    s.activate(FakeRequest(ad(ClaimId=claim_id, JobAd=job(owner, **extra))))
    s.start_job(FakeRequest(ad(ClaimId=claim_id)))
    return s.claim_for(FakeRequest(ad(ClaimId=claim_id)))


def test_none_refuses_a_second_owner_and_restricts_start_to_the_first(tmp_path, logged):
    _clock, s = startd(tmp_path)
    assert not [m for level, m in logged if level == "warn"]
    alice = claim(s, "alice")
    # While alice holds a claim, the other slot takes her jobs only.
    with pytest.raises(CommandError) as e:
        claim(s, "bob", "slot2@wn")
    assert e.value.code == "SHARED_IDENTITY"
    assert "read, change and kill the other's files and processes" in e.value.message
    assert "allow_shared_identity" in e.value.message
    c = run(s, alice, "alice")
    c.starter.process.end(0)
    status = s._status(c)
    assert status["RemoteAccount"] == pwd.getpwuid(os.geteuid()).pw_name and "RemoteAccountDN" not in status
    s.release(c)
    # Once alice's job ran, her jobs only, on every slot, even with no claim left.
    for slot in s.slots.values():
        start_ad = s.slot_ad(slot)
        assert classads.symmetric_match(job("alice"), start_ad)
        assert not classads.symmetric_match(job("bob"), start_ad)
    with pytest.raises(CommandError) as e:
        claim(s, "bob")
    assert e.value.code == "SHARED_IDENTITY"
    assert run(s, claim(s, "alice"), "alice").starter is not None


def test_allow_shared_identity_runs_both_and_warns_once_at_start(tmp_path, logged):
    _clock, s = startd(tmp_path, text="allow_shared_identity = true\n")
    warnings = [m for level, m in logged if level == "warn"]
    assert len(warnings) == 1
    assert "each job can read, change and kill the other users' files and processes" in warnings[0]
    for slot, owner in (("slot1@wn", "alice"), ("slot2@wn", "bob")):
        c = run(s, claim(s, owner, slot), owner)
        assert c.starter is not None
    assert classads.symmetric_match(job("carol"), s.slot_ad(s.slots["slot1@wn"]))
    assert len([m for level, m in logged if level == "warn"]) == 1


class RefusingSwitch(NoIdentitySwitch):
    name = "refusing"

    def check_job(self, job):
        if job.get("Owner") == "root":
            raise IdentityError("refusing to run a job as root")

    def prepare_sandbox(self, job, sandbox):
        if job.get("Owner") == "late":
            raise IdentityError("the account of 'late' went away")
        return super().prepare_sandbox(job, sandbox)


def test_a_switchs_refusal_is_a_clear_error_at_claim_and_activation(tmp_path):
    _clock, s = startd(tmp_path, RefusingSwitch())
    with pytest.raises(CommandError) as e:
        claim(s, "root")
    assert e.value.code == "IDENTITY_REFUSED" and "as root" in e.value.message
    assert s.slots["slot1@wn"].state == "Unclaimed"
    late = claim(s, "late")
    with pytest.raises(CommandError) as e:
        s.activate(FakeRequest(ad(ClaimId=late, JobAd=job("late"))))
    assert e.value.code == "IDENTITY_REFUSED" and "went away" in e.value.message
    assert os.listdir(tmp_path / "execute") == []  # the sandbox it had made is gone
    # Different owners on one startd: fine for a switch that gives each its own account.
    assert run(s, claim(s, "bob", "slot2@wn"), "bob").starter is not None


@as_root
def test_setuid_startd_reports_the_account_and_dn_and_hands_the_sandbox_over(passwd, tmp_path):
    _clock, s = startd(tmp_path, SetuidIdentitySwitch())
    c = run(s, claim(s, "alice", x509UserProxySubject=ALICE_DN), "alice", x509UserProxySubject=ALICE_DN)
    box = c.starter.sandbox
    assert (box.stat().st_uid, stat.S_IMODE(box.stat().st_mode)) == (1001, 0o700)
    assert (box / ".job.ad").stat().st_uid == 1001
    assert c.starter.process.spec.uid == 1001
    c.starter.process.end(0)
    status = s._status(c)
    assert (status["RemoteAccount"], status["RemoteAccountDN"]) == ("alice", ALICE_DN)
    # bob, on the same startd, is fine: his own account.
    assert run(s, claim(s, "bob", "slot2@wn"), "bob").starter.identity.user == "bob"
    s.release(c)
    with pytest.raises(CommandError) as e:
        claim(s, "daemon")
    assert e.value.code == "IDENTITY_REFUSED" and "system account" in e.value.message


@as_root
def test_startd_secures_the_execute_dir_and_the_pilot_credential(tmp_path, logged):
    execute = tmp_path / "execute"
    execute.mkdir()
    execute.chmod(0o777)
    pilot = tmp_path / "pilot.pem"
    pilot.write_text("secret")
    pilot.chmod(0o644)
    startd(tmp_path, SetuidIdentitySwitch(), f'pilot_credential = "{pilot}"\n')
    assert stat.S_IMODE(execute.stat().st_mode) == 0o755
    assert stat.S_IMODE(pilot.stat().st_mode) == 0o600
    assert any("now 0600" in m for level, m in logged if level == "warn")
    execute.chmod(0o700)
    startd(tmp_path, SetuidIdentitySwitch())
    assert stat.S_IMODE(execute.stat().st_mode) == 0o711  # the jobs' accounts must reach their sandboxes
    os.chown(pilot, 2222, 2222)
    with pytest.raises(ConfigError, match="belongs to uid 2222"):
        startd(tmp_path, SetuidIdentitySwitch(), f'pilot_credential = "{pilot}"\n')
    os.chown(execute, 2222, 2222)
    with pytest.raises(ConfigError, match="could replace the jobs' sandboxes"):
        startd(tmp_path, SetuidIdentitySwitch())
    startd(tmp_path)  # none: the startd's own user runs the jobs anyway; a warning only


def test_the_schedd_records_the_account_a_job_ran_as(tmp_path):
    from gwms.testing.pool import MemoryPool

    clock = MemoryReactorClock()
    clock.advance(1_700_000_000)
    with MemoryPool(clock, tmp_path / "pool", slots=1) as pool:
        cluster = pool.submit("alice", "executable = /bin/echo\ntransfer_executable = false\nqueue\n")
        pool.run_until(lambda: pool.status(f"{cluster}.0") == 4, 120, "the job to complete")
        (done,) = pool.history(projection=["RemoteAccount"])
    assert done["RemoteAccount"] == pwd.getpwuid(os.geteuid()).pw_name
