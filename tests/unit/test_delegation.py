"""The user's proxy (issue 5): GSI delegation (sign_delegation and the request/accept halves),
the startd's DELEGATE_REQUEST / DELEGATE_PROXY, the schedd's proxy checks, and a whole memory
pool delegating, re-delegating and holding, with every frame on the wire inspected."""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.testing import MemoryReactorClock

from gwms import classads, userfiles
from gwms.config import parse_config
from gwms.credentials import ca, x509
from gwms.plugins.identity import JobIdentity
from gwms.protocols.messages import CommandError
from gwms.schedd import proxy as user_proxy
from gwms.startd.service import Startd
from gwms.startd.starter import PROXY_FILE
from gwms.testing import network
from gwms.testing.pool import MemoryPool

from startd_fakes import FakeProcess as EnvProcess, FakeRequest, ad

UTC = dt.timezone.utc
ALICE = "/O=gwms/OU=Users/CN=alice"


# --------------------------------------------------------------------------------------------
# a test CA, alice and her proxies

@dataclass
class PKI:
    dir: Path
    ca_cert: Any
    alice: x509.Credential
    bob: x509.Credential

    def proxy(self, hours: float = 12, limited: bool = False, now: dt.datetime | None = None,
              issuer: x509.Credential | None = None) -> x509.Credential:
        return x509.create_proxy(issuer or self.alice, hours=hours, limited=limited, now=now)

    def proxy_file(self, path: Path, **kwargs: Any) -> x509.Credential:
        cred = self.proxy(**kwargs)
        x509.write_credential(path, cred)
        return cred


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca.init_ca(d, name="delegation test CA")
    users = {u: x509.load_credential(*ca.issue_user(d, u)) for u in ("alice", "bob")}
    return PKI(d, x509.load_certificates(d / "ca.pem")[0], users["alice"], users["bob"])


def _ts(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S} UTC"


# --------------------------------------------------------------------------------------------
# sign_delegation and the receiving side

def test_a_delegated_chain_verifies_against_the_ca_and_keeps_the_identity(pki):
    issuer = pki.proxy(hours=12)
    key, request = x509.make_delegation_request()
    chain = x509.sign_delegation(issuer, x509.read_delegation_request(request), hours=6)
    assert chain[1:] == [issuer.cert, *issuer.chain]
    info = x509.verify_chain(chain, [pki.ca_cert])
    assert info.identity == ALICE and info.proxy_depth == 2 and not info.limited
    assert info.subject.startswith(x509.dn_string(issuer.cert.subject) + "/CN=")
    assert abs((chain[0].not_valid_after_utc - dt.datetime.now(UTC)).total_seconds() - 6 * 3600) < 60
    cred, accepted = x509.accept_delegation(key, x509.certificates_pem(chain))
    assert accepted == info and cred.key is key


def test_a_limited_delegation_is_limited(pki):
    _key, request = x509.make_delegation_request()
    chain = x509.sign_delegation(pki.proxy(), x509.read_delegation_request(request), hours=1, limited=True)
    assert x509.is_limited_proxy(chain[0])
    assert x509.verify_chain(chain, [pki.ca_cert]).limited


def test_a_limited_issuer_delegates_only_limited_proxies(pki):
    limited = pki.proxy(limited=True)
    public = x509.make_delegation_request()[0].public_key()
    with pytest.raises(x509.CredentialError, match="limited proxy cannot issue a full proxy"):
        x509.sign_delegation(limited, public, hours=1)
    assert x509.is_limited_proxy(x509.sign_delegation(limited, public, hours=1, limited=True)[0])


def test_a_delegation_is_clipped_to_the_issuers_lifetime(pki):
    issuer = pki.proxy(hours=2)
    public = x509.make_delegation_request()[0].public_key()
    for hours in (48, None):
        chain = x509.sign_delegation(issuer, public, hours=hours)
        assert chain[0].not_valid_after_utc == issuer.cert.not_valid_after_utc
    # a proxy of a proxy of a proxy: the shortest link of the chain counts
    short = pki.proxy(hours=1)
    longer = x509.create_proxy(short, hours=5)  # already clipped by create_proxy
    assert longer.cert.not_valid_after_utc == short.cert.not_valid_after_utc
    chain = x509.sign_delegation(longer, public, hours=None)
    assert chain[0].not_valid_after_utc == short.cert.not_valid_after_utc


