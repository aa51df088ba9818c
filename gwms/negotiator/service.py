"""The negotiator (``twistd -n gwms-negotiator --config FILE``): the matchmaking cycle.

Every ``interval`` seconds, and soon after a schedd says it has new idle jobs (RESCHEDULE), it
reads the slots (with their private claim capabilities) and the submitters from the collector,
asks each schedd with idle jobs for its autoclusters, matches them with fair share between
submitters (``gwms.negotiator.matchmaker``), and tells each schedd its matches.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gwms import classads
from gwms.config import HostConfig
from gwms.daemon import DaemonOptions, MessageListener, client_security, collectors, message_factory
from gwms.negotiator.matchmaker import Matchmaker, ResourceRequest
from gwms.negotiator.priorities import Priorities
from gwms.protocols.client import Address, DaemonClient, query_ads
from gwms.protocols.messages import Command, CommandError, ConnectionFailed, Request

log = Logger()


def _ad(**values: Any) -> classads.ClassAd:
    ad = classads.ClassAd()
    for k, v in values.items():
        ad[k] = v
    return ad


class Negotiator:
    """One negotiation cycle at a time, over the collectors and schedds it is given."""

    def __init__(self, reactor: Any, config: HostConfig, collectors: Any, security: Any,
                 connector: Any = None) -> None:
        settings = config.section("negotiator")
        self.reactor = reactor
        self.settings = settings
        self.name = settings["name"] or f"negotiator@{socket.getfqdn()}"
        self.priorities = Priorities(settings["priorities"], half_life=settings["half_life"])
        self.matchmaker = Matchmaker(self.priorities)
        self.collectors = collectors
        self.security = security
        self.connector = connector
        self.address = ""
        self._schedds: dict[str, DaemonClient] = {}
        self._running: defer.Deferred[Any] | None = None
        self._again = False
        self._scheduled: Any = None
        self.last_cycle = -1e9
        self.last_stats: Any = None

    def commands(self) -> list[Command]:
        return [Command("RESCHEDULE", "WRITE", self.reschedule)]

    def advertise(self) -> None:
        self.collectors.advertise(_ad(MyType="Negotiator", Name=self.name, MyAddress=self.address,
                                      ClassAdLifetime=int(3 * self.settings["interval"])), "NEGOTIATOR")

    def reschedule(self, request: Request) -> classads.ClassAd:
        self.cycle_soon()
        return _ad(Scheduled=True)

    def cycle_soon(self) -> None:
        """A cycle as soon as the last one is at least ``min_interval`` old; never two at once."""
        if self._running is not None:
            self._again = True
            return
        if self._scheduled is not None and self._scheduled.active():
            return
        wait = max(0.0, self.last_cycle + self.settings["min_interval"] - self.reactor.seconds())
        self._scheduled = self.reactor.callLater(wait, self._start_cycle)

    def _start_cycle(self) -> None:
        self._running = self.cycle()
        self._running.addErrback(lambda f: log.failure("negotiation cycle failed", f))
        self._running.addBoth(self._cycle_done)

    def _cycle_done(self, _: Any) -> None:
        self._running = None
        self.last_cycle = self.reactor.seconds()
        if self._again:
            self._again = False
            self.cycle_soon()

    def cancel(self) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()

    def schedd(self, address: str) -> DaemonClient:
        client = self._schedds.get(address)
        if client is None:
            client = DaemonClient(self.reactor, Address.parse(address), self.security, connector=self.connector)
            self._schedds[address] = client
        return client

    @defer.inlineCallbacks
    def cycle(self) -> Any:
        started = time.perf_counter()
        self.advertise()
        slots = yield query_ads(self.collectors, "Machine", private=True)
        submitters = yield query_ads(self.collectors, "Submitter")
        schedds = {str(s.get("ScheddName")): str(s.get("MyAddress")) for s in submitters
                   if (s.get("IdleJobs") or 0) > 0 and s.get("MyAddress")}
        requests: list[ResourceRequest] = []
        for name, address in schedds.items():
            try:
                final, items = yield self.schedd(address).call("GET_RESOURCE_REQUESTS", _ad(), "NEGOTIATOR",
                                                               stream=True)
            except (CommandError, ConnectionFailed) as e:
                log.warn("schedd {name} at {address}: {error}", name=name, address=address, error=str(e))
                continue
            for raw in items:
                job = classads.decode(raw)
                requests.append(ResourceRequest(schedd=name, submitter=str(job.get("Submitter")),
                                                autocluster_id=int(job.get("AutoClusterId")), job_ad=job,
                                                count=int(job.get("JobCount", 1))))
        usage: dict[str, float] = {}
        for slot in slots:
            user = slot.get("RemoteUser")
            if slot.get("State") == "Claimed" and isinstance(user, str):
                usage[user] = usage.get(user, 0.0) + float(slot.get("Cpus", 1) or 1)
        now = self.reactor.seconds()
        self.priorities.update(usage, now)
        matches, stats = self.matchmaker.cycle(requests, slots, now)
        sends = []
        for m in matches:
            address = schedds.get(m.schedd)
            if address is None:
                continue
            sends.append(self.schedd(address).call("MATCH", _ad(Submitter=m.submitter, AutoClusterId=m.autocluster_id,
                                                                SlotAd=m.slot_ad), "NEGOTIATOR"))
        results = yield defer.DeferredList(sends, consumeErrors=True)
        for ok, r in results:
            if not ok:
                log.warn("match not delivered: {error}", error=r.getErrorMessage())
                break
        self.priorities.save()
        self.last_stats = stats
        log.info("cycle: {slots} slots, {requests} autoclusters from {schedds} schedds, {matches} matches "
                 "in {seconds:.3f} s", slots=len(slots), requests=len(requests), schedds=len(schedds),
                 matches=len(matches), seconds=time.perf_counter() - started)
        return matches


class NegotiatorService(service.MultiService):
    def __init__(self, reactor: Any, config: HostConfig) -> None:
        super().__init__()
        self.reactor = reactor
        settings = config.section("negotiator")
        self.negotiator = Negotiator(reactor, config, collectors(reactor, config), client_security(config))
        self.factory = message_factory(reactor, config, self.negotiator.commands())
        from gwms.gcb.client import Brokers, brokered_listener_options

        tcp, brokered = brokered_listener_options(config, settings["listen"])
        self.listener = MessageListener(reactor, self.factory, tcp, None, settings["address_file"],
                                        advertise_toward=next(iter(config.pool["collectors"]), None))
        self.listener.setServiceParent(self)
        self.brokers = None
        if brokered:  # reachable through the brokers (gwms.gcb): schedds' RESCHEDULE comes that way
            self.brokers = Brokers(reactor, config.pool["brokers"], self.negotiator.name, self.factory,
                                   client_security(config), self._broker_address)
            self.brokers.setServiceParent(self)
        self._loop = LoopingCall(self.negotiator.cycle_soon)
        self._loop.clock = reactor
        self.interval = settings["interval"]

    def startService(self) -> None:
        super().startService()
        self.listener._listening.addCallback(self._listening)

    def _listening(self, _: Any) -> None:
        if self.listener.address is not None:
            self.negotiator.address = str(self.listener.address)
        self._loop.start(self.interval, now=True)

    def _broker_address(self) -> None:
        assert self.brokers is not None
        current = self.brokers.current
        if current is not None and current.public is not None:
            self.negotiator.address = current.public

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        self.negotiator.cancel()
        yield super().stopService()
        self.negotiator.priorities.save()
        self.negotiator.collectors.close()


class Options(DaemonOptions):
    pass


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    return NegotiatorService(reactor, options["host_config"])
