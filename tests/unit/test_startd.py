"""The startd's slots and claims on a Clock: capabilities, START, carving, worklife, timeouts."""

from __future__ import annotations


import pytest
from twisted.internet.testing import MemoryReactorClock

from gwms import classads
from gwms.config import parse_config
from gwms.protocols.messages import CommandError
from gwms.startd.service import Startd

from startd_fakes import FakeProcess, FakeRequest, ad


class Switch:
    name = "fake"

    def prepare_sandbox(self, job, sandbox):
        return None


def job(owner="alice", cpus=1, memory=100, **extra):
    values = {"ClusterId": 1, "ProcId": 0, **extra}
    j = ad(Owner=owner, RequestCpus=cpus, RequestMemory=memory, RequestDisk=1000,
           Cmd="/bin/true", Requirements=classads.parse_expr("TARGET.Cpus >= RequestCpus"), **values)
    return j


def startd(tmp_path, text=""):
    clock = MemoryReactorClock()
    config = parse_config(f'[startd]\nexecute = "{tmp_path}/execute"\ncpus = 4\nmemory = 4000\ndisk = 100000\n'
                          f'name = "wn"\nclaim_worklife = 100\nidle_claim_timeout = 30\n{text}')
    s = Startd(clock, config, Switch(), process_factory=FakeProcess)
    s.address = "127.0.0.1:1"
    return clock, s


def capability(s, name="slot1@wn"):
    return s.slot_ad(s.slots[name])["ClaimId"]


def test_static_slots_split_the_machine_and_a_capability_claims_once(tmp_path):
    clock, s = startd(tmp_path, "slots = 2\n")
    assert sorted(s.slots) == ["slot1@wn", "slot2@wn"] and s.slots["slot1@wn"].cpus == 2
    cap = capability(s)
    reply = s.request_claim(FakeRequest(ad(ClaimId=cap, JobAd=job(), Schedd="schedd")))
    assert reply["SlotName"] == "slot1@wn" and reply["ClaimId"] != cap
    assert s.slots["slot1@wn"].state == "Claimed" and "ClaimId" not in s.slot_ad(s.slots["slot1@wn"])
    with pytest.raises(CommandError) as e:
        s.request_claim(FakeRequest(ad(ClaimId=cap, JobAd=job(), Schedd="schedd")))
    assert e.value.code == "BAD_CLAIM"


def test_a_forged_capability_is_refused(tmp_path):
    clock, s = startd(tmp_path)
    handle = capability(s).split("#")[0]
    for forged in (f"{handle}#{'0' * 64}", "nothash", 42):
        with pytest.raises(CommandError) as e:
            s.request_claim(FakeRequest(ad(ClaimId=forged, JobAd=job(), Schedd="schedd")))
        assert e.value.code == "BAD_CLAIM"


def test_start_expression_refuses_a_job(tmp_path):
    clock, s = startd(tmp_path, 'start = "TARGET.Owner != \\"mallory\\""\n')
    with pytest.raises(CommandError) as e:
        s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(owner="mallory"), Schedd="x")))
    assert e.value.code == "REFUSED" and "START" in e.value.message
    assert s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["SlotName"]


def test_partitionable_slot_is_carved_and_resources_come_back_on_release(tmp_path):
    clock, s = startd(tmp_path, "partitionable = true\n")
    cap = capability(s)
    claims = [s.request_claim(FakeRequest(ad(ClaimId=cap, JobAd=job(cpus=1, memory=1000), Schedd="x")))
              for _ in range(3)]
    assert [c["SlotName"] for c in claims] == ["slot1_1@wn", "slot1_2@wn", "slot1_3@wn"]
    pslot = s.slots["slot1@wn"]
    assert (pslot.cpus, pslot.memory) == (1, 1000)
    with pytest.raises(CommandError) as e:
        s.request_claim(FakeRequest(ad(ClaimId=cap, JobAd=job(cpus=2), Schedd="x")))
    assert "not enough resources" in e.value.message
    s.release(s.claim_for(FakeRequest(ad(ClaimId=claims[0]["ClaimId"]))))
    assert (pslot.cpus, pslot.memory) == (2, 2000) and "slot1_1@wn" not in s.slots


def _run_job(s, claim_id, jobad):
    s.activate(FakeRequest(ad(ClaimId=claim_id, JobAd=jobad)))
    s.start_job(FakeRequest(ad(ClaimId=claim_id)))
    claim = s.claim_for(FakeRequest(ad(ClaimId=claim_id)))
    return claim