def test_an_expired_issuer_cannot_delegate(pki):
    issuer = pki.proxy(hours=1)
    later = dt.datetime.now(UTC) + dt.timedelta(hours=2)
    public = x509.make_delegation_request()[0].public_key()
    with pytest.raises(x509.CredentialError, match=r"expired at .* cannot sign a proxy"):
        x509.sign_delegation(issuer, public, hours=1, now=later)


def test_weak_or_unknown_request_keys_and_garbage_requests_are_refused(pki):
    issuer = pki.proxy()
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(x509.CredentialError, match="between 2048 and 16384 bits"):
        x509.sign_delegation(issuer, weak, hours=1)
    assert x509.sign_delegation(issuer, ec.generate_private_key(ec.SECP256R1()).public_key(), hours=1)
    for garbage in ("", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", 42):
        with pytest.raises(x509.CredentialError):
            x509.read_delegation_request(garbage)


def test_the_receiver_refuses_a_chain_for_another_key_a_chain_with_a_key_and_a_non_proxy(pki):
    key, _request = x509.make_delegation_request()
    other = x509.make_delegation_request()[0]
    chain = x509.sign_delegation(pki.proxy(), other.public_key(), hours=1)
    with pytest.raises(x509.CredentialError, match="not for the key of our request"):
        x509.accept_delegation(key, x509.certificates_pem(chain))
    with pytest.raises(x509.CredentialError, match="holds a private key"):
        x509.accept_delegation(key, x509.credential_pem(pki.proxy()))
    with pytest.raises(x509.CredentialError, match="is not a proxy"):
        x509.accept_delegation(pki.alice.key, x509.certificates_pem([pki.alice.cert]))


def test_create_proxy_and_sign_delegation_build_the_same_certificate(pki):
    issuer = pki.proxy()
    made = x509.create_proxy(issuer, hours=1)
    signed = x509.sign_delegation(issuer, made.key.public_key(), hours=1)[0]
    for cert in (made.cert, signed):
        assert x509.proxy_policy(cert) == x509.INHERIT_ALL_OID
        assert cert.issuer == issuer.cert.subject
    assert [e.oid for e in made.cert.extensions] == [e.oid for e in signed.extensions]


def test_write_credential_gives_the_file_to_its_owner(tmp_path, pki):
    path = tmp_path / "proxy"
    x509.write_credential(path, pki.proxy(), owner=(4321, 4322))
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 4322, 0o600)


# --------------------------------------------------------------------------------------------
# the startd's commands (as in test_startd: a Startd on a Clock, fake processes)

class Switch:
    name = "fake"

    def prepare_sandbox(self, job, sandbox):
        return JobIdentity(uid=4321, gid=4322, user="job")


def proxy_job(**extra):
    values = {"ClusterId": 1, "ProcId": 0, "x509userproxy": "/home/alice/x509up", "x509UserProxySubject": ALICE,
              **extra}
    return ad(Owner="alice", RequestCpus=1, RequestMemory=100, RequestDisk=1000, Cmd="/bin/true",
              Requirements=classads.parse_expr("true"), **{k: v for k, v in values.items() if v is not None})


def a_startd(tmp_path):
    clock = MemoryReactorClock()
    clock.advance(time.time())
    config = parse_config(f'[startd]\nexecute = "{tmp_path}/execute"\ncpus = 1\nmemory = 1000\ndisk = 100000\n'
                          'name = "wn"\n')
    s = Startd(clock, config, Switch(), process_factory=EnvProcess)
    s.address = "127.0.0.1:1"
    return clock, s


def claimed(s, job):
    capability = s.slot_ad(s.slots["slot1@wn"])["ClaimId"]
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability, JobAd=job, Schedd="x")))["ClaimId"]
    s.activate(FakeRequest(ad(ClaimId=claim_id, JobAd=job)))
    return claim_id, s.claim_for(FakeRequest(ad(ClaimId=claim_id)))


