"""The schedd (``twistd -n gwms-schedd --config FILE``): a submit host's durable job queue.

Users submit, query, remove, hold and release their jobs here (locally over the UNIX socket
with fs authentication, remotely with x509 or tokens mapped through the grid-mapfile); the
negotiator asks it for its idle jobs grouped into autoclusters and tells it about matches; for
each match the schedd claims the slot and runs a shadow (``gwms.schedd.shadow``).
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gwms import classads, eventlog, userfiles
from gwms.config import HostConfig
from gwms.daemon import DaemonOptions, MessageListener, client_security, collectors, message_factory
from gwms.protocols.client import Address, DaemonClient
from gwms.protocols.messages import Command, CommandError, ConnectionFailed, Items, Request
from gwms.schedd import proxy as user_proxy
from gwms.schedd.mapping import load_grid_mapfile, local_user
from gwms.schedd.queue import COMPLETED, HELD, IDLE, REMOVED, RUNNING, JobQueue, format_job_id, parse_job_id
from gwms.schedd.shadow import ClaimHandle, Shadow
from gwms.security import AuthorizationRequest, Decision

log = Logger()

# Attributes that decide where a job can run: jobs equal in these form one autocluster.
AUTOCLUSTER_ATTRIBUTES = ("Owner", "RequestCpus", "RequestMemory", "RequestDisk", "Requirements", "Rank",
                          "DESIRED_Sites", "JobUniverse")
MAX_SUBMIT_PROCS = 1_000_000


def _ad(**values: Any) -> classads.ClassAd:
    ad = classads.ClassAd()
    for k, v in values.items():
        ad[k] = v
    return ad


class Schedd:
    def __init__(self, reactor: Any, config: HostConfig, queue: JobQueue, connector: Any = None,
                 security: Any = None, accounts: Any = None) -> None:
        settings = config.section("schedd")
        self.connector = connector
        # user name -> userfiles.Account; in-memory pools map their fake users to this account
        self.accounts = accounts or userfiles.Account.named
        self.reactor = reactor
        self.config = config
        self.settings = settings
        self.queue = queue
        self.name = settings["name"] or f"schedd@{socket.getfqdn()}"
        self.uid_domain = settings["uid_domain"] or config.pool["name"]
        self.grid_map = load_grid_mapfile(settings["grid_mapfile"])
        self.reconnect_interval = settings["reconnect_interval"]
        self.proxy_check_interval = settings["proxy_check_interval"]
        self.address = ""
        self.shadows: dict[tuple[int, int], Shadow] = {}
        self.starting: set[tuple[int, int]] = set()  # matched, claim in progress
        self._pending_submits: dict[tuple[int, int], tuple[classads.ClassAd, list[classads.ClassAd]]] = {}
        self._startds: dict[str, DaemonClient] = {}
        self._security = security or client_security(config)
        self.events = eventlog.EventLogWriter(self._open_user_log)
        self._log_accounts: dict[Path, userfiles.Account] = {}
        self.poke_negotiator: Any = None  # set by the service
        self._autoclusters: dict[tuple[Any, ...], int] = {}
        self._job_autocluster: dict[tuple[int, int], int] = {}
        self._flush_pending = False
        self._retiring: list[tuple[tuple[int, int], defer.Deferred[None]]] = []
        self._commit_waiters: list[defer.Deferred[None]] = []

    # -- who is asking ------------------------------------------------------------------------
    def user_of(self, request: Request) -> str:
        user = local_user(request.identity, self.grid_map)
        if user is None:
            raise CommandError("PERMISSION_DENIED", f"{request.identity.name} has no local account on this "
                                                    "submit host (not in the grid-mapfile)")
        return user

    def account_of(self, job: classads.ClassAd | None) -> userfiles.Account:
        return self.accounts(str(job.get("Owner", ""))) if job is not None else userfiles.Account("nobody", 65534, 65534)

    # -- durability: one transaction per reactor turn ------------------------------------------
    def commit_soon(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self.reactor.callLater(0, self._flush)

    def committed(self) -> defer.Deferred[None]:
        """Fires once every change made so far is on disk: one transaction (one fsync) per
        reactor turn serves every shadow that waits in that turn."""
        d: defer.Deferred[None] = defer.Deferred()
        self._commit_waiters.append(d)
        self.commit_soon()
        return d

    def retire_soon(self, job_id: tuple[int, int]) -> defer.Deferred[None]:
        """Move a finished job to the history durably, in the same transaction as every other
        change of this reactor turn (a shadow marks its claim's next job running in the turn
        its last job completes: one fsync for both); fires once it is on disk."""
        d: defer.Deferred[None] = defer.Deferred()
        self._retiring.append((job_id, d))
        self.commit_soon()
        return d

    def _flush(self) -> None:
        self._flush_pending = False
        retiring, self._retiring = self._retiring, []
        waiters, self._commit_waiters = self._commit_waiters, []
        waiters += [d for _, d in retiring]
        try:
            if retiring:
                self.queue.retire([job_id for job_id, _ in retiring])  # commits the rest too
            else:
                self.queue.commit()
        except Exception:
            failure = Failure()
            for d in waiters:
                d.errback(failure)
            if not retiring:
                raise
            return
        for d in waiters:
            d.callback(None)

    # -- event logs, written as the job's owner ------------------------------------------------
    def _open_user_log(self, path: Path) -> Any:
        account = self._log_accounts.get(path)
        if account is None:
            raise userfiles.UserFileError(f"no account for log {path}")
        return userfiles.open_for_append(account, path)

    def event(self, job: classads.ClassAd, text: str) -> None:
        log_file = job.get("UserLog")
        if not isinstance(log_file, str) or not log_file:
            return
        path = Path(str(job.get("Iwd", "/"))) / log_file
        try:
            # The writer's opener looks the owner up here, for exactly this append.
            self._log_accounts[path] = self.account_of(job)
            self.events.append(path, text)
        except (OSError, userfiles.UserFileError) as e:
            log.warn("cannot write event log {path}: {error}", path=str(path), error=str(e))
        finally:
            self._log_accounts.pop(path, None)

    def event_for(self, job_id: tuple[int, int], make: Any) -> None:
        if not self.queue.get(job_id, "UserLog"):
            return  # most jobs have no event log: do not build their ads for nothing
        job = self.queue.job(job_id)
        if job is not None:
            self.event(job, make(self.reactor.seconds()))

    # -- submission -----------------------------------------------------------------------------
    def new_cluster(self, request: Request) -> classads.ClassAd:
        try:
            self.accounts(self.user_of(request))
        except userfiles.UserFileError as e:
            raise CommandError("PERMISSION_DENIED", str(e)) from None
        cluster = self.queue.new_cluster()
        request.connection.__dict__.setdefault("gwms_clusters", set()).add(cluster)
        return _ad(ClusterId=cluster)

    def submit(self, request: Request) -> classads.ClassAd:
        """SUBMIT [ClusterId; ClusterAd (first frame); Procs = {...}; Final]: procs of a cluster
        may come in several frames; only the Final one queues them, all at once, durably."""
        user = self.user_of(request)
        try:
            account = self.accounts(user)
        except userfiles.UserFileError as e:
            raise CommandError("PERMISSION_DENIED", str(e)) from None
        ad = request.ad
        cluster = ad.get("ClusterId")
        if cluster not in request.connection.__dict__.get("gwms_clusters", set()):
            raise CommandError("BAD_CLUSTER", f"cluster {cluster} was not created on this connection (NEW_CLUSTER)")
        key = (id(request.connection), cluster)
        entry = self._pending_submits.get(key)
        if entry is None:
            cluster_ad = ad.get("ClusterAd")
            if not isinstance(cluster_ad, classads.ClassAd):
                raise CommandError("MALFORMED_AD", "the first SUBMIT of a cluster needs its ClusterAd")
            entry = (cluster_ad, [])
            self._pending_submits[key] = entry
        cluster_ad, procs = entry
        new = ad.get("Procs", [])
        if not isinstance(new, list) or not all(isinstance(p, classads.ClassAd) for p in new):
            self._pending_submits.pop(key, None)
            raise CommandError("MALFORMED_AD", "Procs must be a list of ads")
        procs.extend(new)
        if len(procs) > MAX_SUBMIT_PROCS:
            self._pending_submits.pop(key, None)
            raise CommandError("TOO_MANY_JOBS", f"more than {MAX_SUBMIT_PROCS} procs in one cluster")
        if not ad.get("Final", False):
            return _ad(Received=len(procs))
        del self._pending_submits[key]
        request.connection.__dict__["gwms_clusters"].discard(cluster)
        cluster_ad["ClusterId"] = cluster
        cluster_ad["Owner"] = account.user  # whatever the file said: the authenticated user owns it
        cluster_ad["User"] = f"{account.user}@{self.uid_domain}"
        cluster_ad["JobStatus"] = IDLE
        for proc in procs:
            for forced in ("Owner", "User", "ClusterId", "JobStatus"):
                if forced in proc:
                    del proc[forced]
        # What the proxy file says is read by the schedd (below), never taken from the client.
        for ad_ in (cluster_ad, *procs):
            for forced in (user_proxy.SUBJECT, user_proxy.EXPIRATION):
                if forced in ad_:
                    del ad_[forced]
        try:
            ids = self.queue.submit(cluster_ad, procs)
        except Exception as e:  # QueueError, ClassAdError: the message says what was wrong
            raise CommandError("SUBMIT_FAILED", str(e)) from None
        now = self.reactor.seconds()
        submit_host = f"<{self.address}>"
        first = self.queue.job(ids[0])
        if first is not None and first.get("UserLog"):
            for job_id in ids:
                job = self.queue.job(job_id)
                self.event(job, eventlog.submit_event(job_id[0], job_id[1], now, submit_host))
        if "x509userproxy" in cluster_ad or any("x509userproxy" in proc for proc in procs):
            # The submit is durable and acknowledged whatever the proxy is like: a bad one
            # holds the jobs (with the reason), it does not refuse them.
            try:
                self.check_proxies(ids)
            except Exception:
                log.failure("checking the proxies of cluster {cluster}", cluster=cluster)
        if self.poke_negotiator is not None:
            self.poke_negotiator()
        return _ad(ClusterId=cluster, Count=len(ids))

    # -- queries and actions --------------------------------------------------------------------
    def query_jobs(self, request: Request) -> Items:
        constraint, projection, owner = self._query_args(request)
        if request.ad.get("Summary", False) and constraint is None:
            # Counts by status only: what progress displays poll for, without building ads.
            counts = self.queue.count_by_status(owner=owner)
            return Items([], _ad(Count=sum(counts.values()), Idle=counts.get(IDLE, 0),
                                 Running=counts.get(RUNNING, 0), Held=counts.get(HELD, 0)))
        items = []
        for _job_id, job in self.queue.jobs(constraint, owner=owner):
            items.append(classads.project(job, projection) if projection else job)
        return Items(items, _ad(Count=len(items)))

    def query_history(self, request: Request) -> Items:
        constraint, projection, owner = self._query_args(request)
        limit = request.ad.get("Limit")
        limit = limit if isinstance(limit, int) and limit > 0 else None
        items = [classads.project(j, projection) if projection else j
                 for j in self.queue.history(constraint, owner=owner, limit=limit)]
        return Items(items, _ad(Count=len(items)))

    def _query_args(self, request: Request) -> tuple[str | None, list[str], str | None]:
        ad = request.ad
        constraint = ad.get("Constraint")
        if constraint is not None and not isinstance(constraint, str):
            raise CommandError("MALFORMED_AD", "Constraint must be a string expression")
        if constraint:
            try:
                classads.compile_constraint(constraint)
            except classads.ClassAdError as e:
                raise CommandError("MALFORMED_AD", f"bad constraint: {e}") from None
        projection = [a for a in str(ad.get("Projection", "") or "").replace(",", " ").split() if a]
        owner = ad.get("Owner")
        return constraint or None, projection, owner if isinstance(owner, str) and owner else None

    def act_on_jobs(self, request: Request) -> classads.ClassAd:
        user = self.user_of(request)
        ad = request.ad
        action = str(ad.get("Action", "")).lower()
        if action not in ("remove", "hold", "release"):
            raise CommandError("MALFORMED_AD", "Action must be remove, hold or release")
        reason = str(ad.get("Reason", "") or f"via gwms {action} (by user {user})")
        targets = self._targets(ad)
        admin: bool | None = None
        done, refused, missing = [], [], []
        for job_id in targets:
            owner = self.queue.owner(job_id)
            if owner is None:
                missing.append(format_job_id(job_id))
                continue
            if owner != user:
                if admin is None:
                    admin = request.is_allowed("ADMINISTRATOR")
                if not admin:
                    refused.append(format_job_id(job_id))
                    continue
            if self._act(job_id, action, reason):
                done.append(format_job_id(job_id))
        self.queue.commit()  # acknowledged actions are durable
        if refused:
            # An attempt on other users' jobs is a security event: one audit record, like any
            # other refusal.
            request.connection.security.auditor.record(
                AuthorizationRequest(request.identity, request.channel.peer_host, request.command, request.level),
                Decision(False, f"owner: {user} may not {action} jobs of other users ({', '.join(refused)})"))
        return _ad(Count=len(done), Done=done, Refused=refused, NotFound=missing)

    def _targets(self, ad: classads.ClassAd) -> list[tuple[int, int]]:
        ids = ad.get("JobIds")
        if isinstance(ids, list):
            targets = []
            for text in ids:
                try:
                    if isinstance(text, str) and "." not in text:
                        targets.extend(j for j in self.queue.ids() if j[0] == int(text))
                    else:
                        targets.append(parse_job_id(str(text)))
                except ValueError as e:
                    raise CommandError("MALFORMED_AD", str(e)) from None
            return targets
        constraint = ad.get("Constraint")
        if isinstance(constraint, str) and constraint:
            try:
                return [job_id for job_id, _ in self.queue.jobs(constraint)]
            except classads.ClassAdError as e:
                raise CommandError("MALFORMED_AD", f"bad constraint: {e}") from None
        raise CommandError("MALFORMED_AD", "name jobs with JobIds or Constraint")

    def _act(self, job_id: tuple[int, int], action: str, reason: str, code: int = 1, subcode: int = 0) -> bool:
        """remove, hold (HoldReasonCode ``code``: 1 by a user, 3 by job policy, as HTCondor) or
        release one job; a running job is killed by its shadow first."""
        status = self.queue.get(job_id, "JobStatus")
        if action == "release":
            if status != HELD:
                return False
            self.queue.set_status(job_id, IDLE, reason=reason, now=self.reactor.seconds())
            self.event_for(job_id, lambda t: eventlog.released_event(*job_id, t, reason))
            self._forget_autocluster(job_id)
            if self.poke_negotiator is not None:
                self.poke_negotiator()
            return True
        target = REMOVED if action == "remove" else HELD
        if status in (REMOVED, COMPLETED) or (status == HELD and target == HELD):
            return False
        shadow = self.shadows.get(job_id)
        if shadow is not None:
            shadow.request_kill(target, reason, code, subcode)
            return True  # the shadow kills the job and records the change (finish_kill)
        self.finish_kill(job_id, target, reason, code, subcode)
        return True

    def finish_kill(self, job_id: tuple[int, int], status: int, reason: str, code: int = 1, subcode: int = 0) -> None:
        if status == HELD:
            self.hold(job_id, reason, code=code, subcode=subcode)
        else:
            self.queue.set_status(job_id, REMOVED, reason=reason, now=self.reactor.seconds())
            self.event_for(job_id, lambda t: eventlog.aborted_event(*job_id, t, reason))
            self.queue.retire([job_id])
            self._forget_autocluster(job_id)

    # -- job state changes the shadows report ----------------------------------------------------
    def hold(self, job_id: tuple[int, int], reason: str, code: int = 0, subcode: int = 0) -> None:
        self.queue.set_status(job_id, HELD, reason=reason, now=self.reactor.seconds())
        self.queue.set(job_id, {"HoldReasonCode": code, "HoldReasonSubCode": subcode})
        self.event_for(job_id, lambda t: eventlog.held_event(*job_id, t, reason, code, subcode))
        self._forget_autocluster(job_id)
        self.commit_soon()

    def requeue(self, job_id: tuple[int, int], reason: str, evicted: bool = True, usage: Any = None) -> None:
        if self.queue.get(job_id, "JobStatus") != RUNNING:
            return
        self.queue.set_status(job_id, IDLE, reason=None, now=self.reactor.seconds())
        self.queue.set(job_id, {"LastVacateReason": reason})
        if evicted:
            user = float(usage.get("RemoteUserCpu", 0) if usage is not None else 0)
            sys = float(usage.get("RemoteSysCpu", 0) if usage is not None else 0)
            self.event_for(job_id, lambda t: eventlog.evicted_event(*job_id, t, user_cpu=user, sys_cpu=sys,
                                                                    reason=reason))
        self._forget_autocluster(job_id)
        self.commit_soon()
        if self.poke_negotiator is not None:
            self.poke_negotiator()

    def complete(self, job_id: tuple[int, int], status: classads.ClassAd) -> defer.Deferred[None]:
        queue = self.queue
        now = self.reactor.seconds()
        start = queue.get(job_id, "JobCurrentStartDate") or now
        wall = float(queue.get(job_id, "RemoteWallClockTime") or 0) + (now - float(start))
        values: dict[str, Any] = {"CompletionDate": int(now), "RemoteWallClockTime": wall,
                                  "ExitBySignal": bool(status.get("ExitBySignal", False))}
        for k in ("ExitCode", "ExitSignal", "RemoteUserCpu", "RemoteSysCpu", "ResidentSetSize", "MemoryUsage"):
            if k in status:
                values[k] = status[k]
        queue.set(job_id, values)
        queue.set_status(job_id, COMPLETED, now=now)
        self.event_for(job_id, lambda t: eventlog.terminated_event(
            *job_id, t, exit_code=status.get("ExitCode") if not values["ExitBySignal"] else None,
            exit_signal=status.get("ExitSignal") if values["ExitBySignal"] else None,
            user_cpu=float(status.get("RemoteUserCpu", 0)), sys_cpu=float(status.get("RemoteSysCpu", 0))))
        self._forget_autocluster(job_id)
        return self.retire_soon(job_id)

    # -- negotiation --------------------------------------------------------------------------
    def _autocluster_of(self, job_id: tuple[int, int]) -> int:
        ac = self._job_autocluster.get(job_id)
        if ac is None:
            key = tuple(str(self.queue.get(job_id, a)) for a in AUTOCLUSTER_ATTRIBUTES)
            ac = self._autoclusters.setdefault(key, len(self._autoclusters) + 1)
            self._job_autocluster[job_id] = ac
        return ac

    def _forget_autocluster(self, job_id: tuple[int, int]) -> None:
        self._job_autocluster.pop(job_id, None)

    def idle_jobs(self) -> list[tuple[int, int]]:
        return [j for j in self.queue.ids(IDLE) if j not in self.starting]

    def resource_requests(self, request: Request) -> Items:
        groups: dict[int, list[tuple[int, int]]] = {}
        for job_id in self.idle_jobs():
            groups.setdefault(self._autocluster_of(job_id), []).append(job_id)
        items = []
        for ac, jobs in sorted(groups.items(), key=lambda kv: min(kv[1])):
            job = self.queue.job(jobs[0])
            assert job is not None
            job["AutoClusterId"] = ac
            job["JobCount"] = len(jobs)
            job["Submitter"] = f"{job.get('Owner')}@{self.uid_domain}"
            job["ScheddName"] = self.name
            items.append(job)
        return Items(items, _ad(Count=len(items)))

    def match(self, request: Request) -> classads.ClassAd:
        ad = request.ad
        slot_ad = ad.get("SlotAd")
        ac = ad.get("AutoClusterId")
        if not isinstance(slot_ad, classads.ClassAd) or not isinstance(ac, int):
            raise CommandError("MALFORMED_AD", "MATCH needs SlotAd and AutoClusterId")
        job_id = next((j for j in self.idle_jobs() if self._autocluster_of(j) == ac), None)
        if job_id is None:
            return _ad(Accepted=False, Reason="no idle job left in that autocluster")
        self.starting.add(job_id)
        self.claim(job_id, slot_ad).addErrback(lambda f: log.failure("claiming for {job}", f, job=format_job_id(job_id)))
        return _ad(Accepted=True, JobId=format_job_id(job_id))

    def daemon(self, address: str, pin: object = None, broker: object = None, broker_name: object = None,
               identity: object = None) -> DaemonClient:
        """The client to a startd; ``pin``: the SHA-256 of the certificate it advertised, when it
        serves TLS with one of its own making (a glidein with only a token); ``broker`` and
        ``broker_name``: where it is registered, when it is behind a connection broker.
        ``identity``: the one the collector authenticated when it advertised the slot. Its
        certificate must prove that identity, rather than name the host of its address, when
        it is brokered (the address names the broker's host) and whenever the identity is a
        certificate's DN: a glidein on a batch node advertises whatever address the node has,
        which the pilot certificate cannot name, and what matters is that it is the startd
        the collector admitted."""
        pin = pin if isinstance(pin, str) and pin else None
        broker = broker if isinstance(broker, str) and broker else None
        broker_name = broker_name if isinstance(broker_name, str) and broker else None
        identity = (identity if isinstance(identity, str) and identity and not pin
                    and (broker or identity.startswith("/")) else None)
        key = f"{address}#{pin}#{broker}#{broker_name}#{identity}"
        client = self._startds.get(key)
        if client is None:
            target = dataclasses.replace(Address.parse(address), pin=pin, broker=broker, broker_name=broker_name,
                                         identity=identity)
            client = DaemonClient(self.reactor, target, self._security, connector=self.connector)
            self._startds[key] = client
        return client

    @defer.inlineCallbacks
    def claim(self, job_id: tuple[int, int], slot_ad: classads.ClassAd) -> Any:
        try:
            job = self.queue.job(job_id)
            address = str(slot_ad.get("MyAddress", ""))
            client = self.daemon(address, slot_ad.get("TLSCertificateSHA256"), slot_ad.get("GCBBroker"),
                                 slot_ad.get("GCBName"), slot_ad.get("AuthenticatedIdentity"))
            try:
                reply = yield client.call("REQUEST_CLAIM", _ad(ClaimId=slot_ad.get("ClaimId", ""), JobAd=job,
                                                              Schedd=self.name), "DAEMON")
            except (CommandError, ConnectionFailed) as e:
                log.info("claiming {slot} for {job} failed: {error}", slot=slot_ad.get("Name"),
                         job=format_job_id(job_id), error=str(e))
                return
            handle = ClaimHandle(client, str(reply["ClaimId"]), str(reply.get("SlotName", slot_ad.get("Name"))),
                                 reply.get("SlotAd", slot_ad), address)
        finally:
            self.starting.discard(job_id)
        yield Shadow(self, handle, job_id).run_claim()

    def next_job_for(self, claim: ClaimHandle) -> tuple[int, int] | None:
        """Claim reuse: another idle job of the claim's user that the slot accepts. Jobs of one
        autocluster are alike for matching, so the slot is matched once per autocluster."""
        user = claim.slot_ad.get("RemoteOwner")
        verdicts = claim.autocluster_matches
        for job_id in self.queue.ids(IDLE, owner=user if isinstance(user, str) else None):
            if job_id in self.starting:
                continue
            ac = self._autocluster_of(job_id)
            verdict = verdicts.get(ac)
            if verdict is None:
                job = self.queue.job(job_id)
                verdict = verdicts[ac] = job is not None and classads.symmetric_match(job, claim.slot_ad)
            if verdict:
                return job_id
        return None

    def reconnect_running(self) -> None:
        """After a restart: every job the queue says is running gets a shadow that reconnects
        to its starter; if that starter no longer has it, it goes back to idle."""
        for job_id in self.queue.ids(RUNNING):
            address = self.queue.get(job_id, "StartdAddress")
            claim_id = self.queue.get(job_id, "ClaimId")
            if not address or not claim_id:
                self.requeue(job_id, "no record of where the job was running", evicted=False)
                continue
            client = self.daemon(str(address), self.queue.get(job_id, "StartdTLSCertificateSHA256"),
                                 identity=self.queue.get(job_id, "StartdIdentity"))
            handle = ClaimHandle(client, str(claim_id), str(self.queue.get(job_id, "RemoteHost")),
                                 _ad(Name=str(self.queue.get(job_id, "RemoteHost")),
                                     RemoteOwner=self.queue.owner(job_id)), str(address))
            Shadow(self, handle, job_id).run_claim(reconnect=True).addErrback(
                lambda f: log.failure("reconnecting", f))

    # -- policy -------------------------------------------------------------------------------
    def check_proxies(self, job_ids: list[tuple[int, int]] | None = None) -> None:
        """The users' x509userproxy files (every proxy_check_interval, and at submit for
        ``job_ids``): record subject and expiration, hold jobs whose proxy is unreadable, not a
        credential or expired, delegate a refreshed one to running jobs (gwms.schedd.proxy)."""
        user_proxy.check_proxies(self, job_ids)

    def periodic(self) -> None:
        """periodic_hold / periodic_release / periodic_remove, with their reasons."""
        now = self.reactor.seconds()
        for job_id, job in list(self.queue.jobs()):
            job["CurrentTime"] = int(now)
            status = job.get("JobStatus")
            if status in (IDLE, RUNNING) and self._policy_true(job, "PeriodicHold"):
                reason = classads.evaluate(job, "PeriodicHoldReason")
                if not isinstance(reason, str) or not reason:
                    reason = "The job attribute PeriodicHold expression became true"
                subcode = classads.evaluate(job, "PeriodicHoldSubCode")
                self._act(job_id, "hold", reason, code=3, subcode=subcode if isinstance(subcode, int) else 0)
            elif status == HELD and self._policy_true(job, "PeriodicRelease"):
                self._act(job_id, "release", "The job attribute PeriodicRelease expression became true")
            elif status in (IDLE, RUNNING, HELD) and self._policy_true(job, "PeriodicRemove"):
                self._act(job_id, "remove", "The job attribute PeriodicRemove expression became true")
        self.commit_soon()

    @staticmethod
    def _policy_true(job: classads.ClassAd, attribute: str) -> bool:
        return attribute in job and classads.evaluate_constraint(job.lookup(attribute), job)

    # -- ads ----------------------------------------------------------------------------------
    def ads(self) -> list[classads.ClassAd]:
        counts = self.queue.count_by_status()
        ads = [_ad(MyType="Scheduler", Name=self.name, Machine=socket.getfqdn(), MyAddress=self.address,
                   ScheddIpAddr=self.address, TotalIdleJobs=counts.get(IDLE, 0),
                   TotalRunningJobs=counts.get(RUNNING, 0), TotalHeldJobs=counts.get(HELD, 0),
                   TotalJobAds=len(self.queue))]
        owners: dict[str, dict[int, int]] = {}
        for status in (IDLE, RUNNING, HELD):
            for job_id in self.queue.ids(status):
                owner = self.queue.owner(job_id) or "?"
                owners.setdefault(owner, {}).setdefault(status, 0)
                owners[owner][status] += 1
        for owner, c in owners.items():
            ads.append(_ad(MyType="Submitter", Name=f"{owner}@{self.uid_domain}", ScheddName=self.name,
                           MyAddress=self.address, ScheddIpAddr=self.address, Owner=owner,
                           IdleJobs=c.get(IDLE, 0), RunningJobs=c.get(RUNNING, 0), HeldJobs=c.get(HELD, 0)))
        return ads

    def commands(self) -> list[Command]:
        return [
            Command("NEW_CLUSTER", "WRITE", self.new_cluster),
            Command("SUBMIT", "WRITE", self.submit),
            Command("QUERY_JOBS", "READ", self.query_jobs),
            Command("QUERY_HISTORY", "READ", self.query_history),
            Command("ACT_ON_JOBS", "WRITE", self.act_on_jobs),
            Command("GET_RESOURCE_REQUESTS", "NEGOTIATOR", self.resource_requests),
            Command("MATCH", "NEGOTIATOR", self.match),
        ]


class ScheddService(service.MultiService):
    def __init__(self, reactor: Any, config: HostConfig) -> None:
        super().__init__()
        self.reactor = reactor
        settings = config.section("schedd")
        spool = Path(settings["spool"])
        spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.queue = JobQueue(spool / "job_queue.db", clock=reactor.seconds)
        self.schedd = Schedd(reactor, config, self.queue)
        self.schedd.poke_negotiator = self.poke_negotiator
        self.collectors = collectors(reactor, config)
        self.factory = message_factory(reactor, config, self.schedd.commands())
        host, port = settings["listen"]
        listening_factory = self.factory
        if config.pool["connect_back"]:
            # Brokered startds may connect to this schedd instead of being relayed (gwms.gcb).
            from gwms.gcb.reverse import ConnectBackConnector, ConnectBackFactory

            listening_factory = ConnectBackFactory(self.factory)
            # Only a schedd that can be reached asks for connect-backs: a brokered one is relayed.
            self.schedd.connector = ConnectBackConnector(
                reactor, listening_factory, lambda: "" if self.brokers is not None else self.schedd.address,
                self.schedd._security)
        from gwms.gcb.client import Brokers, brokered_listener_options

        tcp, brokered = brokered_listener_options(config, (host, port))
        self.listener = MessageListener(reactor, listening_factory, tcp, settings["unix_socket"],
                                        settings["address_file"], advertise_toward=next(iter(config.pool["collectors"]), None))
        self.listener.setServiceParent(self)
        self.brokers = None
        if brokered:  # reachable through the brokers (gwms.gcb): the negotiator comes that way
            self.brokers = Brokers(reactor, config.pool["brokers"], self.schedd.name, listening_factory,
                                   client_security(config), self._broker_address)
            self.brokers.setServiceParent(self)
        self._updates = LoopingCall(self.advertise)
        self._updates.clock = reactor
        self._policy = LoopingCall(self.schedd.periodic)
        self._policy.clock = reactor
        self._proxies = LoopingCall(self.schedd.check_proxies)
        self._proxies.clock = reactor
        self.negotiator_address = settings["negotiator"]
        self._poke_pending = False

    def startService(self) -> None:
        super().startService()
        self.listener._listening.addCallback(self._listening)

    def _listening(self, _: Any) -> None:
        if self.listener.address is not None and self.brokers is None:
            self.schedd.address = str(self.listener.address)
        self.schedd.reconnect_running()
        self._updates.start(self.schedd.settings["update_interval"], now=True)
        self._policy.start(self.schedd.settings["periodic_interval"], now=False)
        self._proxies.start(self.schedd.proxy_check_interval, now=False)

    def _broker_address(self) -> None:
        assert self.brokers is not None
        current = self.brokers.current
        if current is not None and current.public is not None and current.public != self.schedd.address:
            self.schedd.address = current.public
            self.advertise()

    def advertise(self) -> None:
        if not self.schedd.address:
            return  # a brokered schedd has no address until a broker registered it
        for ad in self.schedd.ads():
            ad["ClassAdLifetime"] = int(3 * self.schedd.settings["update_interval"])
            self.collectors.advertise(ad, "ADVERTISE_SCHEDD")

    def poke_negotiator(self) -> None:
        """New idle jobs: update our ads now and ask the negotiator for a cycle soon."""
        if self._poke_pending:
            return
        self._poke_pending = True
        self.reactor.callLater(0.2, self._poke)

    @defer.inlineCallbacks
    def _poke(self) -> Any:
        self._poke_pending = False
        self.advertise()
        address = self.negotiator_address
        try:
            if address is None:
                from gwms.protocols.client import query_ads

                found = yield query_ads(self.collectors, "Negotiator", projection=["MyAddress"])
                if not found:
                    return
                target = Address.parse(str(found[0]["MyAddress"]))
            else:
                target = Address(host=address[0], port=address[1])
            yield self.schedd.daemon(str(target)).call("RESCHEDULE", _ad(Schedd=self.schedd.name), "WRITE")
        except (CommandError, ConnectionFailed) as e:
            log.debug("reschedule not delivered: {error}", error=str(e))

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        for loop in (self._updates, self._policy, self._proxies):
            if loop.running:
                loop.stop()
        yield super().stopService()
        self.queue.commit()
        self.queue.close()
        self.collectors.close()


class Options(DaemonOptions):
    pass


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    return ScheddService(reactor, options["host_config"])