def test_claim_is_reused_until_its_worklife_ends(tmp_path):
    clock, s = startd(tmp_path)
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    for _ in range(2):
        claim = _run_job(s, claim_id, job())
        claim.starter.process.end(code=0)
        assert s.deactivate(FakeRequest(ad(ClaimId=claim_id)))["Released"] is False
    clock.advance(101)
    claim = _run_job(s, claim_id, job())
    claim.starter.process.end(code=0)
    assert s.deactivate(FakeRequest(ad(ClaimId=claim_id)))["Released"] is True
    assert s.slots["slot1@wn"].state == "Unclaimed"


def test_an_activation_replaces_the_ended_job_it_names_until_the_worklife_ends(tmp_path):
    clock, s = startd(tmp_path)
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    first = _run_job(s, claim_id, job(ProcId=0)).starter
    with pytest.raises(CommandError) as e:  # still running: nothing to replace
        s.activate(FakeRequest(ad(ClaimId=claim_id, JobAd=job(ProcId=1), Replaces="1.0")))
    assert e.value.code == "BUSY"
    first.process.end(code=0)
    status = s.wait_job(FakeRequest(ad(ClaimId=claim_id, Timeout=5)))
    assert status["Exited"] and status["ClaimReusable"] is True
    for wrong in (None, "1.7"):  # an activation that does not name the ended job is refused
        with pytest.raises(CommandError) as e:
            s.activate(FakeRequest(ad(ClaimId=claim_id, JobAd=job(ProcId=1), Replaces=wrong)))
        assert e.value.code == "BUSY"
    assert first.sandbox.exists()
    s.activate(FakeRequest(ad(ClaimId=claim_id, JobAd=job(ProcId=1), Replaces="1.0", StartNow=True)))
    claim = s.claim_for(FakeRequest(ad(ClaimId=claim_id)))
    assert not first.sandbox.exists() and claim.job_id == "1.1" and claim.starter.running
    clock.advance(101)  # past claim_worklife
    claim.starter.process.end(code=0)
    assert s.wait_job(FakeRequest(ad(ClaimId=claim_id, Timeout=5)))["ClaimReusable"] is False
    with pytest.raises(CommandError) as e:
        s.activate(FakeRequest(ad(ClaimId=claim_id, JobAd=job(ProcId=2), Replaces="1.1")))
    assert e.value.code == "CLAIM_ENDED"
    assert s.slots["slot1@wn"].state == "Unclaimed" and not s.claims


def test_a_claim_runs_only_its_users_jobs(tmp_path):
    clock, s = startd(tmp_path)
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    with pytest.raises(CommandError) as e:
        s.activate(FakeRequest(ad(ClaimId=claim_id, JobAd=job(owner="bob"))))
    assert "of the user it was made for only" in e.value.message


def test_idle_claims_are_released_and_expired_leases_kill_the_job(tmp_path):
    clock, s = startd(tmp_path, "slots = 2\n")
    idle = s.request_claim(FakeRequest(ad(ClaimId=capability(s, "slot1@wn"), JobAd=job(), Schedd="x")))
    busy = s.request_claim(FakeRequest(ad(ClaimId=capability(s, "slot2@wn"), JobAd=job(), Schedd="x")))
    claim = _run_job(s, busy["ClaimId"], job(JobLeaseDuration=60))
    process = claim.starter.process
    clock.advance(31)
    s.housekeeping()
    assert s.slots["slot1@wn"].state == "Unclaimed"  # idle for more than idle_claim_timeout
    assert s.slots["slot2@wn"].state == "Claimed"  # its job holds it
    clock.advance(30)
    s.housekeeping()
    assert process.killed == 0 and s.slots["slot2@wn"].state == "Unclaimed"  # lease expired: no shadow
    del idle


def test_wait_job_long_poll_answers_when_the_job_exits(tmp_path):
    clock, s = startd(tmp_path)
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    claim = _run_job(s, claim_id, job())
    d = s.wait_job(FakeRequest(ad(ClaimId=claim_id, Timeout=20)))
    assert not d.called
    claim.starter.process.end(code=3)
    status = d.result
    assert status["Exited"] and status["ExitCode"] == 3 and status["RemoteUserCpu"] == 0.1
    still = s.wait_job(FakeRequest(ad(ClaimId=claim_id, Timeout=5)))
    assert isinstance(still, classads.ClassAd) and still["ExitCode"] == 3  # already exited: answered at once


def test_wait_job_times_out_with_running_status_and_shutdown_evicts(tmp_path):
    clock, s = startd(tmp_path)
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    _run_job(s, claim_id, job())
    d = s.wait_job(FakeRequest(ad(ClaimId=claim_id, Timeout=5)))
    clock.advance(5)
    assert d.result["Running"] is True and not d.result.get("Exited", False)
    pending = s.wait_job(FakeRequest(ad(ClaimId=claim_id, Timeout=20)))
    s.shutdown(grace=0)
    assert pending.result["Evicted"] is True and "shutting down" in pending.result["Reason"]