def fired(d):
    """The result of a Deferred that has fired (a startd on a Clock makes its keys at once)."""
    box = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def delegate(s, claim_id, issuer, hours=12.0, limited=False, job_id="1.0"):
    reply = fired(s.delegate_request(FakeRequest(ad(ClaimId=claim_id, JobId=job_id))))
    assert "PRIVATE KEY" not in reply["Request"] and "CERTIFICATE REQUEST" in reply["Request"]
    chain = x509.sign_delegation(issuer, x509.read_delegation_request(reply["Request"]), hours, limited)
    return s.delegate_proxy(FakeRequest(ad(ClaimId=claim_id, JobId=job_id,
                                           Proxy=x509.certificates_pem(chain).decode())))


def test_the_job_gets_its_delegated_proxy_0600_owned_by_its_account_in_X509_USER_PROXY(tmp_path, pki):
    _clock, s = a_startd(tmp_path)
    claim_id, claim = claimed(s, proxy_job())
    issuer = pki.proxy(hours=12)
    reply = delegate(s, claim_id, issuer, hours=6)
    path = claim.starter.sandbox / PROXY_FILE
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 4321, 4322)
    cred = x509.load_credential(path)
    assert cred.key is not None and x509.verify_chain([cred.cert, *cred.chain], [pki.ca_cert]).identity == ALICE
    assert reply["Subject"] == x509.dn_string(cred.cert.subject)
    assert reply["Expiration"] == int(cred.cert.not_valid_after_utc.timestamp())
    s.start_job(FakeRequest(ad(ClaimId=claim_id)))
    assert claim.starter.process.env["X509_USER_PROXY"] == str(path)
    # the proxy is not part of the output sandbox and GET_FILE does not serve it
    assert PROXY_FILE not in [e["Name"] for e in claim.starter.outputs()]
    with pytest.raises(CommandError) as e:
        s.get_file(FakeRequest(ad(ClaimId=claim_id, Name=PROXY_FILE, Offset=0, Length=100)))
    assert e.value.code == "TRANSFER_FAILED"


def test_a_re_delegation_replaces_the_file_atomically_at_the_same_path(tmp_path, pki):
    _clock, s = a_startd(tmp_path)
    claim_id, claim = claimed(s, proxy_job())
    delegate(s, claim_id, pki.proxy(hours=2))
    s.start_job(FakeRequest(ad(ClaimId=claim_id)))
    path = Path(claim.starter.process.env["X509_USER_PROXY"])
    first = path.stat()
    old = x509.load_credential(path)
    delegate(s, claim_id, pki.proxy(hours=20), hours=12, limited=True)
    second = path.stat()
    new = x509.load_credential(path)
    assert second.st_ino != first.st_ino  # a new file renamed over the old one
    assert (stat.S_IMODE(second.st_mode), second.st_uid, second.st_gid) == (0o600, 4321, 4322)
    assert new.cert.not_valid_after_utc > old.cert.not_valid_after_utc and x509.is_limited_proxy(new.cert)
    assert x509.certificates_pem([new.cert]) != x509.certificates_pem([old.cert])
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(f".{PROXY_FILE}")] == []  # no temporaries


def test_a_proxy_job_does_not_start_without_its_proxy(tmp_path, pki):
    _clock, s = a_startd(tmp_path)
    claim_id, claim = claimed(s, proxy_job())
    with pytest.raises(CommandError) as e:
        s.start_job(FakeRequest(ad(ClaimId=claim_id)))
    assert e.value.code == "START_FAILED" and "not been delegated" in e.value.message
    # nor when activated with StartNow
    _clock2, s2 = a_startd(tmp_path / "2")
    capability = s2.slot_ad(s2.slots["slot1@wn"])["ClaimId"]
    claim_id2 = s2.request_claim(FakeRequest(ad(ClaimId=capability, JobAd=proxy_job(), Schedd="x")))["ClaimId"]
    with pytest.raises(CommandError) as e:
        s2.activate(FakeRequest(ad(ClaimId=claim_id2, JobAd=proxy_job(), StartNow=True)))
    assert e.value.code == "START_FAILED"


