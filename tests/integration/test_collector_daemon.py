"""A real ``twistd -n gwms-collector`` on 127.0.0.1, real TLS, credentials from a test CA."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import socket
import struct
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from gwms import classads
from gwms.config import parse_config
from gwms.protocols.client import Address, ClientSecurity, CollectorList, DaemonClient, connect, query_ads
from gwms.protocols.framing import FrameDecoder, encode_frame
from gwms.protocols.messages import CommandError, ConnectionFailed
from gwms.testing.polling import wait_until


HOST_DN = "/O=gwms/OU=Hosts/CN=localhost"

COLLECTOR_CONFIG = """
[pool]
name = "itest"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
token_signing_key = "{signing_key}"
audit_log = "audit.jsonl"
max_frame_bytes = 65536

[security]
methods = ["x509", "token", "fs", "anonymous"]

[security.READ]
allow = ["*"]

[security.ADVERTISE_MASTER]
allow_regex = ["/O=gwms/OU=Users/CN=.*"]
allow = ["fs:{user}"]
deny_regex = [".*/CN=mallory"]

[security.ADVERTISE_STARTD]
allow = ["{host}", "token:startd-token"]

[security.ADVERTISE_SCHEDD]
allow = ["{host}"]
deny_networks = ["127.0.0.0/8"]

[security.ADMINISTRATOR]
allow = ["{host}"]

[security.NEGOTIATOR]
allow = ["{host}"]