def test_a_job_the_startd_lost_is_reported_as_evicted_not_as_exited(tmp_path):
    from gwms.startd.process import JobResult, Usage

    clock, s = startd(tmp_path)
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    claim = _run_job(s, claim_id, job())
    d = s.wait_job(FakeRequest(ad(ClaimId=claim_id, Timeout=20)))
    claim.starter.process.finished.callback(
        JobResult(None, 9, Usage(0.0, 0.0, 1.0, 0), 0, failure="the job launcher ended"))
    status = d.result
    assert status["Evicted"] is True and "the job launcher ended" in status["Reason"]
    assert not status.get("Exited", False)


class RecordingProcess(FakeProcess):
    """Remembers where the starter sent the job's stdout and stderr."""

    def __init__(self, reactor, switch, job, argv, env, sandbox, stdin, stdout, stderr, marker):
        super().__init__(reactor, switch, job, argv, env, sandbox, stdin, stdout, stderr, marker)
        self.streams = (stdout, stderr)


@pytest.mark.parametrize("extra, to_devnull, listed", [
    ({}, (True, True), []),
    ({"Out": "job.out"}, (False, True), ["_condor_stdout"]),
    ({"Out": "job.out", "Err": "job.err"}, (False, False), ["_condor_stdout", "_condor_stderr"]),
    ({"Err": "/dev/null", "Out": "/dev/null"}, (True, True), []),
])
def test_streams_the_job_does_not_want_go_to_dev_null_and_are_not_listed(tmp_path, extra, to_devnull, listed):
    clock, s = startd(tmp_path)
    s.process_factory = RecordingProcess
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    claim = _run_job(s, claim_id, job(**extra))
    starter = claim.starter
    assert tuple(str(p) == "/dev/null" for p in starter.process.streams) == to_devnull
    for path in starter.process.streams:  # what the launcher would have made
        if str(path) != "/dev/null":
            path.write_text("x")
    assert [entry["Name"] for entry in starter.outputs()] == listed


def test_a_glidein_exits_after_max_idle_without_claims_counting_from_its_last_claim(tmp_path):
    clock, s = startd(tmp_path, "max_idle = 60\n")
    exits = []
    s.exit_requested = exits.append
    clock.advance(59)
    s.lifetime_check()
    assert exits == []
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    clock.advance(100)  # claimed: never idle
    s.lifetime_check()
    assert exits == []
    s.release(s.claim_for(FakeRequest(ad(ClaimId=claim_id))))
    clock.advance(59)
    s.lifetime_check()
    assert exits == []
    clock.advance(1)
    s.lifetime_check()
    assert exits == ["no claim came for 60 s"]


def test_a_retiring_glidein_takes_no_new_claims_or_jobs_and_exits_when_its_claims_end(tmp_path):
    clock, s = startd(tmp_path, "slots = 2\nretire_after = 100\n")
    exits = []
    s.exit_requested = exits.append
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    running = _run_job(s, claim_id, job())
    other = capability(s, "slot2@wn")
    clock.advance(100)
    s.lifetime_check()
    assert s.retiring and exits == []
    assert s.slot_ad(s.slots["slot2@wn"])["Start"] is False and "ClaimId" not in s.slot_ad(s.slots["slot2@wn"])
    with pytest.raises(CommandError) as e:
        s.request_claim(FakeRequest(ad(ClaimId=other, JobAd=job(), Schedd="x")))
    assert e.value.code == "RETIRING"
    running.starter.process.end(code=0)  # the running job finishes ...
    assert s.wait_job(FakeRequest(ad(ClaimId=claim_id, Timeout=5)))["ClaimReusable"] is False  # ... and is the last
    s.lifetime_check()
    assert exits == []
    s.release(s.claim_for(FakeRequest(ad(ClaimId=claim_id))))
    s.lifetime_check()
    assert exits == ["it retired and no claim is left"]


def test_a_glidein_exits_at_its_max_lifetime_even_with_jobs_running(tmp_path):
    clock, s = startd(tmp_path, "max_lifetime = 300\nmax_idle = 1000\n")
    exits = []
    s.exit_requested = exits.append
    claim_id = s.request_claim(FakeRequest(ad(ClaimId=capability(s), JobAd=job(), Schedd="x")))["ClaimId"]
    _run_job(s, claim_id, job())
    clock.advance(299)
    s.lifetime_check()
    assert exits == []
    clock.advance(1)
    s.lifetime_check()
    assert exits == ["its maximum lifetime (300 s) is reached"]
