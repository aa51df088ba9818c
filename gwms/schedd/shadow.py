"""Shadows: one object in the schedd per running job (not a process, so a schedd can hold many).

A shadow holds a claim on a slot and runs jobs on it one after another: records the job as
running (durably, before anything starts, so a job never runs twice), activates the claim, sends
the input sandbox as the job's owner, starts the job, follows it with long-polls (which also keep
the job lease alive), brings the output sandbox back as the owner, records the exit and the
accounting, and asks the schedd for the next job of the same user that fits the slot. When the
connection to the starter drops, the job keeps running for its lease while the shadow reconnects.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.logger import Logger

from gwms import classads, eventlog, userfiles
from gwms.credentials.x509 import CredentialError
from gwms.protocols.messages import CommandError, ConnectionFailed
from gwms.protocols.transfer import CHUNK, STDERR, STDOUT, TransferError, decode_chunk, encode_chunk
from gwms.schedd import proxy as user_proxy
from gwms.schedd.queue import COMPLETED, HELD, IDLE, RUNNING, format_job_id

if TYPE_CHECKING:
    from gwms.schedd.service import Schedd

log = Logger()


# The startd kills a job whose lease ran out at its next housekeeping pass; the shadow gives
# the job up only this much later, so that the job is never running twice at once.
LEASE_MARGIN = 30.0


class JobProblem(Exception):
    """Something about the job itself (a missing input file, an unwritable output): hold it."""


@dataclass
class ClaimHandle:
    client: Any  # DaemonClient to the startd
    claim_id: str
    slot_name: str
    slot_ad: classads.ClassAd
    startd_address: str
    autocluster_matches: dict[int, bool] = field(default_factory=dict)  # for claim reuse


class Shadow:
    def __init__(self, schedd: "Schedd", claim: ClaimHandle, job_id: tuple[int, int]) -> None:
        self.schedd = schedd
        self.claim = claim
        self.job_id = job_id
        self.kill_request: tuple[int, str, int, int] | None = None  # (status to set, reason, code, subcode)
        self.started = False  # the current job was started on the claim
        self.reconnecting = False
        # The last job, ended and recorded as completed but not yet deactivated on the startd:
        # the next ACTIVATE_CLAIM replaces it (one round trip fewer per job), once `retired`
        # (its move to the history) is on disk.
        self.ended_job: str | None = None
        self.retired: defer.Deferred[None] | None = None
        # The SHA-256 of the proxy file last delegated to the current job (None: none yet, or
        # unknown after a schedd restart: the next proxy check delegates again).
        self.delegated_digest: str | None = None
        self.delegated_span: tuple[float, float] | None = None  # (when, the delegated proxy's end)
        self._delegating: defer.Deferred[Any] | None = None

    def request_kill(self, status: int, reason: str, code: int = 1, subcode: int = 0) -> None:
        """Hold or remove the running job now: the kill goes out at once (the long-poll then
        answers with the job's end and ``follow`` records the hold or removal)."""
        self.kill_request = (status, reason, code, subcode)
        if self.started:
            self.call("KILL_JOB", _with(Grace=0)).addErrback(lambda f: None)

    @property
    def name(self) -> str:
        return format_job_id(self.job_id)

    def call(self, command: str, ad: classads.ClassAd, timeout: float | None = None) -> defer.Deferred[Any]:
        ad["ClaimId"] = self.claim.claim_id
        return self.claim.client.call(command, ad, "DAEMON", timeout)

    # -- the claim's life -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def run_claim(self, reconnect: bool = False) -> Any:
        """Run jobs on this claim until there is none left for it, then release it."""
        failed = None
        while self.job_id is not None:
            self.schedd.shadows[self.job_id] = self
            try:
                if reconnect:
                    self.started = True  # it runs there (a kill or a re-delegation goes out at once)
                    keep = yield self.follow(reconnect=True)
                    reconnect = False
                else:
                    keep = yield self.run_job()
            except Exception:
                # A bug, or a queue that cannot be written: the job must not stay Running with
                # nobody following it. It goes back to the queue once the claim is released
                # (which kills it on the startd), so that it never runs twice at once.
                log.failure("the shadow of {job} on {slot} failed", job=self.name, slot=self.claim.slot_name)
                failed = self.job_id
                keep = False
            finally:
                self.schedd.shadows.pop(self.job_id, None)
            if not keep:
                break
            self.job_id = self.schedd.next_job_for(self.claim)
        try:
            yield self._retired()
        except Exception:
            log.failure("recording the end of a job on {slot} failed", slot=self.claim.slot_name)
        released = False
        try:
            yield self.call("RELEASE_CLAIM", classads.ClassAd())
            released = True
        except (CommandError, ConnectionFailed) as e:
            log.info("release of {slot} failed: {error}", slot=self.claim.slot_name, error=str(e))
        if failed is not None:
            reason = "the shadow failed (see the schedd's log)"
            if released:
                self.schedd.requeue(failed, reason)
            else:  # the startd kills the job when its lease runs out: requeue only after that
                lease = float(self.schedd.queue.get(failed, "JobLeaseDuration") or 2400)
                self.schedd.reactor.callLater(lease + LEASE_MARGIN, self.schedd.requeue, failed, reason)

    @defer.inlineCallbacks
    def run_job(self) -> Any:
        """One job on the claim. Fires True if the claim may take another job."""
        schedd, queue = self.schedd, self.schedd.queue
        job = queue.job(self.job_id)
        self.started = False
        if job is None or queue.get(self.job_id, "JobStatus") != IDLE:
            return True
        self.delegated_digest = None
        self.delegated_span = None
        proxy = None
        if user_proxy.job_proxy_path(job) is not None:
            # The user's proxy, checked right before the start (read as the owner): an expired
            # or broken one holds the job here instead of starting it.
            proxy = user_proxy.check_job(schedd, self.job_id)
            if proxy is None:
                return True
        account = schedd.account_of(job)
        now = schedd.reactor.seconds()
        queue.set_status(self.job_id, RUNNING, now=now)
        pin = self.claim.client.address.pin  # a glidein known by its certificate's fingerprint
        if pin is not None:  # recorded so that a restarted schedd reconnects to it the same way
            queue.set(self.job_id, {"StartdTLSCertificateSHA256": pin})
        identity = self.claim.client.address.identity  # likewise the identity it proved
        if identity is not None:
            queue.set(self.job_id, {"StartdIdentity": identity})
        queue.set(self.job_id, {"RemoteHost": self.claim.slot_name, "StartdAddress": self.claim.startd_address,
                                "ClaimId": self.claim.claim_id, "JobCurrentStartDate": int(now),
                                "ShadowBday": int(now)})
        yield schedd.committed()  # durable before the job can start anywhere
        yield self._retired()  # and the last job's end, before the startd forgets it
        replaces, self.ended_job = self.ended_job, None
        first_wait = None
        try:
            inputs = self.input_files(job)
            # Without an input sandbox (nor a proxy to delegate first) the job starts with its
            # activation (one round trip).
            start_now = not inputs and proxy is None
            activation = _with(JobAd=job, StartNow=start_now)
            if replaces:
                activation["Replaces"] = replaces
            activated = self.call("ACTIVATE_CLAIM", activation)
            if start_now:
                # The first long-poll goes out behind the activation, not after its answer: a
                # short job's end then comes back one round trip sooner. If the activation
                # fails, this poll is discarded.
                first_wait = self._wait_job()
            yield activated
            if inputs:
                yield self.send_input(job, account, inputs)
            if proxy is not None:
                yield self.delegate(proxy)
            if not start_now:
                yield self.call("START_JOB", classads.ClassAd())
        except CredentialError as e:  # the user's proxy could not sign the job's (expired since)
            yield self._abandon_start(job)
            schedd.hold(self.job_id, f"Error delegating x509userproxy {proxy.path if proxy else ''}: {e}",
                        code=user_proxy.CORRUPTED_CREDENTIAL)
            return True
        except (JobProblem, TransferError, userfiles.UserFileError) as e:
            _discard(first_wait)
            yield self._abandon_start(job)
            schedd.hold(self.job_id, f"Error before the job started: {e}", code=13)
            return True
        except CommandError as e:
            _discard(first_wait)
            if e.code == "CLAIM_ENDED":  # its worklife ran out since the last job ended
                schedd.requeue(self.job_id, "the claim ended before the job started", evicted=False)
                return False
            yield self._abandon_start(job)
            if e.code == "DELEGATION_FAILED":
                schedd.hold(self.job_id, f"Error delegating the proxy to {self.claim.slot_name}: {e.message}",
                            code=user_proxy.CORRUPTED_CREDENTIAL)
                return True
            if e.code in ("TRANSFER_FAILED", "START_FAILED"):
                schedd.hold(self.job_id, f"Error from {self.claim.slot_name}: {e.message}", code=13)
                return True
            schedd.requeue(self.job_id, f"the startd refused the job: {e.message}")
            return False
        except ConnectionFailed as e:
            _discard(first_wait)
            schedd.requeue(self.job_id, f"lost the startd before the job started: {e}")
            return False
        self.started = True
        starts = (queue.get(self.job_id, "NumJobStarts") or 0) + 1
        values = {"NumJobStarts": starts, "JobRunCount": starts}
        if not queue.get(self.job_id, "JobStartDate"):
            values["JobStartDate"] = int(now)
        queue.set(self.job_id, values)
        schedd.commit_soon()
        schedd.event(job, eventlog.execute_event(*self.job_id, schedd.reactor.seconds(),
                                                 f"<{self.claim.startd_address}>", self.claim.slot_name))
        keep = yield self.follow(first_wait=first_wait)
        return keep

    @defer.inlineCallbacks
    def _abandon_start(self, job: classads.ClassAd) -> Any:
        try:
            yield self.call("DEACTIVATE_CLAIM", classads.ClassAd())
        except (CommandError, ConnectionFailed):
            pass

    # -- the user's proxy, delegated the GSI way ------------------------------------------------
    @defer.inlineCallbacks
    def delegate(self, proxy: "user_proxy.UserProxy") -> Any:
        """Delegate ``proxy`` to the current job: the starter makes a key pair and sends a
        certificate request (DELEGATE_REQUEST); we sign a new proxy for its public key and send
        the chain (DELEGATE_PROXY). No private key crosses the wire either way."""
        job_id = self.name
        reply = yield self.call("DELEGATE_REQUEST", _with(JobId=job_id))
        queue = self.schedd.queue
        chain = user_proxy.delegate(proxy, reply.get("Request"),
                                    queue.get(self.job_id, "DelegateJobGSICredentialsLifetime"),
                                    queue.get(self.job_id, "DelegateLimitedProxy"), self.schedd.reactor.seconds())
        reply = yield self.call("DELEGATE_PROXY", _with(JobId=job_id, Proxy=chain))
        self.delegated_digest = proxy.digest
        expires = reply.get("Expiration")
        self.delegated_span = ((self.schedd.reactor.seconds(), float(expires))
                               if isinstance(expires, (int, float)) and not isinstance(expires, bool) else None)

    def _delegation_due(self, proxy: "user_proxy.UserProxy") -> bool:
        """A delegated proxy shorter-lived than the user's (delegate_job_GSI_credentials_lifetime)
        is renewed from the same file once less than a quarter of its life is left, as HTCondor's
        DELEGATE_JOB_GSI_CREDENTIALS_REFRESH does, as long as the user's would outlive it."""
        if self.delegated_span is None:
            return False
        since, until = self.delegated_span
        now = self.schedd.reactor.seconds()
        return proxy.expiration > until and now >= until - user_proxy.REFRESH_FRACTION * (until - since)

    def proxy_changed(self, proxy: "user_proxy.UserProxy") -> None:
        """The schedd's proxy check read the job's proxy file: if it is not the one the running
        job has (the user refreshed it), or the job's is due for renewal (``_delegation_due``),
        delegate again. One delegation at a time; a failed one is tried again at the next check."""
        if not self.started or self.kill_request is not None or self._delegating is not None:
            return
        if proxy.digest == self.delegated_digest and not self._delegation_due(proxy):
            return
        job_id = self.job_id
        log.info("delegating the refreshed proxy {path} to {job}", path=proxy.path, job=self.name)

        def failed(f: Any) -> None:
            f.trap(CommandError, ConnectionFailed, CredentialError)
            log.info("re-delegating the proxy to {job} failed: {error}", job=format_job_id(job_id),
                     error=f.getErrorMessage())

        def done(result: Any) -> Any:
            self._delegating = None
            return result

        d = self.delegate(proxy)
        d.addErrback(failed)
        d.addBoth(done)
        d.addErrback(lambda f: log.failure("re-delegating the proxy to {job}", f, job=format_job_id(job_id)))
        if not d.called:
            self._delegating = d

    # -- input sandbox --------------------------------------------------------------------------
    def input_files(self, job: classads.ClassAd) -> list[tuple[Path, bool]]:
        iwd = Path(str(job.get("Iwd", "/")))
        files: list[tuple[Path, bool]] = []
        if job.get("TransferExecutable", True) is not False:
            files.append((iwd / str(job.get("Cmd")), True))
        stdin = str(job.get("In", "/dev/null") or "/dev/null")
        if stdin != "/dev/null":
            files.append((iwd / stdin, False))
        for name in str(job.get("TransferInput", "") or "").split(","):
            if name.strip():
                files.append((iwd / name.strip(), False))
        return files

    @defer.inlineCallbacks
    def send_input(self, job: classads.ClassAd, account: userfiles.Account,
                   files: list[tuple[Path, bool]]) -> Any:
        seen: set[str] = set()
        for path, executable in files:
            name = path.name
            if name in seen:
                continue
            seen.add(name)
            f = userfiles.open_for_reading(account, path)
            try:
                digest = hashlib.sha256()
                offset = 0
                while True:
                    data = f.read(CHUNK)
                    digest.update(data)
                    final = len(data) < CHUNK
                    ad = _with(Name=name, Offset=offset, Data=encode_chunk(data), Final=final,
                               Executable=executable)
                    if final:
                        ad["Sha256"] = digest.hexdigest()
                    yield self.call("PUT_FILE", ad)
                    offset += len(data)
                    if final:
                        break
            finally:
                f.close()

    # -- following the running job --------------------------------------------------------------
    @defer.inlineCallbacks
    def follow(self, reconnect: bool = False, first_wait: defer.Deferred[Any] | None = None) -> Any:
        schedd, queue = self.schedd, self.schedd.queue
        lease = float(queue.get(self.job_id, "JobLeaseDuration") or 2400)
        last_contact = schedd.reactor.seconds()
        disconnected = reconnect
        if reconnect:
            self._event_disconnected("the schedd restarted")
        while True:
            if self.kill_request is not None:
                _discard(first_wait)
                return (yield self._kill())
            try:
                waiting, first_wait = first_wait, None
                status = yield (waiting if waiting is not None else self._wait_job())
            except ConnectionFailed as e:
                if not disconnected:
                    disconnected = True
                    self._event_disconnected(str(e))
                if schedd.reactor.seconds() - last_contact > lease + LEASE_MARGIN:
                    schedd.event_for(self.job_id, lambda t: eventlog.reconnect_failed_event(
                        *self.job_id, t, "the job lease expired", self.claim.slot_name))
                    schedd.requeue(self.job_id, "the job lease expired while disconnected", evicted=False)
                    return False
                yield task.deferLater(schedd.reactor, schedd.reconnect_interval, lambda: None)
                continue
            except CommandError as e:
                if e.code in ("UNKNOWN_CLAIM", "NO_JOB"):
                    schedd.requeue(self.job_id, "the starter no longer has the job")
                    return False
                raise
            last_contact = schedd.reactor.seconds()
            if disconnected:
                disconnected = False
                schedd.event_for(self.job_id, lambda t: eventlog.reconnected_event(
                    *self.job_id, t, self.claim.slot_name, f"<{self.claim.startd_address}>",
                    f"<{self.claim.startd_address}>"))
            self._record_usage(status)
            if self.kill_request is not None:
                return (yield self._kill())
            if status.get("Evicted", False):
                schedd.requeue(self.job_id, str(status.get("Reason", "evicted")), usage=status)
                return False
            if status.get("Exited", False):
                break
        return (yield self.finish(status))

    def _wait_job(self) -> defer.Deferred[Any]:
        return self.call("WAIT_JOB", _with(Timeout=20), timeout=40)

    def _event_disconnected(self, reason: str) -> None:
        self.schedd.event_for(self.job_id, lambda t: eventlog.disconnected_event(
            *self.job_id, t, reason, self.claim.slot_name, f"<{self.claim.startd_address}>"))

    def _record_usage(self, status: classads.ClassAd) -> None:
        values = {k: status[k] for k in ("RemoteUserCpu", "RemoteSysCpu", "ResidentSetSize", "MemoryUsage")
                  if k in status}
        # The account the job ran as on the worker (identity switch) and the DN it was mapped from.
        values.update({k: status[k] for k in ("RemoteAccount", "RemoteAccountDN") if isinstance(status.get(k), str)})
        if values:
            self.schedd.queue.set(self.job_id, values)
            self.schedd.commit_soon()

    @defer.inlineCallbacks
    def _kill(self) -> Any:
        status, reason, code, subcode = self.kill_request
        try:
            result = yield self.call("KILL_JOB", _with(Grace=0))
            self._record_usage(result)
            yield self.call("DEACTIVATE_CLAIM", classads.ClassAd())
        except (CommandError, ConnectionFailed) as e:
            log.info("kill of {job} on {slot}: {error}", job=self.name, slot=self.claim.slot_name, error=str(e))
        self.schedd.finish_kill(self.job_id, status, reason, code, subcode)
        self.kill_request = None
        return True  # the claim was deactivated cleanly: it may run the user's next job

    # -- output sandbox and completion -----------------------------------------------------------
    @defer.inlineCallbacks
    def finish(self, status: classads.ClassAd) -> Any:
        schedd, queue = self.schedd, self.schedd.queue
        job = queue.job(self.job_id)
        account = schedd.account_of(job)
        try:
            yield self.fetch_output(job, account, status.get("Outputs"))
        except (JobProblem, TransferError, userfiles.UserFileError) as e:
            yield self._deactivate()
            schedd.hold(self.job_id, f"Error transferring output: {e}", code=12)
            return True
        except CommandError as e:
            yield self._deactivate()
            schedd.hold(self.job_id, f"Error transferring output from {self.claim.slot_name}: {e.message}", code=12)
            return True
        except ConnectionFailed as e:
            schedd.requeue(self.job_id, f"lost the startd while fetching output: {e}")
            return False
        # Durable before the starter forgets the job: the claim's next activation waits for it
        # (see run_job); so does releasing the claim.
        self.retired = schedd.complete(self.job_id, status)
        self.ended_job = self.name
        return bool(status.get("ClaimReusable", False))

    @defer.inlineCallbacks
    def _retired(self) -> Any:
        retired, self.retired = self.retired, None
        if retired is not None:
            yield retired

    @defer.inlineCallbacks
    def _deactivate(self) -> Any:
        try:
            reply = yield self.call("DEACTIVATE_CLAIM", classads.ClassAd())
        except (CommandError, ConnectionFailed):
            return False
        return not reply.get("Released", False)

    @defer.inlineCallbacks
    def fetch_output(self, job: classads.ClassAd, account: userfiles.Account, listing: Any = None) -> Any:
        """Bring the output sandbox back, written as the job's owner. The exit status usually
        carries the listing and small files inline; otherwise ask for it (LIST_OUTPUT) and
        fetch in chunks (GET_FILE)."""
        if isinstance(listing, list) and all(isinstance(e, classads.ClassAd) for e in listing):
            entries = listing
        else:
            final, items = yield self.claim.client.call("LIST_OUTPUT", _with(ClaimId=self.claim.claim_id),
                                                        "DAEMON", stream=True)
            entries = [classads.decode(raw) for raw in items]
        iwd = Path(str(job.get("Iwd", "/")))
        for entry in entries:
            name = str(entry.get("Name"))
            target = self._output_path(job, iwd, name)
            if target is None:
                continue
            if entry.get("Missing", False):
                if name in (STDOUT, STDERR):
                    continue
                raise JobProblem(f"the job did not make its output file {name}")
            out = userfiles.open_for_writing(account, target)
            try:
                digest = hashlib.sha256()
                offset = 0
                if "Data" in entry:  # small enough to have come inline
                    data = decode_chunk(entry.get("Data"))
                    out.write(data)
                    digest.update(data)
                while "Data" not in entry:
                    reply = yield self.call("GET_FILE", _with(Name=name, Offset=offset, Length=CHUNK))
                    data = decode_chunk(reply.get("Data", ""))
                    out.write(data)
                    digest.update(data)
                    offset += len(data)
                    if reply.get("EOF", True) or not data:
                        break
            finally:
                out.close()
            if digest.hexdigest() != entry.get("Sha256"):
                raise JobProblem(f"{name}: SHA-256 mismatch after transfer")

    @staticmethod
    def _output_path(job: classads.ClassAd, iwd: Path, name: str) -> Path | None:
        if name == STDOUT:
            out = str(job.get("Out", "/dev/null") or "/dev/null")
            return None if out == "/dev/null" else iwd / out
        if name == STDERR:
            err = str(job.get("Err", "/dev/null") or "/dev/null")
            return None if err == "/dev/null" else iwd / err
        return iwd / os.path.basename(name)


def _discard(d: defer.Deferred[Any] | None) -> None:
    """A request whose answer nobody will read: its failure is expected, not an unhandled error."""
    if d is not None:
        d.addErrback(lambda f: None)


def _with(**values: Any) -> classads.ClassAd:
    ad = classads.ClassAd()
    for k, v in values.items():
        ad[k] = v
    return ad


__all__ = ["ClaimHandle", "Shadow", "COMPLETED", "HELD"]