[collector]
listen = "127.0.0.1:0"
unix_socket = "collector.sock"
address_file = "collector.address"
"""

CLIENT_CONFIG = """
[pool]
name = "itest"
ca = "{ca}"
{credential}
[security]
methods = ["x509", "token", "fs", "anonymous"]
"""


@pytest.fixture
def collector(creds, tmp_path, start_daemon):
    config = tmp_path / "collector.toml"
    config.write_text(COLLECTOR_CONFIG.format(ca=creds.ca, cert=creds.host_cert, key=creds.host_key,
                                              signing_key=creds.signing_key, host=HOST_DN,
                                              user=getpass.getuser()))
    daemon = start_daemon("collector", config, tmp_path)
    daemon.audit = tmp_path / "audit.jsonl"
    daemon.socket = tmp_path / "collector.sock"
    return daemon


def security(creds, tmp_path, *, cert=None, key=None, proxy=None, token=None):
    lines = []
    if cert:
        lines += [f'cert = "{cert}"', f'key = "{key}"']
    if proxy:
        lines.append(f'proxy = "{proxy}"')
    if token:
        path = tmp_path / f"token-{abs(hash(token))}"
        path.write_text(token)
        lines.append(f'token = "{path}"')
    text = CLIENT_CONFIG.format(ca=creds.ca, credential="\n".join(lines))
    return ClientSecurity.from_config(parse_config(text))


def host_security(creds, tmp_path):
    return security(creds, tmp_path, cert=creds.host_cert, key=creds.host_key)


def ad(text):
    return classads.parse_new(text)


def audit_events(daemon):
    if not daemon.audit.exists():
        return []
    return [json.loads(line) for line in daemon.audit.read_text().splitlines() if line.strip()]


def wait_for_audit(daemon, predicate, what):
    return wait_until(lambda: [e for e in audit_events(daemon) if predicate(e)], 10, what)


SLOT = '[MyType = "Machine"; Name = "slot1@localhost"; Machine = "localhost"; OpSys = "LINUX"; ' \
       'Arch = "X86_64"; State = "Unclaimed"; Activity = "Idle"; Cpus = 2; Memory = 2048; ClaimId = "s3cret"]'


@pytest_twisted.inlineCallbacks
def test_authenticated_daemon_advertises_and_gwms_status_shows_it(collector, creds, tmp_path, gwms_cli):
    collectors = CollectorList(reactor, [Address.parse(collector.address)], host_security(creds, tmp_path))
    [reply] = yield collectors.advertise(ad(SLOT), "ADVERTISE_STARTD")
    collectors.close()
    if hasattr(reply, "raiseException"):
        reply.raiseException()
    assert reply["Accepted"] is True

    table = gwms_cli("status", "--pool", collector.address)
    assert table.returncode == 0, table.stderr
    assert "slot1@localhost" in table.stdout and "Unclaimed" in table.stdout
    assert "Total: 1" in table.stdout

    long = gwms_cli("status", "--pool", collector.address, "--long")
    assert f'AuthenticatedIdentity = "{HOST_DN}"' in long.stdout
    assert "ClaimId" not in long.stdout  # private: only NEGOTIATOR-level queries see it

    as_json = json.loads(gwms_cli("status", "--pool", collector.address, "--json").stdout)
    assert as_json[0]["Name"] == "slot1@localhost" and as_json[0]["Cpus"] == 2

    fmt = gwms_cli("status", "--pool", collector.address, "--format", "%s:", "Name", "--format", "%d\\n", "Cpus")
    assert fmt.stdout == "slot1@localhost:2\n"

    constrained = gwms_cli("status", "--pool", collector.address, "--constraint", "Cpus > 4")
    assert "Total: 0" in constrained.stdout

    everything = gwms_cli("status", "--pool", collector.address, "--any")
    assert "Collector" in everything.stdout and "Machine" in everything.stdout


@pytest_twisted.inlineCallbacks
def test_negotiator_reads_private_attributes(collector, creds, tmp_path):
    collectors = CollectorList(reactor, [Address.parse(collector.address)], host_security(creds, tmp_path))
    yield collectors.advertise(ad(SLOT), "ADVERTISE_STARTD")
    [private] = yield query_ads(collectors, "Machine", private=True)
    collectors.close()
    assert private["ClaimId"] == "s3cret"


@pytest_twisted.inlineCallbacks
def test_anonymous_client_can_read_and_cannot_write(collector, creds, tmp_path):
    client = DaemonClient(reactor, Address.parse(collector.address), security(creds, tmp_path))
    final, items = yield client.call("QUERY", ad('[TargetType = "Collector"]'), "READ", stream=True)
    assert final["Count"] == 1
    with pytest.raises(CommandError) as e:
        yield client.call("UPDATE", ad('[MyType = "Generic"; Name = "x"]'), "ADVERTISE_MASTER")
    client.close()
    assert e.value.code == "PERMISSION_DENIED"
    assert "anonymous identities may only READ" in e.value.message
    wait_for_audit(collector, lambda e: e["identity"] == "anonymous" and e["command"] == "UPDATE"
                   and not e["allowed"], "the audit of the refused anonymous UPDATE")


@pytest_twisted.inlineCallbacks
def test_certificate_from_another_ca_is_refused_and_audited(collector, creds, tmp_path):
    cert, key = creds.other_user
    sec = security(creds, tmp_path, cert=cert, key=key)
    with pytest.raises(ConnectionFailed) as e:
        yield connect(reactor, Address.parse(collector.address), "ADVERTISE_MASTER", sec)
    assert "unknown ca" in str(e.value).lower() or "certificate" in str(e.value).lower()
    events = wait_for_audit(collector, lambda e: e["command"] == "AUTHENTICATE" and "TLS handshake failed"
                            in e["rule"], "the audit of the refused certificate")
    assert events[0]["allowed"] is False and events[0]["method"] == "x509"
    assert "certificate verify failed" in events[0]["rule"]


@pytest_twisted.inlineCallbacks
def test_dn_denied_by_regex_is_refused_and_audited(collector, creds, tmp_path):
    cert, key = creds.users["mallory"]
    client = DaemonClient(reactor, Address.parse(collector.address), security(creds, tmp_path, cert=cert, key=key))
    with pytest.raises(CommandError) as e:
        yield client.call("UPDATE", ad('[MyType = "Generic"; Name = "m"]'), "ADVERTISE_MASTER")
    client.close()
    assert e.value.code == "PERMISSION_DENIED"
    [event] = wait_for_audit(collector, lambda e: e["identity"].endswith("CN=mallory") and e["command"] == "UPDATE",
                             "mallory's audit event")
    assert event["allowed"] is False and event["rule"] == "deny_regex[ADVERTISE_MASTER] '.*/CN=mallory'"


@pytest_twisted.inlineCallbacks
def test_denied_network_is_refused_and_audited(collector, creds, tmp_path):
    client = DaemonClient(reactor, Address.parse(collector.address), host_security(creds, tmp_path))
    with pytest.raises(CommandError) as e:
        yield client.call("UPDATE", ad('[MyType = "Scheduler"; Name = "schedd@localhost"]'), "ADVERTISE_SCHEDD")
    client.close()
    assert "deny_networks[ADVERTISE_SCHEDD] 127.0.0.0/8" in e.value.message
    wait_for_audit(collector, lambda e: e["rule"] == "deny_networks[ADVERTISE_SCHEDD] 127.0.0.0/8",
                   "the audit of the blocked network")


@pytest_twisted.inlineCallbacks
def test_expired_proxy_is_refused_and_audited(collector, creds, tmp_path):
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=3)
    proxy = creds.proxy("alice", tmp_path / "expired-proxy", hours=1, now=past)
    with pytest.raises(ConnectionFailed):
        yield connect(reactor, Address.parse(collector.address), "ADVERTISE_MASTER",
                      security(creds, tmp_path, proxy=proxy))
    events = wait_for_audit(collector, lambda e: e["command"] == "AUTHENTICATE", "the expired proxy's audit")
    assert "certificate has expired" in events[0]["rule"]


@pytest_twisted.inlineCallbacks
def test_proxy_authenticates_as_its_end_entity_and_limited_is_marked(collector, creds, tmp_path):
    full = creds.proxy("alice", tmp_path / "proxy")
    conn = yield connect(reactor, Address.parse(collector.address), "ADVERTISE_MASTER",
                         security(creds, tmp_path, proxy=full))
    assert conn.identity == "/O=gwms/OU=Users/CN=alice" and conn.encrypted
    reply = yield conn.call("UPDATE", ad('[MyType = "Generic"; Name = "alice-thing"]'))
    conn.close()
    assert reply["Accepted"]
    limited = creds.proxy("alice", tmp_path / "limited", limited=True)
    conn = yield connect(reactor, Address.parse(collector.address), "ADVERTISE_MASTER",
                         security(creds, tmp_path, proxy=limited))
    yield conn.call("UPDATE", ad('[MyType = "Generic"; Name = "alice-thing"]'))
    conn.close()
    [event] = wait_for_audit(collector, lambda e: e["limited_proxy"], "the limited proxy's audit event")
    assert event["identity"] == "/O=gwms/OU=Users/CN=alice"


@pytest_twisted.inlineCallbacks
def test_forged_token_is_refused_and_audited(collector, creds, tmp_path):
    from gwms.credentials.tokens import generate_signing_key

    forger_key = tmp_path / "forger.key"
    generate_signing_key(forger_key)
    forged = creds.token("startd-token", ["ADVERTISE_STARTD"], key=forger_key)
    with pytest.raises(ConnectionFailed) as e:
        yield connect(reactor, Address.parse(collector.address), "ADVERTISE_STARTD",
                      security(creds, tmp_path, token=forged))
    assert "token refused: bad signature" in str(e.value)
    [event] = wait_for_audit(collector, lambda e: "token refused" in e["rule"], "the forged token's audit")
    assert event["allowed"] is False and event["method"] == "token"


@pytest_twisted.inlineCallbacks
def test_token_scope_bounds_what_a_token_may_do(collector, creds, tmp_path):
    good = creds.token("startd-token", ["ADVERTISE_STARTD"])
    client = DaemonClient(reactor, Address.parse(collector.address), security(creds, tmp_path, token=good))
    reply = yield client.call("UPDATE", ad(SLOT), "ADVERTISE_STARTD")
    client.close()
    assert reply["Accepted"]
    narrow = creds.token("startd-token", ["READ"])
    client = DaemonClient(reactor, Address.parse(collector.address), security(creds, tmp_path, token=narrow))
    with pytest.raises(CommandError) as e:
        yield client.call("UPDATE", ad(SLOT), "ADVERTISE_STARTD")
    client.close()
    assert "token scope READ does not include ADVERTISE_STARTD" in e.value.message


@pytest_twisted.inlineCallbacks
def test_one_identity_cannot_replace_anothers_ad(collector, creds, tmp_path):
    def as_user(name):
        cert, key = creds.users[name]
        return DaemonClient(reactor, Address.parse(collector.address), security(creds, tmp_path, cert=cert, key=key))

    alice, bob = as_user("alice"), as_user("bob")
    yield alice.call("UPDATE", ad('[MyType = "Generic"; Name = "shared"; Value = 1]'), "ADVERTISE_MASTER")
    with pytest.raises(CommandError) as e:
        yield bob.call("UPDATE", ad('[MyType = "Generic"; Name = "shared"; Value = 2]'), "ADVERTISE_MASTER")
    assert e.value.code == "NOT_OWNER"
    final, items = yield bob.call("QUERY", ad('[TargetType = "Generic"]'), "READ", stream=True)
    [stored] = [classads.decode(b) for b in items]
    assert stored["Value"] == 1 and stored["AuthenticatedIdentity"] == "/O=gwms/OU=Users/CN=alice"
    alice.close()
    bob.close()


def _raw_exchange(address, payload, read=True):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(payload)
        data = b""
        while read:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    frames, _ = FrameDecoder(1 << 20).feed(data)
    return frames


def _hello():
    return encode_frame("Q", 0, "HELLO", b'[Level = "READ"; Authentication = "OPTIONAL"; '
                                         b'Encryption = "OPTIONAL"; Methods = {}]')


@pytest_twisted.inlineCallbacks
def test_bad_frames_get_an_error_while_other_sessions_go_on(collector, creds, tmp_path):
    client = DaemonClient(reactor, Address.parse(collector.address), host_security(creds, tmp_path))
    yield client.call("UPDATE", ad(SLOT), "ADVERTISE_STARTD")

    oversized = _raw_exchange(collector.address, struct.pack("!I", 1 << 30) + b"Q 1 UPDATE\n")
    assert oversized[-1].kind == "E" and b"FRAME_TOO_LARGE" in oversized[-1].body
    assert b"exceeds the maximum of 65536 bytes" in oversized[-1].body

    garbage = _raw_exchange(collector.address, struct.pack("!I", 12) + b"HELLO WORLD!")
    assert garbage[-1].kind == "E" and b"MALFORMED_FRAME" in garbage[-1].body

    # A well-framed request with a malformed ad: an error, and the session stays usable.
    after_hello = _raw_exchange(collector.address, _hello() + encode_frame("Q", 0, "AUTH", b"[]")
                                + encode_frame("Q", 9, "QUERY", b'[TargetType = ') +
                                encode_frame("Q", 10, "QUERY", b'[TargetType = "Machine"]') +
                                struct.pack("!I", 5), read=True)
    by_id = {f.request_id: f for f in after_hello if f.command == "QUERY"}
    assert by_id[9].kind == "E" and b"MALFORMED_AD" in by_id[9].body
    assert by_id[10].kind == "R"
    assert b"too short" in after_hello[-1].body

    # A truncated frame and a hang-up: the daemon just forgets the connection.
    _raw_exchange(collector.address, struct.pack("!I", 100) + b"Q 1 QU", read=False)

    final, items = yield client.call("QUERY", ad('[TargetType = "Machine"]'), "READ", stream=True)
    client.close()
    assert final["Count"] == 1
    assert collector.process.poll() is None


@pytest_twisted.inlineCallbacks
def test_fs_authentication_over_the_local_socket(collector, creds, tmp_path):
    client = DaemonClient(reactor, Address(path=str(collector.socket)), security(creds, tmp_path))
    conn = yield client.connection("ADVERTISE_MASTER")
    assert conn.identity == getpass.getuser()
    yield client.call("UPDATE", ad('[MyType = "Generic"; Name = "local"]'), "ADVERTISE_MASTER")
    final, items = yield client.call("QUERY", ad('[TargetType = "Generic"]'), "READ", stream=True)
    client.close()
    [stored] = [classads.decode(b) for b in items]
    assert stored["AuthenticationMethod"] == "fs" and stored["AuthenticatedIdentity"] == getpass.getuser()


def test_status_fails_over_at_once_from_a_dead_collector(collector, gwms_cli):
    # One collector refuses connections, one accepts but never answers: neither stalls the query.
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    dead_port = refusing.getsockname()[1]
    refusing.close()
    started = time.monotonic()
    result = gwms_cli("status", "--any", "--pool", f"127.0.0.1:{dead_port}",
                      "--pool", f"127.0.0.1:{silent.getsockname()[1]}", "--pool", collector.address)
    elapsed = time.monotonic() - started
    silent.close()
    assert result.returncode == 0, result.stderr
    assert "Collector" in result.stdout
    assert elapsed < 10, f"fail-over took {elapsed:.1f} s"


def test_status_without_a_collector_says_so_plainly(gwms_cli):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    result = gwms_cli("status", "--pool", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert "no collector answered" in result.stderr and f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
