"""The collector daemon (``twistd -n gwms-collector --config FILE``).

The registry of ClassAds of one pool; a second instance with its own configuration is the
glideinWMS collector between frontends and factories.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gwms import classads
from gwms.collector.store import AdStore, StoreError, advertise_level
from gwms.config import HostConfig
from gwms.daemon import DaemonOptions, MessageListener, message_factory
from gwms.protocols.messages import Command, CommandError, Items, Request

log = Logger()

ACCEPTED = classads.encode(classads.parse_new("[Accepted = true]"))


def _owner(request: Request) -> str:
    return f"{request.identity.method}:{request.identity.name}"


def _my_type(ad: classads.ClassAd) -> str:
    """The type of an advertised ad: its MyType (a slot ad's TargetType is "Job")."""
    value = ad.get("MyType")
    if not isinstance(value, str) or not value:
        raise CommandError("MALFORMED_AD", "an advertised ad needs a string MyType")
    return value


def _target_type(ad: classads.ClassAd) -> str:
    value = ad.get("TargetType", ad.get("MyType"))
    if not isinstance(value, str) or not value:
        raise CommandError("MALFORMED_AD", "the request needs a string TargetType")
    return value


class Collector:
    """The collector's commands over its store; independent of how it is reached."""

    def __init__(self, clock: Any, settings: dict[str, Any], name: str) -> None:
        self.clock = clock
        self.name = name
        self.store = AdStore(clock, settings["ad_lifetime"], settings["max_ad_lifetime"],
                             settings["private_attributes"], settings["max_ads"])

    def commands(self) -> list[Command]:
        return [
            Command("UPDATE", lambda ad: advertise_level(_my_type(ad)), self.update),
            Command("INVALIDATE", lambda ad: advertise_level(_target_type(ad)), self.invalidate),
            Command("QUERY", "READ", self.query),
            Command("QUERY_PRIVATE", "NEGOTIATOR", self.query),
        ]

    def update(self, request: Request) -> bytes:
        try:
            self.store.update(request.ad, _owner(request), request.identity.name,
                              lambda: request.is_allowed("ADMINISTRATOR"))
        except StoreError as e:
            raise CommandError(e.code, e.message) from None
        return ACCEPTED

    def invalidate(self, request: Request) -> classads.ClassAd:
        ad = request.ad
        name = ad.get("Name")
        constraint = ad.lookup("Requirements") if "Requirements" in ad else None
        if name is None and constraint is None:
            raise CommandError("MALFORMED_AD", "INVALIDATE needs a Name or a Requirements expression")
        try:
            removed = self.store.invalidate(_target_type(ad), name if isinstance(name, str) else None,
                                            constraint, _owner(request),
                                            lambda: request.is_allowed("ADMINISTRATOR"))
        except StoreError as e:
            raise CommandError(e.code, e.message) from None
        reply = classads.ClassAd()
        reply["Invalidated"] = removed
        return reply

    def query(self, request: Request) -> Items:
        ad = request.ad
        constraint = ad.lookup("Requirements") if "Requirements" in ad else None
        projection = ad.get("Projection", "")
        if not isinstance(projection, str):
            raise CommandError("MALFORMED_AD", "Projection must be a string of attribute names")
        attrs = [a for a in projection.replace(",", " ").split() if a]
        limit = ad.get("Limit")
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
        include_private = request.command == "QUERY_PRIVATE"
        items = list(self.store.query(_target_type(ad), constraint, attrs, include_private, limit))
        final = classads.ClassAd()
        final["Count"] = len(items)
        return Items(items, final)

    def self_ad(self, address: str) -> classads.ClassAd:
        ad = classads.ClassAd()
        ad["MyType"] = "Collector"
        ad["Name"] = self.name
        ad["Machine"] = socket.getfqdn()
        ad["MyAddress"] = address
        ad["UpdatesTotal"] = self.store.updates
        for ad_type, count in self.store.counts().items():
            ad[f"Active{ad_type.capitalize()}Ads"] = count
        ad["TotalAds"] = self.store.count
        return ad


class CollectorService(service.MultiService):
    def __init__(self, reactor: Any, config: HostConfig) -> None:
        super().__init__()
        self.reactor = reactor
        settings = config.section("collector")
        host, port = settings["listen"]
        name = settings["name"] or f"{config.pool['name']}@{socket.getfqdn()}"
        self.collector = Collector(reactor, settings, name)
        self.factory = message_factory(reactor, config, self.collector.commands())
        self.listener = MessageListener(reactor, self.factory, (host, port), settings["unix_socket"],
                                        settings["address_file"])
        self.listener.setServiceParent(self)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = reactor
        self.sweep_interval = settings["sweep_interval"]

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(self.sweep_interval, now=False)
        self.reactor.callLater(0, self.sweep)

    def stopService(self) -> Any:
        if self._sweeper.running:
            self._sweeper.stop()
        return super().stopService()

    def sweep(self) -> None:
        """Drop expired ads and refresh the collector's own ad."""
        dropped = self.collector.store.expire()
        if dropped:
            log.debug("expired {n} ads", n=dropped)
        address = str(self.listener.address) if self.listener.address else ""
        ad = self.collector.self_ad(address)
        ad["ClassAdLifetime"] = max(3 * self.sweep_interval, 60)
        self.collector.store.update(ad, "self:collector", self.collector.name, lambda: True)


class Options(DaemonOptions):
    pass


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    return CollectorService(reactor, options["host_config"])