def test_delegation_is_for_the_claims_current_running_proxy_job_only(tmp_path, pki):
    _clock, s = a_startd(tmp_path)
    claim_id, claim = claimed(s, proxy_job())
    for job_id, code in (("1.1", "NO_JOB"), (None, "NO_JOB")):
        with pytest.raises(CommandError) as e:
            s.delegate_request(FakeRequest(ad(ClaimId=claim_id, **({"JobId": job_id} if job_id else {}))))
        assert e.value.code == code
    with pytest.raises(CommandError) as e:  # an answer to no request
        s.delegate_proxy(FakeRequest(ad(ClaimId=claim_id, JobId="1.0", Proxy=x509.certificates_pem(
            [pki.proxy().cert]).decode())))
    assert e.value.code == "DELEGATION_FAILED" and "no delegation request is pending" in e.value.message
    # a chain of someone else than the job ad's x509UserProxySubject
    reply = fired(s.delegate_request(FakeRequest(ad(ClaimId=claim_id, JobId="1.0"))))
    chain = x509.sign_delegation(pki.proxy(issuer=pki.bob), x509.read_delegation_request(reply["Request"]), 1)
    with pytest.raises(CommandError) as e:
        s.delegate_proxy(FakeRequest(ad(ClaimId=claim_id, JobId="1.0", Proxy=x509.certificates_pem(chain).decode())))
    assert e.value.code == "DELEGATION_FAILED" and "CN=bob" in e.value.message
    with pytest.raises(CommandError) as e:
        s.delegate_proxy(FakeRequest(ad(ClaimId=claim_id, JobId="1.0", Proxy=42)))
    assert e.value.code == "MALFORMED_AD"
    # once the job has ended, no more delegations
    delegate(s, claim_id, pki.proxy())
    s.start_job(FakeRequest(ad(ClaimId=claim_id)))
    claim.starter.process.end(code=0)
    with pytest.raises(CommandError) as e:
        s.delegate_request(FakeRequest(ad(ClaimId=claim_id, JobId="1.0")))
    assert e.value.code == "NO_JOB" and "ended" in e.value.message
    # and a job without a proxy has nothing to delegate
    _clock2, s2 = a_startd(tmp_path / "2")
    claim_id2, _ = claimed(s2, proxy_job(x509userproxy=None, x509UserProxySubject=None))
    with pytest.raises(CommandError) as e:
        s2.delegate_request(FakeRequest(ad(ClaimId=claim_id2, JobId="1.0")))
    assert e.value.code == "REFUSED"


# --------------------------------------------------------------------------------------------
# the schedd's checks

SUBMIT = """
executable = /bin/echo
transfer_executable = false
arguments = hi
x509userproxy = {proxy}
+FakeRunTime = {runtime}
+FakeReportProxy = true
output = job.out
{extra}
queue
"""


@pytest.fixture
def clock():
    clock = MemoryReactorClock()
    clock.advance(time.time())  # certificates live in real time
    return clock


@pytest.fixture
def pool(clock, tmp_path):
    with MemoryPool(clock, tmp_path / "pool", slots=1) as pool:
        yield pool


def submit(pool, proxy, runtime=5, extra=""):
    return pool.submit("alice", SUBMIT.format(proxy=proxy, runtime=runtime, extra=extra))


def job_ad(pool, cluster):
    found = pool.query(f"ClusterId == {cluster}") or pool.history(f"ClusterId == {cluster}")
    return found[0]


def test_submit_records_the_proxys_subject_and_expiration(pool, tmp_path, pki):
    cred = pki.proxy_file(tmp_path / "x509up", hours=12)
    cluster = submit(pool, tmp_path / "x509up", runtime=1000)
    job = job_ad(pool, cluster)
    assert job["JobStatus"] == 1 or job["JobStatus"] == 2
    assert job["x509UserProxySubject"] == ALICE
    assert job["x509UserProxyExpiration"] == int(cred.cert.not_valid_after_utc.timestamp())


def test_a_submitter_cannot_claim_another_proxy_subject(pool, tmp_path, pki):
    from gwms.submit import parse_submit

    pki.proxy_file(tmp_path / "x509up")
    text = SUBMIT.format(proxy=tmp_path / "x509up", runtime=1000, extra="")
    client = pool.client("alice")
    cluster = pool.result(client.new_cluster(), "NEW_CLUSTER")
    parsed = parse_submit(text, filename="job.sub", cluster_id=cluster, owner="alice", iwd=tmp_path, now=0)
    parsed.cluster_ad["x509UserProxySubject"] = "/O=gwms/OU=Users/CN=root"  # a forged client
    parsed.cluster_ad["x509UserProxyExpiration"] = 2**40
    pool.result(client.submit(cluster, parsed.cluster_ad, parsed.proc_ads), "SUBMIT")
    job = job_ad(pool, cluster)
    assert job["x509UserProxySubject"] == ALICE and job["x509UserProxyExpiration"] < 2**40


