"""A whole pool in one reactor: collector, negotiator, schedd and startd on a MemoryReactorClock.

The daemons are the real ones (``Collector``, ``Negotiator``, ``Schedd``, ``Startd`` with their
command handlers, authorization and message layer); only three things are fake: the network
(``MemoryNetwork``: iosim transports between the daemons' own protocols), authentication
(``FakeAuthMethod``: the identity is whatever the client names) and the jobs
(``FakeJobProcess``: they "run" on the clock). Nothing happens until the test moves the clock::

    pool = MemoryPool(MemoryReactorClock(), tmp_path)
    cluster = pool.submit("alice", "executable = /bin/true\\ntransfer_executable = false\\nqueue 3\\n")
    pool.run_until(lambda: not pool.query(f"ClusterId == {cluster}"), timeout=120)
    assert [j["ExitCode"] for j in pool.history()] == [0, 0, 0]

Job owners are the fake users, but every file the schedd writes for them (event logs, output
sandboxes) is written as the current UNIX account: ``gwms.userfiles`` would look the users up in
the password database, and the pool must not need real accounts.

``timeout`` and ``advance`` are in seconds of the clock, never of real time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gwms import classads, userfiles
from gwms.client import ScheddClient
from gwms.collector.service import Collector
from gwms.config import HostConfig, parse_config
from gwms.daemon import collectors
from gwms.negotiator.service import Negotiator
from gwms.plugins.identity import NoIdentitySwitch
from gwms.protocols.client import Address, CollectorList, query_ads
from gwms.protocols.messages import Command, CommandError, ConnectionFailed, Limits, MessageServerFactory
from gwms.schedd.queue import JobQueue
from gwms.schedd.service import Schedd
from gwms.security import Auditor
from gwms.startd.service import Slot, Startd
from gwms.testing.network import MemoryNetwork, memory_client_security, memory_security
from gwms.testing.processes import FakeJobProcess

__all__ = ["MemoryPool", "PoolTimeout"]

log = Logger()
T = TypeVar("T")

COLLECTOR_ADDRESS = "collector.memory:9618"
NEGOTIATOR_ADDRESS = "negotiator.memory:9620"
SCHEDD_ADDRESS = "schedd.memory:9615"
STARTD_ADDRESS = "startd.memory:9700"
DAEMONS = ("collector", "negotiator", "schedd", "startd")  # also their identities

_CONFIG = """
[pool]
name = "memory"
collectors = [{collector}]

[security]
methods = ["gwms.testing:FakeAuthMethod"]
authentication = "REQUIRED"
encryption = "OPTIONAL"

[security.READ]
allow = ["*"]
[security.WRITE]
allow = {writers}
[security.ADMINISTRATOR]
allow = ["admin"]
[security.DAEMON]
allow = {daemons}
[security.NEGOTIATOR]
allow = ["negotiator"]
[security.ADVERTISE_STARTD]
allow = ["startd"]
[security.ADVERTISE_SCHEDD]
allow = ["schedd"]

[collector]
listen = {collector}
name = "collector@memory"
sweep_interval = 5

[negotiator]
listen = {negotiator}
name = "negotiator@memory"
interval = {negotiator_interval}
min_interval = 1
priorities = {priorities}

[schedd]
listen = {schedd}
name = "schedd@memory"
spool = {spool}
update_interval = 10
periodic_interval = {periodic_interval}
reconnect_interval = 1

