"""The startd (``twistd -n gwms-startd --config FILE``): slots, claims, and a starter per job.

Slots are static (N of them) or one partitionable slot carved into dynamic slots by each
claim's requests. Each claimable slot advertises a capability (the private ``ClaimId``) that only
the negotiator can read from the collector and hands to the schedd it matched; the schedd
presents it to claim. A claim then runs one job after another for the same schedd and user,
without new negotiation, until its worklife ends; an idle claim is released after a timeout.
Claim ids are ``<handle>#<secret>``: looked up by handle, the secret compared in constant time.
"""

from __future__ import annotations

import hmac
import os
import platform
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gwms import classads
from gwms.config import HostConfig
from gwms.daemon import DaemonOptions, MessageListener, collectors, message_factory
from gwms.protocols.messages import Command, CommandError, Items, Request
from gwms.protocols.transfer import TransferError, decode_chunk, encode_chunk
from gwms.plugins.identity import IdentityError
from gwms.startd.accounts import JobAccounts

log = Logger()

# Seconds between checks for idle claims and expired job leases (the schedd's shadows allow
# for several of these before they give a job up: gwms.schedd.shadow.LEASE_MARGIN).
HOUSEKEEPING_INTERVAL = 5.0
# Seconds a slot's changes are gathered before its ad goes to the collector.
UPDATE_DELAY = 0.25
# Output files up to this size travel inline with the job's exit status.
INLINE_OUTPUT = 64 * 1024


def _new_claim_id() -> str:
    return f"{secrets.token_hex(8)}#{secrets.token_hex(32)}"


def _split_claim_id(claim_id: object) -> tuple[str, str]:
    if not isinstance(claim_id, str) or claim_id.count("#") != 1:
        raise CommandError("BAD_CLAIM", "a claim id is '<handle>#<secret>'")
    handle, secret = claim_id.split("#")
    return handle, secret


@dataclass
class Slot:
    name: str
    slot_type: str  # Static, Partitionable, Dynamic
    cpus: int
    memory: int
    disk: int
    capability: str = field(default_factory=_new_claim_id)
    state: str = "Unclaimed"
    activity: str = "Idle"
    entered_state: float = 0.0
    claim: "Claim | None" = None
    parent: "Slot | None" = None
    children: int = 0


@dataclass
class Claim:
    claim_id: str
    slot: Slot
    schedd: str
    user: str
    started: float
    last_activity: float
    job_lease: float = 2400.0
    lease_deadline: float = 0.0
    starter: Any = None
    job_id: str = ""
    submitter: str = ""  # user@domain, as the negotiator accounts usage
    waiters: list[defer.Deferred[Any]] = field(default_factory=list)


def _machine_resources(execute: Path) -> tuple[int, int, int]:
    cpus = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        memory = 1024
    disk = shutil.disk_usage(execute).free // 1024
    return cpus, memory, disk