def held(pool, cluster, timeout=5.0):
    pool.run_until(lambda: job_ad(pool, cluster)["JobStatus"] == 5, timeout, "the job to be held")
    job = job_ad(pool, cluster)
    return job["HoldReasonCode"], job["HoldReason"]


def test_an_expired_proxy_holds_the_job_at_submit(pool, tmp_path, pki):
    cred = pki.proxy_file(tmp_path / "x509up", hours=1, now=dt.datetime.now(UTC) - dt.timedelta(days=2))
    cluster = submit(pool, tmp_path / "x509up")
    assert held(pool, cluster) == (4, f"x509userproxy {tmp_path}/x509up: expired at "
                                      f"{_ts(cred.cert.not_valid_after_utc)}")
    assert pool.calls[("startd", "ACTIVATE_CLAIM")] == 0


def test_the_shadow_checks_the_proxy_again_right_before_the_start(pool, tmp_path, pki):
    pki.proxy_file(tmp_path / "x509up", hours=12)
    cluster = submit(pool, tmp_path / "x509up")
    assert job_ad(pool, cluster)["JobStatus"] == 1
    # expired since the submit, before the schedd's next periodic check: the shadow sees it
    cred = pki.proxy_file(tmp_path / "x509up", hours=1, now=dt.datetime.now(UTC) - dt.timedelta(days=2))
    assert held(pool, cluster) == (4, f"x509userproxy {tmp_path}/x509up: expired at "
                                      f"{_ts(cred.cert.not_valid_after_utc)}")
    assert pool.calls[("startd", "REQUEST_CLAIM")] == 1 and pool.calls[("startd", "ACTIVATE_CLAIM")] == 0
    assert pool.clock.seconds() - job_ad(pool, cluster)["QDate"] < pool.schedd.proxy_check_interval


def test_a_missing_or_unreadable_proxy_holds_the_job_at_submit(pool, tmp_path, pki):
    cluster = submit(pool, tmp_path / "nothere")
    assert held(pool, cluster) == (4, f"x509userproxy {tmp_path}/nothere: cannot read it as alice: "
                                      "No such file or directory")
    # read with the owner's rights: root's 0600 file is not alice's when alice is somebody else
    secret = tmp_path / "roots" / "x509up"
    secret.parent.mkdir(mode=0o700)
    pki.proxy_file(secret)
    if os.geteuid() == 0:
        pool.schedd.accounts = lambda user: userfiles.Account(user, 65534, 65534)
        cluster = submit(pool, secret)
        assert held(pool, cluster) == (4, f"x509userproxy {secret}: cannot read it as alice: Permission denied")