[startd]
listen = {startd}
name = "wn1.memory"
execute = {execute}
slots = {slots}
partitionable = {partitionable}
cpus = {cpus}
memory = {memory}
disk = {disk}
update_interval = 30
# Fake jobs of several users on one identity_switch = none startd: nothing runs, nothing is shared.
allow_shared_identity = true
"""

STATUS_NAMES = {1: "Idle", 2: "Running", 3: "Removed", 4: "Completed", 5: "Held", 6: "Transferring", 7: "Suspended"}


class PoolTimeout(AssertionError):
    """What a test waited for did not happen within its timeout (in clock seconds)."""


class _RecordingAuditor(Auditor):
    """Logs like the real auditor and keeps (daemon, identity, command, level, allowed, rule)."""

    def __init__(self, daemon: str, events: list[tuple[str, str, str, str, bool, str]]) -> None:
        super().__init__()
        self._daemon = daemon
        self._events = events

    def record(self, request: Any, decision: Any) -> None:
        super().record(request, decision)
        self._events.append((self._daemon, request.identity.name, request.command, request.level,
                             decision.allowed, decision.rule))


def _toml(value: Any) -> str:
    # JSON strings, numbers, booleans and lists of strings are valid TOML.
    return json.dumps(str(value) if isinstance(value, Path) else value)


class MemoryPool:
    """A pool of one collector, negotiator, schedd and startd (``slots`` static slots, or one
    partitionable slot with ``slots`` CPUs) on ``clock``, with its files under ``workdir``.

    The daemons: ``collector``, ``negotiator``, ``schedd`` (its ``queue``) and ``startd``; the
    network between them: ``network``. ``calls`` counts the commands each daemon served, by
    ``(daemon, command)``; ``audit`` lists every authorization decision."""

    def __init__(self, clock: Any, workdir: Path, slots: int = 4, partitionable: bool = False,
                 users: Sequence[str] = ("alice", "bob"), *, negotiator_interval: float = 60.0,
                 periodic_interval: float = 10.0) -> None:
        if slots < 1:
            raise ValueError("a pool needs at least one slot")
        self.clock = clock
        self.workdir = Path(workdir).resolve()
        self.users = tuple(users)
        self.calls: Counter[tuple[str, str]] = Counter()
        self.audit: list[tuple[str, str, str, str, bool, str]] = []
        self.iwds: dict[int, Path] = {}
        self.config = self._configuration(slots, partitionable, negotiator_interval, periodic_interval)
        self.network = MemoryNetwork(clock)
        self._loops: list[tuple[LoopingCall, float, bool]] = []
        self._collector_lists: list[CollectorList] = []
        self._user_clients: dict[str, ScheddClient] = {}
        self._submissions = 0
        self._poke_pending = False
        self._stopped = False
        self._build_collector()
        self._build_negotiator()
        self._build_schedd()
        self._build_startd()
        self._start()

    # -- building ------------------------------------------------------------------------------
    def _configuration(self, slots: int, partitionable: bool, negotiator_interval: float,
                       periodic_interval: float) -> HostConfig:
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = _CONFIG.format(
            collector=_toml(COLLECTOR_ADDRESS), negotiator=_toml(NEGOTIATOR_ADDRESS), schedd=_toml(SCHEDD_ADDRESS),
            startd=_toml(STARTD_ADDRESS), writers=_toml([*self.users, "schedd"]), daemons=_toml(list(DAEMONS)),
            negotiator_interval=_toml(float(negotiator_interval)), periodic_interval=_toml(float(periodic_interval)),
            priorities=_toml(self.workdir / "priorities.json"), spool=_toml(self.workdir / "spool"),
            execute=_toml(self.workdir / "execute"), slots=slots, partitionable=_toml(partitionable),
            # One CPU, 1 GiB of memory and 10 GiB of disk per slot: room for a default job each.
            cpus=slots, memory=1024 * slots, disk=10 * 1024 * 1024 * slots)
        return parse_config(text, "<MemoryPool>", base=self.workdir)

    def _factory(self, daemon: str, commands: Iterable[Command]) -> MessageServerFactory:
        counted = [dataclasses.replace(c, handler=self._counting(daemon, c.name, c.handler)) for c in commands]
        security = memory_security(self.config, _RecordingAuditor(daemon, self.audit))
        return MessageServerFactory(self.clock, security, counted, Limits.from_pool(self.config.pool))

    def _counting(self, daemon: str, command: str, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def handle(request: Any) -> Any:
            self.calls[(daemon, command)] += 1
            return handler(request)

        return handle

    def _collectors(self, identity: str) -> CollectorList:
        found = collectors(self.clock, self.config, connector=self.network.connector,
                           security=memory_client_security(self.config, identity))
        self._collector_lists.append(found)
        return found

    def _every(self, seconds: float, work: Callable[[], Any], now: bool) -> None:
        loop = LoopingCall(work)
        loop.clock = self.clock
        self._loops.append((loop, seconds, now))

    def _build_collector(self) -> None:
        settings = self.config.section("collector")
        self.collector = Collector(self.clock, settings, settings["name"])
        self.network.listen(COLLECTOR_ADDRESS, self._factory("collector", self.collector.commands()))
        self._every(settings["sweep_interval"], self._sweep_collector, now=False)

    def _build_negotiator(self) -> None:
        self.negotiator = Negotiator(self.clock, self.config, self._collectors("negotiator"),
                                     memory_client_security(self.config, "negotiator"), self.network.connector)
        self.negotiator.address = NEGOTIATOR_ADDRESS
        self.network.listen(NEGOTIATOR_ADDRESS, self._factory("negotiator", self.negotiator.commands()))
        self._every(self.config.section("negotiator")["interval"], self.negotiator.cycle_soon, now=True)

    def _build_schedd(self) -> None:
        settings = self.config.section("schedd")
        spool = Path(settings["spool"])
        spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.queue = JobQueue(spool / "job_queue.db", clock=self.clock.seconds)
        self.schedd = Schedd(self.clock, self.config, self.queue, connector=self.network.connector,
                                    security=memory_client_security(self.config, "schedd"), accounts=self._account)
        self.schedd.address = SCHEDD_ADDRESS
        self.schedd.poke_negotiator = self._poke_negotiator
        self._schedd_collectors = self._collectors("schedd")
        self.network.listen(SCHEDD_ADDRESS, self._factory("schedd", self.schedd.commands()))
        self._every(settings["update_interval"], self._advertise_schedd, now=True)
        self._every(settings["periodic_interval"], self.schedd.periodic, now=False)
        self._every(settings["proxy_check_interval"], self.schedd.check_proxies, now=False)

    def _build_startd(self) -> None:
        settings = self.config.section("startd")
        self.startd = Startd(self.clock, self.config, NoIdentitySwitch(), process_factory=FakeJobProcess)
        self.startd.address = STARTD_ADDRESS
        self.startd.advertiser = self._advertise_slot
        self.startd.invalidator = self._invalidate_slot
        self._startd_collectors = self._collectors("startd")
        self.network.listen(STARTD_ADDRESS, self._factory("startd", self.startd.commands()))
        self._every(settings["update_interval"], self._advertise_slots, now=True)
        self._every(5.0, self.startd.housekeeping, now=False)

    def _start(self) -> None:
        self.schedd.reconnect_running()
        for loop, seconds, now in self._loops:
            loop.start(seconds, now=now)
        self.settle()

    def _account(self, user: str) -> userfiles.Account:
        if user not in self.users:
            raise userfiles.UserFileError(f"no local account named {user!r} in this MemoryPool")
        return userfiles.Account(user, os.geteuid(), os.getegid())

    # -- what the daemons' services do (gwms.<role>.service), on the pool's clock ---------------
    def _sweep_collector(self) -> None:
        self.collector.store.expire()
        ad = self.collector.self_ad(COLLECTOR_ADDRESS)
        ad["ClassAdLifetime"] = max(3 * self.config.section("collector")["sweep_interval"], 60)
        self.collector.store.update(ad, "self:collector", self.collector.name, lambda: True)

    def _advertise_schedd(self) -> None:
        for ad in self.schedd.ads():
            ad["ClassAdLifetime"] = int(3 * self.config.section("schedd")["update_interval"])
            self._schedd_collectors.advertise(ad, "ADVERTISE_SCHEDD")

    def _poke_negotiator(self) -> None:
        if self._poke_pending:
            return
        self._poke_pending = True
        self.clock.callLater(0.2, self._poke)

    @defer.inlineCallbacks
    def _poke(self) -> Any:
        self._poke_pending = False
        self._advertise_schedd()
        try:
            found = yield query_ads(self._schedd_collectors, "Negotiator", projection=["MyAddress"])
            if found:
                yield self.schedd.daemon(str(found[0]["MyAddress"])).call(
                    "RESCHEDULE", _ad(Schedd=self.schedd.name), "WRITE")
        except (CommandError, ConnectionFailed) as e:
            log.debug("reschedule not delivered: {error}", error=str(e))

    def _advertise_slot(self, slot: Slot) -> None:
        ad = self.startd.slot_ad(slot)
        ad["ClassAdLifetime"] = int(3 * self.config.section("startd")["update_interval"])
        self._startd_collectors.advertise(ad, "ADVERTISE_STARTD")

    def _advertise_slots(self) -> None:
        for slot in list(self.startd.slots.values()):
            self._advertise_slot(slot)

    def _invalidate_slot(self, slot: Slot) -> None:
        self._startd_collectors.advertise(_ad(TargetType="Machine", Name=slot.name), "ADVERTISE_STARTD",
                                          command="INVALIDATE")

    # -- the clock -----------------------------------------------------------------------------
    def settle(self, rounds: int = 10_000) -> None:
        """Run what is due now and move bytes until the pool is quiet (the clock stays)."""
        for _ in range(rounds):
            self.clock.advance(0)
            moved = self.network.flush()
            due = any(c.getTime() <= self.clock.seconds() for c in self.clock.getDelayedCalls())
            if not moved and not due:
                return
        raise PoolTimeout(f"the pool did not settle in {rounds} rounds at clock {self.clock.seconds():.1f}: "
                          f"daemons keep talking ({self.describe()})")

    def _step(self, until: float, max_step: float) -> None:
        # To the next scheduled call (nothing can happen before it: all bytes have moved), but
        # never more than max_step, so that predicates are checked at a fine grain.
        now = self.clock.seconds()
        target = min(until, now + max_step)
        pending = [c.getTime() for c in self.clock.getDelayedCalls()]
        if pending:
            target = min(target, max(now, min(pending)))
        self.clock.advance(target - now)
        self.settle()

    def advance(self, seconds: float, max_step: float = 0.5) -> None:
        """Move the clock ``seconds`` forward in steps of at most ``max_step``, the pool settling
        after each."""
        end = self.clock.seconds() + seconds
        self.settle()
        while self.clock.seconds() < end:
            self._step(end, max_step)

    def run_until(self, predicate: Callable[[], T], timeout: float, what: str | None = None,
                  max_step: float = 0.5) -> T:
        """Advance the clock until ``predicate()`` returns something true, and return it; raise
        PoolTimeout after ``timeout`` clock seconds saying what was awaited and the pool's state."""
        deadline = self.clock.seconds() + timeout
        self.settle()
        while True:
            value = predicate()
            if value:
                return value
            if self.clock.seconds() >= deadline:
                awaited = what or getattr(predicate, "__name__", "the condition")
                raise PoolTimeout(f"timed out after {timeout:g} clock seconds waiting for {awaited}; "
                                  f"{self.describe()}")
            self._step(deadline, max_step)

    def result(self, d: defer.Deferred[T], what: str, timeout: float = 120.0) -> T:
        """Run the pool until ``d`` fires; its result, or its exception raised."""
        box: list[Any] = []
        d.addBoth(box.append)
        self.run_until(lambda: box, timeout, what)
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def describe(self) -> str:
        """The pool's state in one line, for failure messages."""
        jobs = ", ".join(f"{c}.{p} {STATUS_NAMES.get(j.get('JobStatus'), j.get('JobStatus'))}"
                         for (c, p), j in self.queue.jobs()) or "none"
        slots = ", ".join(f"{s.name} {s.state}/{s.activity}" for s in self.startd.slots.values())
        return f"clock {self.clock.seconds():.1f}; jobs in the queue: {jobs}; slots: {slots}"

    # -- users ---------------------------------------------------------------------------------
    def client(self, user: str) -> ScheddClient:
        """A ScheddClient authenticated as ``user`` (made once per user)."""
        client = self._user_clients.get(user)
        if client is None:
            client = ScheddClient(self.clock, Address.parse(SCHEDD_ADDRESS),
                                  memory_client_security(self.config, user), connector=self.network.connector)
            self._user_clients[user] = client
        return client

    def submit(self, user: str, text: str, files: dict[str, str | bytes] | None = None,
               iwd: Path | None = None) -> int:
        """Queue the jobs of submit description ``text`` as ``user``; returns the cluster id.

        ``files`` are written into the submit directory first (``iwd``, by default a new
        directory under workdir; see ``iwds``), scripts starting with ``#!`` executable."""
        from gwms.submit import parse_submit

        if iwd is None:
            self._submissions += 1
            iwd = self.workdir / "submit" / f"{user}-{self._submissions}"
        iwd = Path(iwd).resolve()
        iwd.mkdir(parents=True, exist_ok=True)
        for name, content in (files or {}).items():
            path = iwd / name
            data = content.encode() if isinstance(content, str) else content
            path.write_bytes(data)
            if data.startswith(b"#!"):
                path.chmod(0o755)
        (iwd / "job.sub").write_text(text)
        client = self.client(user)
        cluster = self.result(client.new_cluster(), f"NEW_CLUSTER for {user}")
        parsed = parse_submit(text, filename=str(iwd / "job.sub"), cluster_id=cluster, owner=user, iwd=iwd,
                              now=int(self.clock.seconds()))
        self.result(client.submit(cluster, parsed.cluster_ad, parsed.proc_ads), f"SUBMIT of cluster {cluster}")
        self.iwds[cluster] = iwd
        return cluster

    def query(self, constraint: str | None = None, projection: Sequence[str] = (), owner: str | None = None,
              user: str | None = None) -> list[classads.ClassAd]:
        """The jobs in the queue (of ``owner``, or everyone's), as ``user`` (default: the first)."""
        client = self.client(user or self.users[0])
        return self.result(client.query(constraint, projection, owner), "QUERY_JOBS")

    def history(self, constraint: str | None = None, projection: Sequence[str] = (), owner: str | None = None,
                user: str | None = None, limit: int | None = None) -> list[classads.ClassAd]:
        """Completed and removed jobs, newest first."""
        client = self.client(user or self.users[0])
        return self.result(client.query(constraint, projection, owner, history=True, limit=limit),
                           "QUERY_HISTORY")

    def act(self, user: str, action: str, job_ids: Sequence[str] = (), constraint: str | None = None,
            reason: str | None = None) -> classads.ClassAd:
        """remove / hold / release as ``user``; the reply ad (Count, Done, Refused, NotFound)."""
        return self.result(self.client(user).act(action, job_ids, constraint, reason), f"{action} by {user}")

    def status(self, job_id: str) -> int | None:
        """JobStatus of a job in the queue or in the history; None if it is in neither."""
        cluster, _, proc = job_id.partition(".")
        constraint = f"ClusterId == {int(cluster)} && ProcId == {int(proc or 0)}"
        found = self.query(constraint, ["JobStatus"]) or self.history(constraint, ["JobStatus"])
        return found[0].get("JobStatus") if found else None

    @property
    def matches(self) -> int:
        """How many matches the negotiator has sent to the schedd."""
        return self.calls[("schedd", "MATCH")]

    # -- the end -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the daemons' loops, close every connection and the job queue."""
        if self._stopped:
            return
        self._stopped = True
        for loop, _seconds, _now in self._loops:
            if loop.running:
                loop.stop()
        self.negotiator.cancel()
        for client in self._user_clients.values():
            client.close()
        for found in self._collector_lists:
            found.close()
        self.network.close_all()  # the daemons' own clients (schedd to startd, negotiator to schedd)
        self.queue.commit()
        self.queue.close()
        self.negotiator.priorities.save()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _ad(**values: Any) -> classads.ClassAd:
    ad = classads.ClassAd()
    for k, v in values.items():
        ad[k] = v
    return ad