class Startd:
    """Slots and claims; the commands the schedd's shadows use."""

    def __init__(self, reactor: Any, config: HostConfig, switch: Any, process_factory: Any = None) -> None:
        self.reactor = reactor
        self.process_factory = process_factory  # JobProcess by default; gwms.testing passes a fake
        settings = config.section("startd")
        self.settings = settings
        self.switch = switch
        self.machine = settings["name"] or socket.getfqdn()
        self.execute = Path(settings["execute"])
        self.execute.mkdir(parents=True, exist_ok=True, mode=0o755)
        # Which accounts jobs run as: execute dir and pilot credential modes, shared identity.
        self.accounts = JobAccounts(switch, settings)
        self.accounts.startup(self.execute, settings["pilot_credential"])
        cpus, memory, disk = _machine_resources(self.execute)
        cpus = settings["cpus"] or cpus
        memory = settings["memory"] or memory
        disk = settings["disk"] or disk
        self.start_expr = classads.parse_expr(settings["start"])
        self.rank_expr = classads.parse_expr(settings["rank"])
        self.extra = {name: classads.parse_expr(text) for name, text in settings["attributes"].items()}
        self.address = ""
        self.slots: dict[str, Slot] = {}
        self.claims: dict[str, Claim] = {}  # handle -> claim
        self.draining = False
        now = reactor.seconds()
        # A glidein's lifetime (retire_after, max_lifetime, max_idle; see lifetime_check).
        self.started_at = now
        self.retiring = False
        self.idle_since: float | None = now  # when the last claim went away (None: claimed)
        self.exit_requested: Callable[[str], None] | None = None  # set by the service
        self.tls_pin: str | None = None  # the fingerprint of a certificate of its own (set by the service)
        self.broker: tuple[str, str] | None = None  # (broker's registration address, name there)
        if settings["partitionable"]:
            self._add(Slot(f"slot1@{self.machine}", "Partitionable", cpus, memory, disk, entered_state=now))
        else:
            n = max(1, settings["slots"])
            for i in range(n):
                self._add(Slot(f"slot{i + 1}@{self.machine}", "Static", max(1, cpus // n), memory // n,
                               disk // n, entered_state=now))
        # Removing a finished job's sandbox: here, or (the service) in a thread, so that a
        # slow file system's unlinks and rmdirs do not hold up the next job's activation.
        self.remove_sandbox: Callable[[Path], defer.Deferred[None]] = _remove_sandbox_now
        # A delegated proxy's new RSA key (tens of ms): here, or (the service) in a thread.
        self.new_delegation_key: Callable[[], defer.Deferred[Any]] = _new_delegation_key_now
        self.advertiser: Any = None  # a callable(slot) set by the service
        self.invalidator: Any = None  # likewise, for dynamic slots that go away

    def _add(self, slot: Slot) -> None:
        self.slots[slot.name] = slot

    # -- ads ----------------------------------------------------------------------------------
    def slot_ad(self, slot: Slot) -> classads.ClassAd:
        ad = classads.ClassAd()
        ad["MyType"] = "Machine"
        ad["TargetType"] = "Job"
        ad["Name"] = slot.name
        ad["Machine"] = self.machine
        ad["MyAddress"] = self.address
        ad["OpSys"] = "LINUX"
        ad["Arch"] = {"x86_64": "X86_64", "aarch64": "AARCH64"}.get(platform.machine(), platform.machine().upper())
        ad["Cpus"] = slot.cpus
        ad["Memory"] = slot.memory
        ad["Disk"] = slot.disk
        ad["SlotType"] = slot.slot_type
        ad["State"] = slot.state
        ad["Activity"] = slot.activity
        ad["EnteredCurrentState"] = int(slot.entered_state)
        # Restricted to one Owner once one has the startd's account (identity_switch = none).
        ad["Start"] = self.accounts.start(self.start_expr, (c.user for c in self.claims.values()))
        ad["Requirements"] = classads.parse_expr("START")
        ad["Rank"] = self.rank_expr
        ad["TotalSlots"] = len(self.slots)
        if self.tls_pin is not None:  # how schedds know this startd: it has no CA-signed certificate
            ad["TLSCertificateSHA256"] = self.tls_pin
        if self.broker is not None:  # where to ask it to connect back instead of relaying (gwms.gcb)
            ad["GCBBroker"], ad["GCBName"] = self.broker
        try:
            ad["LoadAvg"] = os.getloadavg()[0]
        except OSError:
            pass
        for name, expr in self.extra.items():
            ad[name] = expr
        if slot.claim is not None:
            ad["RemoteUser"] = slot.claim.submitter
            ad["RemoteOwner"] = slot.claim.user
            ad["RemoteScheddName"] = slot.claim.schedd
            if slot.claim.job_id:
                ad["JobId"] = slot.claim.job_id
        if self.retiring:
            ad["Start"] = False  # a retiring glidein takes no new claims
        if slot.state == "Unclaimed" and not self.draining and not self.retiring:
            ad["ClaimId"] = slot.capability  # private: only NEGOTIATOR-level queries see it
        return ad

    def _changed(self, slot: Slot) -> None:
        if self.advertiser is not None:
            self.advertiser(slot)

    def _set_state(self, slot: Slot, state: str, activity: str) -> None:
        if (slot.state, slot.activity) != (state, activity):
            slot.state, slot.activity = state, activity
            slot.entered_state = self.reactor.seconds()

    # -- claims -------------------------------------------------------------------------------
    def _slot_for_capability(self, capability: object) -> Slot:
        handle, secret = _split_claim_id(capability)
        for slot in self.slots.values():
            s_handle, s_secret = slot.capability.split("#")
            if s_handle == handle:
                if hmac.compare_digest(s_secret, secret) and slot.slot_type != "Dynamic":
                    return slot
                break
        raise CommandError("BAD_CLAIM", "no slot has that capability (it was used or is stale)")

    def claim_for(self, request: Request) -> Claim:
        handle, secret = _split_claim_id(request.ad.get("ClaimId"))
        claim = self.claims.get(handle)
        if claim is None or not hmac.compare_digest(claim.claim_id.split("#")[1], secret):
            raise CommandError("UNKNOWN_CLAIM", "no such claim on this startd")
        claim.last_activity = self.reactor.seconds()
        return claim

    def request_claim(self, request: Request) -> classads.ClassAd:
        if self.draining:
            raise CommandError("SHUTTING_DOWN", "this startd is shutting down")
        if self.retiring:
            raise CommandError("RETIRING", "this startd is retiring: it takes no new claims")
        slot = self._slot_for_capability(request.ad.get("ClaimId"))
        job = request.ad.get("JobAd")
        if not isinstance(job, classads.ClassAd):
            raise CommandError("MALFORMED_AD", "REQUEST_CLAIM needs a JobAd")
        # An account to run it as (SHARED_IDENTITY, IDENTITY_REFUSED), before anything changes.
        self.accounts.check(job, (c.user for c in self.claims.values()))
        want = {k: _positive(job.get(k), d) for k, d in (("RequestCpus", 1), ("RequestMemory", 128),
                                                          ("RequestDisk", 1024))}
        if slot.slot_type == "Partitionable":
            if want["RequestCpus"] > slot.cpus or want["RequestMemory"] > slot.memory or want["RequestDisk"] > slot.disk:
                raise CommandError("REFUSED", f"{slot.name} has not enough resources left for this job")
            slot.children += 1
            target = Slot(f"{slot.name.split('@')[0]}_{slot.children}@{self.machine}", "Dynamic",
                          want["RequestCpus"], want["RequestMemory"], want["RequestDisk"], parent=slot,
                          entered_state=self.reactor.seconds())
            check = self.slot_ad(target)
        else:
            if slot.state != "Unclaimed":
                raise CommandError("REFUSED", f"{slot.name} is already claimed")
            target = slot
            check = self.slot_ad(slot)
        # The slot's Requirements is START, so the symmetric match applies START to the job.
        if not classads.symmetric_match(job, check):
            raise CommandError("REFUSED", f"{slot.name} does not accept this job (START or Requirements)")
        if slot.slot_type == "Partitionable":
            slot.cpus -= target.cpus
            slot.memory -= target.memory
            slot.disk -= target.disk
            self._add(target)
            self._changed(slot)
        else:
            slot.capability = _new_claim_id()  # a capability is good for one claim
        now = self.reactor.seconds()
        claim = Claim(_new_claim_id(), target, str(request.ad.get("Schedd", "")), str(job.get("Owner", "")),
                      started=now, last_activity=now, submitter=str(job.get("User", job.get("Owner", ""))))
        self.claims[claim.claim_id.split("#")[0]] = claim
        self.idle_since = None
        target.claim = claim
        self._set_state(target, "Claimed", "Idle")
        self._changed(target)
        if self.accounts.restricting:  # START of the other slots now names the claim's Owner
            for other in self.slots.values():
                self._changed(other)
        reply = classads.ClassAd()
        reply["ClaimId"] = claim.claim_id
        reply["SlotName"] = target.name
        reply["SlotAd"] = self.slot_ad(target)
        return reply

    def activate(self, request: Request) -> classads.ClassAd:
        from gwms.startd.starter import Starter

        claim = self.claim_for(request)
        if claim.starter is not None:
            # The schedd may activate the claim for its next job without deactivating the last
            # one first (one round trip fewer per job): it names the job it is done with, which
            # must have ended.
            replaces = request.ad.get("Replaces")
            if not replaces or replaces != claim.job_id or claim.starter.result is None:
                raise CommandError("BUSY", "the claim is running a job")
            self._end_job(claim)
            if not self._reusable(claim):
                self.release(claim)
                raise CommandError("CLAIM_ENDED", "the claim's worklife is over: it takes no further job")
        job = request.ad.get("JobAd")
        if not isinstance(job, classads.ClassAd):
            raise CommandError("MALFORMED_AD", "ACTIVATE_CLAIM needs a JobAd")
        if str(job.get("Owner", "")) != claim.user:
            raise CommandError("REFUSED", "a claim runs jobs of the user it was made for only")
        self.accounts.check(job, (c.user for c in self.claims.values()))
        try:
            claim.starter = Starter(self.reactor, self.switch, self.execute, claim.slot.name, job,
                                    self.process_factory)
        except IdentityError as e:  # the account changed since the check (passwd, grid-mapfile)
            raise CommandError("IDENTITY_REFUSED", f"no account to run the job as: {e}") from None
        if self.accounts.running(job):
            for slot in self.slots.values():  # START now names the Owner that has the account
                self._changed(slot)
        claim.job_id = f"{job.get('ClusterId')}.{job.get('ProcId')}"
        claim.job_lease = float(_positive(job.get("JobLeaseDuration"), 2400))
        claim.lease_deadline = self.reactor.seconds() + claim.job_lease
        self._set_state(claim.slot, "Claimed", "Busy")
        self._changed(claim.slot)
        if request.ad.get("StartNow", False):
            # A job with no input sandbox starts with its activation: one round trip fewer.
            return self._start(claim)
        return classads.ClassAd()

    def put_file(self, request: Request) -> classads.ClassAd:
        claim = self.claim_for(request)
        ad = request.ad
        starter = self._starter(claim)
        try:
            starter.put(ad.get("Name"), _int(ad.get("Offset")), decode_chunk(ad.get("Data", "")),
                        bool(ad.get("Final", False)), ad.get("Sha256"), bool(ad.get("Executable", False)))
        except (TransferError, OSError) as e:
            raise CommandError("TRANSFER_FAILED", str(e)) from None
        return classads.ClassAd()

    # -- the job's proxy, delegated the GSI way (the key pair is made here, never sent) --------
    def _delegation_starter(self, request: Request) -> Any:
        """The starter of the claim's current job, if the request names that job, it has a
        proxy and has not ended: delegation is for the claim's current job only."""
        claim = self.claim_for(request)
        starter = self._starter(claim)
        named = request.ad.get("JobId")
        if named != claim.job_id:
            raise CommandError("NO_JOB", f"the claim's current job is {claim.job_id}, not {named}")
        if starter.result is not None:
            raise CommandError("NO_JOB", f"job {claim.job_id} has ended")
        if not starter.job.get("x509userproxy"):
            raise CommandError("REFUSED", f"job {claim.job_id} has no x509userproxy to delegate")
        return starter

    def delegate_request(self, request: Request) -> classads.ClassAd:
        """DELEGATE_REQUEST [ClaimId, JobId] -> [Request: a PEM certificate request]: the
        starter makes a new key pair for the job's proxy and asks for its certificate."""
        from gwms.credentials.x509 import CredentialError

        starter = self._delegation_starter(request)

        def made(key: Any) -> classads.ClassAd:
            try:
                pem = starter.delegation_request(key)
            except (CredentialError, OSError) as e:
                raise CommandError("DELEGATION_FAILED", str(e)) from None
            reply = classads.ClassAd()
            reply["Request"] = pem.decode("ascii")
            return reply

        return self.new_delegation_key().addCallback(made)

    def delegate_proxy(self, request: Request) -> classads.ClassAd:
        """DELEGATE_PROXY [ClaimId, JobId, Proxy: the PEM chain signed for the request's key]:
        the starter writes key and chain to the job's proxy file (0600, the job's account),
        replacing an earlier one atomically. Replies with the proxy's Subject and Expiration."""
        from gwms.credentials.x509 import CredentialError

        starter = self._delegation_starter(request)
        chain = request.ad.get("Proxy")
        if not isinstance(chain, str):
            raise CommandError("MALFORMED_AD", "DELEGATE_PROXY needs Proxy, a PEM certificate chain")
        try:
            info = starter.accept_delegation(chain)
        except (CredentialError, OSError) as e:
            raise CommandError("DELEGATION_FAILED", str(e)) from None
        reply = classads.ClassAd()
        reply["Subject"] = info.subject
        reply["Expiration"] = int(info.not_after.timestamp())
        return reply

    def start_job(self, request: Request) -> classads.ClassAd:
        return self._start(self.claim_for(request))

    def _start(self, claim: Claim) -> classads.ClassAd:
        starter = self._starter(claim)
        try:
            starter.start()
        except (TransferError, OSError) as e:
            raise CommandError("START_FAILED", str(e)) from None
        starter.finished.addBoth(lambda _: self._job_ended(claim))
        reply = classads.ClassAd()
        reply["StarterPid"] = starter.process.pid or 0
        return reply

    def _job_ended(self, claim: Claim) -> None:
        waiters, claim.waiters = claim.waiters, []
        for d in waiters:
            if not d.called:
                d.callback(self._status(claim))

    def _starter(self, claim: Claim) -> Any:
        if claim.starter is None:
            raise CommandError("NO_JOB", "the claim has no active job")
        return claim.starter

    def _status(self, claim: Claim, evicted: str | None = None) -> classads.ClassAd:
        ad = classads.ClassAd()
        starter = claim.starter
        if evicted:
            ad["Evicted"] = True
            ad["Reason"] = evicted
        result = starter.result if starter is not None else None
        ad["Running"] = bool(starter is not None and starter.running)
        if starter is not None:  # accounting: RemoteAccount (and RemoteAccountDN)
            self.accounts.describe(getattr(starter, "identity", None), ad)
        usage = None
        if result is not None and getattr(result, "failure", None):
            # The startd lost the job (its launcher died): not the job's own exit. The shadow
            # puts it back in the queue.
            ad["Evicted"] = True
            ad["Reason"] = f"the startd lost the job: {result.failure}"
        elif result is not None and hasattr(result, "usage"):
            ad["Exited"] = True
            ad["ExitBySignal"] = result.exit_signal is not None
            if result.exit_signal is not None:
                ad["ExitSignal"] = result.exit_signal
            else:
                ad["ExitCode"] = result.exit_code if result.exit_code is not None else -1
            ad["LeftoverProcessesKilled"] = result.leftover_processes_killed
            ad["ClaimReusable"] = self._reusable(claim)
            usage = result.usage
            try:
                if starter.output_listing is None:  # hashed once, however often the shadow asks
                    starter.output_listing = self._outputs(starter)
                ad["Outputs"] = starter.output_listing
            except (OSError, TransferError) as e:  # the shadow then asks with LIST_OUTPUT
                log.warn("cannot list the output of {job}: {error}", job=claim.job_id, error=str(e))
        elif starter is not None and starter.process is not None:
            usage = starter.process.usage()
        if usage is not None:
            ad["RemoteUserCpu"] = float(usage.user_cpu)
            ad["RemoteSysCpu"] = float(usage.sys_cpu)
            ad["RemoteWallClockTime"] = float(usage.wall)
            ad["ResidentSetSize"] = int(usage.peak_rss_kb)
            ad["MemoryUsage"] = int((usage.peak_rss_kb + 1023) // 1024)
        return ad

    def wait_job(self, request: Request) -> Any:
        claim = self.claim_for(request)
        starter = self._starter(claim)
        claim.lease_deadline = self.reactor.seconds() + claim.job_lease
        if starter.result is not None or not starter.running and starter.process is not None:
            return self._status(claim)
        timeout = min(max(float(_positive(request.ad.get("Timeout"), 20)), 0.1), 30.0)
        d: defer.Deferred[Any] = defer.Deferred()
        claim.waiters.append(d)

        def still_running() -> None:
            if d in claim.waiters:
                claim.waiters.remove(d)
                d.callback(self._status(claim))

        timer = self.reactor.callLater(timeout, still_running)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    def _outputs(self, starter: Any) -> list[classads.ClassAd]:
        """The output sandbox's listing, with the content of small files inline: for most jobs
        the whole output comes back with the exit status, in no extra round trip."""
        listing = []
        for entry in starter.outputs():
            item = classads.ClassAd()
            for k, v in entry.items():
                item[k] = v
            if not entry["Missing"] and entry["Size"] <= INLINE_OUTPUT:
                data, _eof = starter.read(entry["Name"], 0, INLINE_OUTPUT)
                item["Data"] = encode_chunk(data)
            listing.append(item)
        return listing

    def list_output(self, request: Request) -> Items:
        starter = self._starter(self.claim_for(request))
        if starter.running:
            raise CommandError("RUNNING", "the job is still running")
        items = []
        for entry in starter.outputs():
            ad = classads.ClassAd()
            for k, v in entry.items():
                ad[k] = v
            items.append(ad)
        return Items(items)

    def get_file(self, request: Request) -> classads.ClassAd:
        starter = self._starter(self.claim_for(request))
        try:
            data, eof = starter.read(request.ad.get("Name"), _int(request.ad.get("Offset")),
                                     _int(request.ad.get("Length", 0)))
        except (TransferError, OSError) as e:
            raise CommandError("TRANSFER_FAILED", str(e)) from None
        reply = classads.ClassAd()
        reply["Data"] = encode_chunk(data)
        reply["EOF"] = eof
        return reply

    def deactivate(self, request: Request) -> classads.ClassAd:
        claim = self.claim_for(request)
        self._end_job(claim)
        reply = classads.ClassAd()
        reply["Released"] = not self._reusable(claim)
        if reply["Released"]:
            self.release(claim)
        return reply

    def _reusable(self, claim: Claim) -> bool:
        """Whether the claim takes another job: not once its worklife is over (HTCondor's
        CLAIM_WORKLIFE), nor while the startd shuts down."""
        return (not self.draining and not self.retiring
                and self.reactor.seconds() - claim.started < self.settings["claim_worklife"])

    def _end_job(self, claim: Claim) -> None:
        starter, claim.starter = claim.starter, None
        claim.job_id = ""
        if starter is not None:
            if starter.running:
                starter.kill(0)
            starter.close()
            self.remove_sandbox(starter.sandbox).addErrback(
                lambda f: log.warn("removing the sandbox {path} failed ({error}); the startd sweeps it at its "
                                   "next start", path=str(starter.sandbox), error=f.getErrorMessage()))
        if claim.slot.claim is claim:
            self._set_state(claim.slot, "Claimed", "Idle")
            self._changed(claim.slot)

    def release_command(self, request: Request) -> Any:
        claim = self.claim_for(request)
        return self.release(claim)

    def release(self, claim: Claim) -> defer.Deferred[Any]:
        """Kill what runs (no grace: the schedd asked, or the lease is gone), free the slot."""
        self.claims.pop(claim.claim_id.split("#")[0], None)
        if not self.claims:
            self.idle_since = self.reactor.seconds()
        starter = claim.starter
        killing = starter.kill(0) if starter is not None and starter.running else defer.succeed(None)

        def freed(_: Any) -> classads.ClassAd:
            self._end_job(claim)
            slot = claim.slot
            slot.claim = None
            if slot.slot_type == "Dynamic" and slot.parent is not None:
                parent = slot.parent
                parent.cpus += slot.cpus
                parent.memory += slot.memory
                parent.disk += slot.disk
                self.slots.pop(slot.name, None)
                if self.invalidator is not None:
                    self.invalidator(slot)
                self._changed(parent)
            else:
                self._set_state(slot, "Unclaimed", "Idle")
                self._changed(slot)
            return classads.ClassAd()

        return killing.addBoth(freed)

    def kill_job(self, request: Request) -> Any:
        claim = self.claim_for(request)
        starter = self._starter(claim)
        grace = float(_positive(request.ad.get("Grace"), 0) or 0)
        return starter.kill(grace).addCallback(lambda _: self._status(claim))

    # -- housekeeping -------------------------------------------------------------------------
    def housekeeping(self) -> None:
        """Release idle claims and claims whose job lease ran out (the shadow is gone)."""
        now = self.reactor.seconds()
        for claim in list(self.claims.values()):
            if claim.starter is None and now - claim.last_activity > self.settings["idle_claim_timeout"]:
                log.info("releasing idle claim on {slot}", slot=claim.slot.name)
                self.release(claim)
            elif claim.starter is not None and now > claim.lease_deadline:
                log.warn("job lease of {job} on {slot} expired: killing it", job=claim.job_id, slot=claim.slot.name)
                self.release(claim)

    def lifetime_check(self) -> None:
        """A glidein's lifetime, checked with the housekeeping: past ``max_lifetime`` the startd
        exits whatever runs; past ``retire_after`` it takes no new claims (and no further jobs on
        the ones it has) and exits once none is left; with no claim for ``max_idle`` it exits."""
        settings = self.settings
        now = self.reactor.seconds()
        age = now - self.started_at
        if settings["max_lifetime"] and age >= settings["max_lifetime"]:
            return self._exit(f"its maximum lifetime ({settings['max_lifetime']:g} s) is reached")
        if settings["retire_after"] and age >= settings["retire_after"] and not self.retiring:
            log.info("retiring: no new claims after {s:g} s", s=settings["retire_after"])
            self.retiring = True
            for slot in self.slots.values():
                self._changed(slot)
        if self.retiring and not self.claims:
            return self._exit("it retired and no claim is left")
        if (settings["max_idle"] and self.idle_since is not None
                and now - self.idle_since >= settings["max_idle"]):
            return self._exit(f"no claim came for {settings['max_idle']:g} s")

    def _exit(self, why: str) -> None:
        if self.exit_requested is not None and not self.draining:
            log.info("the startd exits: {why}", why=why)
            self.exit_requested(why)

    def shutdown(self, grace: float) -> defer.Deferred[Any]:
        """Tell every shadow (their pending WAIT_JOB), give jobs ``grace``, kill them."""
        self.draining = True
        kills = []
        for claim in list(self.claims.values()):
            waiters, claim.waiters = claim.waiters, []
            for d in waiters:
                if not d.called:
                    d.callback(self._status(claim, evicted="the startd is shutting down"))
            if claim.starter is not None and claim.starter.running:
                kills.append(claim.starter.kill(grace))
        return defer.DeferredList(kills)

    def commands(self) -> list[Command]:
        return [
            Command("REQUEST_CLAIM", "DAEMON", self.request_claim),
            Command("ACTIVATE_CLAIM", "DAEMON", self.activate),
            Command("PUT_FILE", "DAEMON", self.put_file),
            Command("DELEGATE_REQUEST", "DAEMON", self.delegate_request),
            Command("DELEGATE_PROXY", "DAEMON", self.delegate_proxy),
            Command("START_JOB", "DAEMON", self.start_job),
            Command("WAIT_JOB", "DAEMON", self.wait_job),
            Command("LIST_OUTPUT", "DAEMON", self.list_output),
            Command("GET_FILE", "DAEMON", self.get_file),
            Command("DEACTIVATE_CLAIM", "DAEMON", self.deactivate),
            Command("RELEASE_CLAIM", "DAEMON", self.release_command),
            Command("KILL_JOB", "DAEMON", self.kill_job),
        ]


def _remove_sandbox_now(path: Path) -> defer.Deferred[None]:
    from gwms.startd.process import remove_sandbox

    return defer.maybeDeferred(remove_sandbox, path)


def _new_delegation_key_now() -> defer.Deferred[Any]:
    from gwms.credentials.x509 import new_delegation_key

    return defer.maybeDeferred(new_delegation_key)


def _positive(value: Any, default: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return default
    return int(value) if float(value).is_integer() else value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CommandError("MALFORMED_AD", "offsets and lengths are non-negative integers")
    return value


class StartdService(service.MultiService):
    def __init__(self, reactor: Any, config: HostConfig) -> None:
        from gwms.plugins import IDENTITY_SWITCHES, load_plugin
        from gwms.interfaces import IIdentitySwitch

        super().__init__()
        self.reactor = reactor
        settings = config.section("startd")
        switch = load_plugin("identity switch", settings["identity_switch"], IDENTITY_SWITCHES, IIdentitySwitch, config)
        self.startd = Startd(reactor, config, switch)
        self.startd.remove_sandbox = self._remove_sandbox_in_thread
        self.startd.new_delegation_key = self._new_delegation_key_in_thread
        self.startd.advertiser = self.advertise
        self.startd.invalidator = self.invalidate
        self.collectors = collectors(reactor, config)
        self.factory = message_factory(reactor, config, self.startd.commands())
        tls = self.factory.security.tls
        self.startd.tls_pin = tls.fingerprint if tls is not None else None
        from gwms.gcb.client import Brokers, brokered_listener_options

        # With broker_only the startd listens on no port at all: schedds reach it through its
        # brokers (gwms.gcb), which relay to it or have it connect back.
        tcp, brokered = brokered_listener_options(config, settings["listen"])
        self.listener = MessageListener(reactor, self.factory, tcp, None, settings["address_file"],
                                        advertise_toward=next(iter(config.pool["collectors"]), None))
        self.listener.setServiceParent(self)
        self.brokers = None
        self.address_file = settings["address_file"]
        if brokered:
            from gwms.daemon import client_security

            self.brokers = Brokers(reactor, config.pool["brokers"], f"startd@{self.startd.machine}", self.factory,
                                   client_security(config), self._broker_address)
            self.brokers.setServiceParent(self)
        self.update_interval = settings["update_interval"]
        self.grace = settings["shutdown_grace"]
        self._updates = LoopingCall(self.advertise_all)
        self._updates.clock = reactor
        self._pending_updates: set[str] = set()
        self._housekeeping = LoopingCall(self._housekeep)
        self._housekeeping.clock = reactor
        lifetimes = [t for t in (settings["retire_after"], settings["max_lifetime"], settings["max_idle"]) if t]
        # A glidein with a short lifetime is checked often enough to keep to it within a tenth.
        self.housekeeping_interval = min([HOUSEKEEPING_INTERVAL] + [max(0.2, t / 10) for t in lifetimes])
        self.startd.exit_requested = self._exit

    def _remove_sandbox_in_thread(self, path: Path) -> defer.Deferred[None]:
        from gwms.startd.process import remove_sandbox

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), remove_sandbox, path)

    def _new_delegation_key_in_thread(self) -> defer.Deferred[Any]:
        from gwms.credentials.x509 import new_delegation_key

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), new_delegation_key)

    def startService(self) -> None:
        from gwms.startd.process import become_subreaper, sweep_sandboxes

        become_subreaper()
        removed = sweep_sandboxes(self.startd.execute, keep=())
        if removed:
            log.info("removed {n} sandboxes left by an earlier startd", n=len(removed))
        super().startService()
        self.listener._listening.addCallback(self._listening)

    def _listening(self, _: Any) -> None:
        if self.brokers is None:
            self._set_address(str(self.listener.address))
        self._updates.start(self.update_interval, now=False)
        self._housekeeping.start(self.housekeeping_interval, now=False)

    def _broker_address(self) -> None:
        """A broker registered this startd (again), or its tunnel went down: the contact is its
        address at the first broker that has it registered now (another one takes over while
        the first is down)."""
        assert self.brokers is not None
        registered = self.brokers.current
        if registered is None:
            return  # none at the moment: the last address stays (it comes back on the same port)
        self.startd.broker = (str(registered.broker), registered.daemon_name)
        if registered.public != self.startd.address:
            self._set_address(registered.public)

    def _set_address(self, address: str) -> None:
        self.startd.address = address
        if self.brokers is not None and self.address_file is not None:
            from gwms.daemon import write_address_file

            write_address_file(self.address_file, address)
        # The first ads (and those after a change of address) go out at once; later changes
        # are coalesced (see advertise).
        for name in list(self.startd.slots):
            self._send_update(name)

    def advertise(self, slot: Slot) -> None:
        """Send the slot's ad on a change, coalescing changes that come within UPDATE_DELAY
        (a claim running short jobs flips Busy/Idle many times a second; the collector gets the
        state the slot settled in, a moment later)."""
        if not self.startd.address:
            return
        if slot.name not in self._pending_updates:
            self._pending_updates.add(slot.name)
            self.reactor.callLater(UPDATE_DELAY, self._send_update, slot.name)

    def _send_update(self, name: str) -> None:
        self._pending_updates.discard(name)
        slot = self.startd.slots.get(name)
        if slot is None or not self.running:
            return
        ad = self.startd.slot_ad(slot)
        ad["ClassAdLifetime"] = int(3 * self.update_interval)
        self.collectors.advertise(ad, "ADVERTISE_STARTD").addCallback(self._report)

    def invalidate(self, slot: Slot) -> None:
        query = classads.ClassAd()
        query["TargetType"] = "Machine"
        query["Name"] = slot.name
        self.collectors.advertise(query, "ADVERTISE_STARTD", command="INVALIDATE")

    def _report(self, results: list[Any]) -> None:
        for r in results:
            if hasattr(r, "getErrorMessage"):
                log.warn("slot update failed: {error}", error=r.getErrorMessage())

    def advertise_all(self) -> None:
        for slot in list(self.startd.slots.values()):
            self.advertise(slot)

    def _housekeep(self) -> None:
        self.startd.housekeeping()
        self.startd.lifetime_check()

    def _exit(self, why: str) -> None:
        """Stop the whole daemon (a glidein's end): the reactor's shutdown runs stopService,
        which tells the shadows, gives jobs their grace and kills them."""
        self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        for loop in (self._updates, self._housekeeping):
            if loop.running:
                loop.stop()
        yield self.startd.shutdown(self.grace)
        for slot in list(self.startd.slots.values()):
            self.invalidate(slot)
        for claim in list(self.startd.claims.values()):
            self.startd._end_job(claim)
        self.collectors.close()
        yield super().stopService()


class Options(DaemonOptions):
    pass


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    return StartdService(reactor, options["host_config"])