def test_a_file_that_is_not_a_proxy_holds_the_job_at_submit(pool, tmp_path, pki):
    cases = {
        "empty": (b"", "the file holds no PEM certificate"),
        "certonly": (x509.certificates_pem([pki.alice.cert]), "the file holds no private key"),
        "otherkey": (x509.certificates_pem([pki.alice.cert]) + _key_pem(pki.bob.key),
                     "does not belong to certificate /O=gwms/OU=Users/CN=alice"),
        "dir": (None, "not a regular file"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
        cluster = submit(pool, path)
        code, reason = held(pool, cluster)
        assert code == 4 and reason.startswith(f"x509userproxy {path}: ") and reason.endswith(words), reason
        if name != "dir":
            assert "not a proxy or certificate with its private key" in reason


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_read_user_proxy_reports_each_problem_and_reads_a_good_file(tmp_path, pki):
    me = userfiles.Account("alice", os.geteuid(), os.getegid())
    cred = pki.proxy_file(tmp_path / "good", hours=3)
    good = user_proxy.read_user_proxy(me, str(tmp_path / "good"), time.time())
    assert good.subject == ALICE and good.expiration == int(cred.cert.not_valid_after_utc.timestamp())
    with pytest.raises(user_proxy.ProxyProblem) as e:
        user_proxy.read_user_proxy(me, str(tmp_path / "good"), time.time() + 4 * 3600)
    assert e.value.kind == "expired" and e.value.reason == (
        f"x509userproxy {tmp_path}/good: expired at {_ts(cred.cert.not_valid_after_utc)}")
    os.mkfifo(tmp_path / "fifo")  # must not hang the schedd
    with pytest.raises(user_proxy.ProxyProblem) as e:
        user_proxy.read_user_proxy(me, str(tmp_path / "fifo"), time.time())
    assert e.value.kind == "unreadable" and "not a regular file" in e.value.reason


# --------------------------------------------------------------------------------------------
# the whole memory pool: delegation on the wire

class Wire:
    """Every byte any connection of the memory network carries, both ways."""

    def __init__(self, monkeypatch):
        self.data: list[bytes] = []
        original = network._MemoryTransport.getOutBuffer
        wire = self

        def recording(transport):
            out = original(transport)
            if out:
                wire.data.append(out)
            return out

        monkeypatch.setattr(network._MemoryTransport, "getOutBuffer", recording)

    @property
    def everything(self) -> bytes:
        return b"".join(self.data)


def report(line_start: str, text: str) -> dict[str, str]:
    line = next(line for line in text.splitlines() if line.startswith(line_start))
    return dict(item.split("=", 1) for item in line[len(line_start):].split())


def test_a_proxy_job_starts_after_delegation_and_no_private_key_crosses_the_wire(monkeypatch, pool, tmp_path, pki):
    wire = Wire(monkeypatch)
    cred = pki.proxy_file(tmp_path / "x509up", hours=12)
    user_key = _key_pem(cred.key)
    cluster = submit(pool, tmp_path / "x509up", runtime=5)
    pool.run_until(lambda: pool.status(f"{cluster}.0") == 4, 120, "the job to complete")
    out = (pool.iwds[cluster] / "job.out").read_text()
    seen = report("proxy at start: ", out)
    assert seen["mode"] == "600" and seen["key"] == "True" and seen["identity"] == ALICE
    assert seen["path"].endswith(f"/{PROXY_FILE}") and seen["limited"] == "False"
    assert seen["subject"].startswith(x509.dn_string(cred.cert.subject) + "/CN=")
    assert int(seen["notAfter"]) == int(cred.cert.not_valid_after_utc.timestamp())  # 24 h, clipped to 12
    assert (pool.calls[("startd", "DELEGATE_REQUEST")], pool.calls[("startd", "DELEGATE_PROXY")],
            pool.calls[("startd", "START_JOB")]) == (1, 1, 1)
    assert pool.history(f"ClusterId == {cluster}")[0]["x509UserProxySubject"] == ALICE
    # what went over the wire: a request and certificates, never a key (theirs or ours)
    everything = wire.everything
    # activated without StartNow, delegated, then started
    assert (everything.index(b"ACTIVATE_CLAIM") < everything.index(b"DELEGATE_REQUEST")
            < everything.index(b"DELEGATE_PROXY") < everything.index(b"START_JOB"))
    assert b"CERTIFICATE REQUEST" in everything and b"BEGIN CERTIFICATE" in everything
    assert b"PRIVATE KEY" not in everything
    body = b"".join(user_key.splitlines()[1:-1])
    assert body[:64] not in everything.replace(b"\\n", b"").replace(b"\n", b"")


def test_jobs_without_a_proxy_still_start_with_their_activation(pool):
    cluster = pool.submit("alice", "executable = /bin/true\ntransfer_executable = false\nqueue 2\n")
    pool.run_until(lambda: not pool.query(f"ClusterId == {cluster}"), 120, "the jobs to complete")
    assert pool.calls[("startd", "START_JOB")] == 0
    assert pool.calls[("startd", "DELEGATE_REQUEST")] == pool.calls[("startd", "DELEGATE_PROXY")] == 0


def test_a_refreshed_proxy_reaches_the_running_job(monkeypatch, pool, tmp_path, pki):
    wire = Wire(monkeypatch)
    path = tmp_path / "x509up"
    first = pki.proxy_file(path, hours=2)
    cluster = submit(pool, path, runtime=200)
    pool.run_until(lambda: pool.status(f"{cluster}.0") == 2 and pool.calls[("startd", "START_JOB")], 60,
                   "the job to run")
    (claim,) = pool.startd.claims.values()
    sandbox_proxy = claim.starter.proxy_path
    assert x509.load_credential(sandbox_proxy).cert.not_valid_after_utc == first.cert.not_valid_after_utc
    pool.advance(35, max_step=5)  # a check with nothing new: nothing delegated again
    assert pool.calls[("startd", "DELEGATE_PROXY")] == 1
    second = pki.proxy_file(path, hours=20)  # the user refreshes the file
    refreshed = pool.clock.seconds()
    pool.run_until(lambda: pool.calls[("startd", "DELEGATE_PROXY")] == 2, 31, "the re-delegation")
    assert pool.clock.seconds() - refreshed <= pool.schedd.proxy_check_interval
    now_there = x509.load_credential(sandbox_proxy)
    assert now_there.cert.not_valid_after_utc == second.cert.not_valid_after_utc
    assert stat.S_IMODE(sandbox_proxy.stat().st_mode) == 0o600
    assert job_ad(pool, cluster)["x509UserProxyExpiration"] == int(second.cert.not_valid_after_utc.timestamp())
    pool.run_until(lambda: pool.status(f"{cluster}.0") == 4, 300, "the job to complete")
    out = (pool.iwds[cluster] / "job.out").read_text()
    assert int(report("proxy at start: ", out)["notAfter"]) == int(first.cert.not_valid_after_utc.timestamp())
    assert int(report("proxy at exit: ", out)["notAfter"]) == int(second.cert.not_valid_after_utc.timestamp())
    assert b"PRIVATE KEY" not in wire.everything


def test_a_limited_shorter_delegation_on_request(pool, tmp_path, pki):
    pki.proxy_file(tmp_path / "x509up", hours=12)
    cluster = submit(pool, tmp_path / "x509up", runtime=1,
                     extra="delegate_job_GSI_credentials_lifetime = 3600\ndelegate_limited_proxy = true")
    started = pool.clock.seconds()
    pool.run_until(lambda: pool.status(f"{cluster}.0") == 4, 120, "the job to complete")
    done = pool.history(f"ClusterId == {cluster}")[0]
    assert done["DelegateJobGSICredentialsLifetime"] == 3600 and done["DelegateLimitedProxy"] is True
    seen = report("proxy at start: ", (pool.iwds[cluster] / "job.out").read_text())
    assert seen["limited"] == "True"
    assert abs(int(seen["notAfter"]) - (started + 3600)) < 10


def test_a_short_delegated_proxy_is_renewed_before_it_expires(pool, tmp_path, pki):
    user = pki.proxy_file(tmp_path / "x509up", hours=12)
    cluster = submit(pool, tmp_path / "x509up", runtime=400, extra="delegate_job_GSI_credentials_lifetime = 240")
    pool.run_until(lambda: pool.calls[("startd", "START_JOB")], 30, "the job to start")
    started = pool.clock.seconds()
    (claim,) = pool.startd.claims.values()
    ends = [x509.load_credential(claim.starter.proxy_path).cert.not_valid_after_utc.timestamp()]
    # renewed once a quarter of its 240 s is left (at 180 s), at the next 30 s check: never expired
    pool.run_until(lambda: pool.calls[("startd", "DELEGATE_PROXY")] == 2, 240, "the renewal")
    assert 180 <= pool.clock.seconds() - started <= 180 + pool.schedd.proxy_check_interval + 1
    ends.append(x509.load_credential(claim.starter.proxy_path).cert.not_valid_after_utc.timestamp())
    assert ends[1] - ends[0] >= 150 and ends[1] <= user.cert.not_valid_after_utc.timestamp()
    pool.run_until(lambda: pool.status(f"{cluster}.0") == 4, 300, "the job to complete")
    assert pool.calls[("startd", "DELEGATE_PROXY")] == 3  # and again at 360 s; never expired in between


def test_a_running_job_whose_proxy_expires_is_held(pool, tmp_path, pki):
    cred = pki.proxy_file(tmp_path / "x509up", hours=0.02)  # 72 s
    cluster = submit(pool, tmp_path / "x509up", runtime=3600)
    pool.run_until(lambda: pool.status(f"{cluster}.0") == 2 and pool.calls[("startd", "START_JOB")], 30,
                   "the job to run")
    code, reason = held(pool, cluster, timeout=120)
    assert code == 4 and reason == f"x509userproxy {tmp_path}/x509up: expired at {_ts(cred.cert.not_valid_after_utc)}"
    assert not pool.startd.claims or all(c.starter is None for c in pool.startd.claims.values())
