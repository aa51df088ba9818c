"""The VO frontend (``twistd -n gwms-frontend --config FILE``).

Each cycle the frontend reads the idle jobs of its schedds (the configured ones, or every
schedd the pool collector knows), the glideins already in the pool (slot ads carrying
``GLIDEIN_Client``), and the factories' entries with their monitoring of this frontend
(``glidefactory`` and ``glidefactoryclient`` ads in the glidein collector); computes the
requests (``gwms.frontend.pressure``); advertises one ``glideclient`` ad per group and entry
(ReqIdleGlideins, ReqMaxGlideins, ReqRemoveExcess, and what the glideins need: the pool's
collectors and the identities their startds must trust), and withdraws the requests of entries
that went away.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gwms import classads
from gwms.config import ConfigError, HostConfig
from gwms.daemon import DaemonOptions, client_security
from gwms.frontend.pressure import (CycleResult, EntryRequest, FactoryCounts, FactoryEntry, FrontendLimits,
                                    GroupConfig, compute_requests)
from gwms.protocols.client import Address, CollectorList, first_failure, query_ads
from gwms.protocols.messages import Limits

log = Logger()


def own_identity(config: HostConfig) -> str:
    """The identity this host authenticates as: its certificate's (or proxy's end-entity) DN,
    else its token's subject; "" if it has neither."""
    from gwms.credentials.tokens import TokenError, decode_token_unverified
    from gwms.credentials.x509 import CredentialError, dn_string, load_credential, proxy_policy

    pool = config.pool
    try:
        if pool["proxy"] is not None or pool["cert"] is not None:
            cred = load_credential(pool["proxy"] or pool["cert"], None if pool["proxy"] else pool["key"])
            identity = next((c for c in (cred.cert, *cred.chain) if proxy_policy(c) is None), cred.cert)
            return dn_string(identity.subject)
        if pool["token"] is not None:
            _header, claims = decode_token_unverified(open(pool["token"], encoding="utf-8").read().strip())
            return str(claims.get("sub", ""))
    except (CredentialError, TokenError, OSError) as e:
        raise ConfigError(f"{config.source}: cannot tell this frontend's identity: {e}") from None
    return ""


def _address_text(addresses: list[tuple[str, int]]) -> str:
    return ",".join(f"{h}:{p}" for h, p in addresses)


class Frontend:
    """The frontend's cycle, independent of how it is run."""

    def __init__(self, reactor: Any, config: HostConfig, glidein_collectors: CollectorList,
                 pool_collectors: CollectorList, schedd_client: Any) -> None:
        self.reactor = reactor
        settings = config.section("frontend")
        self.settings = settings
        self.name = settings["name"] or f"frontend@{socket.getfqdn()}"
        self.glidein_collectors = glidein_collectors
        self.pool_collectors = pool_collectors
        self.schedd_client = schedd_client  # address -> a ScheddClient
        self.pool_addresses = settings["pool_collectors"] or config.pool["collectors"]
        self.groups = [GroupConfig(name=name, match=g["match"], job_constraint=g["job_constraint"],
                                   idle_per_entry=g["idle_per_entry"], max_idle=g["max_idle"],
                                   curb_idle=g["curb_idle"], max_running=g["max_running"], ramp_up=g["ramp_up"],
                                   remove_excess=g["remove_excess"].upper(), client_name=self.client_name(name))
                       for name, g in sorted(settings["group"].items())]
        self.limits = FrontendLimits(max_idle=settings["max_idle"], max_running=settings["max_running"])
        if self.groups and not settings["trusted"]:
            raise ConfigError(f"{config.source}: [frontend] trusted must name the identities of the pool's schedds: "
                              "the glideins' startds accept claims from them only")
        self.previous: CycleResult | None = None
        self.cycles = 0
        # The frontend's own glidein files (validation scripts), once its web server is up:
        # (URL, description hash), passed to the glideins through the factory.
        self.files: tuple[str, str] | None = None
        self.factory_keys: dict[str, object] = {}  # entry@factory -> the factory's public key (PEM)
        # Who this frontend is to the factories (the collector authenticates its ads as this).
        self.identity = own_identity(config)

    def client_name(self, group: str) -> str:
        return f"{self.name}.{group}"

    # -- reading -------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def idle_jobs(self) -> Any:
        addresses = list(self.settings["schedds"])
        if not addresses:
            try:
                ads = yield query_ads(self.pool_collectors, "Scheduler", projection=["MyAddress"])
            except Exception as e:
                log.warn("frontend: cannot list the schedds: {error}", error=str(e))
                ads = []
            addresses = sorted({str(ad["MyAddress"]) for ad in ads if isinstance(ad.get("MyAddress"), str)})
        jobs: list[classads.ClassAd] = []
        for address in addresses:
            try:
                found = yield self.schedd_client(address).query("JobStatus == 1")
            except Exception as e:
                log.warn("frontend: cannot read the jobs of {schedd}: {error}", schedd=address, error=str(e))
                continue
            jobs += found
        return jobs

    @defer.inlineCallbacks
    def entries(self) -> Any:
        """The entries (with the factories' counts for our groups), and whether they could be read."""
        try:
            entry_ads = yield query_ads(self.glidein_collectors, "glidefactory")
            monitors = yield query_ads(self.glidein_collectors, "glidefactoryclient")
        except Exception as e:
            log.warn("frontend: cannot read the glidein collector: {error}", error=str(e))
            return [], False
        groups = {self.client_name(g.name): g.name for g in self.groups}
        counts: dict[str, dict[str, FactoryCounts]] = {}
        for ad in monitors:
            group = groups.get(str(ad.get("ReqClientName")))
            if group is None:
                continue
            key = f"{ad.get('ReqEntry')}@{ad.get('ReqFactory')}"
            counts.setdefault(key, {})[group] = FactoryCounts(
                idle=int(ad.get("GlideinMonitorStatusIdle", 0) or 0),
                running=int(ad.get("GlideinMonitorStatusRunning", 0) or 0),
                held=int(ad.get("GlideinMonitorStatusHeld", 0) or 0))
        entries = [FactoryEntry(ad, counts.get(f"{ad.get('EntryName')}@{ad.get('FactoryName')}", {}))
                   for ad in entry_ads if ad.get("GlideinEnabled", True) is not False]
        self.factory_keys = {f"{ad.get('EntryName')}@{ad.get('FactoryName')}": ad.get("PubKeyValue") for ad in entry_ads}
        return entries, True

    # -- one cycle -----------------------------------------------------------------------------
    @defer.inlineCallbacks
    def cycle(self) -> Any:
        jobs = yield self.idle_jobs()
        try:
            glideins = yield query_ads(self.pool_collectors, "Machine", "GLIDEIN_Client =!= undefined")
        except Exception as e:
            # Without the pool's glideins every one of them would look missing and the
            # requests would grow: skip the cycle (the last requests stay until they expire).
            log.warn("frontend: cannot read the pool's glideins, skipping this cycle: {error}", error=str(e))
            return self.previous
        entries, ok = yield self.entries()
        result = compute_requests(self.groups, self.limits, jobs, entries, glideins, self.previous,
                                  self.reactor.seconds(), glidein_collector_ok=ok)
        self.previous = result
        if ok:
            yield self.advertise(result)
        self.cycles += 1
        return result

    def request_ad(self, request: EntryRequest) -> classads.ClassAd:
        client = self.client_name(request.group)
        ad = classads.ClassAd()
        ad["MyType"] = "glideclient"
        ad["Name"] = f"{request.entry}@{client}"
        ad["ClientName"] = client
        ad["FrontendName"] = self.name
        ad["GroupName"] = request.group
        ad["ReqFactory"] = request.factory_name
        ad["ReqEntry"] = request.entry_name
        ad["ReqName"] = request.entry
        ad["ReqIdleGlideins"] = request.req_idle_glideins
        ad["ReqMaxGlideins"] = request.req_max_glideins
        ad["ReqRemoveExcess"] = request.req_remove_excess
        ad["GLIDEIN_Collector"] = _address_text(self.pool_addresses)
        ad["GLIDEIN_Trusted"] = list(self.settings["trusted"])
        if self.files is not None:
            ad["ClientWebURL"], ad["ClientDescription"] = self.files
        sealed = self.sealed_credential(request)
        if sealed is not None:
            ad["GlideinEncryptedCredential"] = sealed
        # What `gwms frontend status` shows (glideinWMS's frontend monitoring).
        ad["MatchingIdleJobs"] = request.idle_jobs
        ad["EffectiveIdleJobs"] = float(request.effective_idle_jobs)
        ad["RunningJobs"] = request.running_jobs
        ad["PoolUnclaimedGlideins"] = request.pool_unclaimed
        for attr, value in (("FactoryIdleGlideins", request.factory_idle),
                            ("FactoryRunningGlideins", request.factory_running),
                            ("FactoryHeldGlideins", request.factory_held)):
            if value is not None:
                ad[attr] = value
        ad["CurbReason"] = request.curb_reason
        ad["ClassAdLifetime"] = int(max(3 * self.settings["cycle_interval"], 60))
        return ad

    def sealed_credential(self, request: EntryRequest) -> str | None:
        """The pilot credential sealed for the entry's factory (its PubKeyValue), naming this
        frontend's identity inside; None without a pilot_credential or a factory key. Read each
        time: a cron job may have renewed the file."""
        from gwms.credentials.sealed import SealError, seal

        path = self.settings["pilot_credential"]
        public_key = self.factory_keys.get(request.entry)
        if path is None or not isinstance(public_key, str):
            return None
        try:
            text = open(path, encoding="utf-8").read()
            return seal(public_key, {"identity": self.identity, "credential": text, "entry": request.entry,
                                     "client": self.client_name(request.group)})
        except (OSError, UnicodeDecodeError, SealError) as e:
            log.warn("frontend: cannot seal the pilot credential {path} for {entry}: {error}", path=str(path),
                     entry=request.entry, error=str(e))
            return None

    @defer.inlineCallbacks
    def advertise(self, result: CycleResult) -> Any:
        calls = [self.glidein_collectors.advertise(self.request_ad(r), "ADVERTISE_FRONTEND")
                 for r in result.requests]
        for group, entry in result.withdrawn:
            query = classads.ClassAd()
            query["TargetType"] = "glideclient"
            query["Name"] = f"{entry}@{self.client_name(group)}"
            calls.append(self.glidein_collectors.advertise(query, "ADVERTISE_FRONTEND", command="INVALIDATE"))
        results = yield defer.DeferredList(calls, consumeErrors=True)
        error = first_failure(results)
        if error is not None:
            log.warn("frontend: advertising a request failed: {error}", error=error)


class FrontendService(service.MultiService):
    def __init__(self, reactor: Any, config: HostConfig, connector: Any = None,
                 security: Any = None) -> None:
        from gwms.client import ScheddClient
        from gwms.config import parse_address

        super().__init__()
        self.reactor = reactor
        settings = config.section("frontend")
        security = security or client_security(config)
        limits = Limits.from_pool(config.pool)

        def collector_list(addresses: list[tuple[str, int]]) -> CollectorList:
            return CollectorList(reactor, [Address(host=h, port=p) for h, p in addresses], security, limits,
                                 connect_timeout=config.pool["connect_timeout"], connector=connector)

        self.glidein_collectors = collector_list(settings["glidein_collectors"] or config.pool["collectors"])
        self.pool_collectors = collector_list(settings["pool_collectors"] or config.pool["collectors"])
        self._schedds: dict[str, Any] = {}

        def schedd_client(address: str) -> Any:
            client = self._schedds.get(address)
            if client is None:
                host, port = parse_address(address.strip("<>"))
                client = self._schedds[address] = ScheddClient(reactor, Address(host=host, port=port), security,
                                                               connector=connector)
            return client

        self.frontend = Frontend(reactor, config, self.glidein_collectors, self.pool_collectors, schedd_client)
        self.interval = settings["cycle_interval"]
        self.settings = settings
        self.web_port: Any = None
        self._loop = LoopingCall(self._cycle)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        log.info("frontend {name}: {n} groups", name=self.frontend.name, n=len(self.frontend.groups))
        if self.settings["validation_scripts"]:
            self._serve_files().addCallbacks(lambda _: self._loop.start(self.interval, now=True),
                                             lambda f: (log.failure("frontend: cannot serve its files", f),
                                                        self.reactor.stop()))
        else:
            self._loop.start(self.interval, now=True)

    def _serve_files(self) -> defer.Deferred[None]:
        """Publish the VO's validation scripts in a content-addressed store and serve it; the
        requests then carry its URL and description hash (the glideins check every file)."""
        from pathlib import Path

        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.web.server import Site

        from gwms.glidein.files import GlideinFilesResource, publish

        store = Path(self.settings["work_dir"]) / "web"
        description = publish(store, [("validate", Path(p).name, Path(p)) for p in self.settings["validation_scripts"]])
        host, port = self.settings["web_listen"]
        site = Site(GlideinFilesResource(store))
        site.displayTracebacks = False

        def listening(web_port: Any) -> None:
            self.web_port = web_port
            bound = web_port.getHost()
            url = self.settings["web_url"] or f"http://{bound.host}:{bound.port}/"
            self.frontend.files = (url.rstrip("/") + "/", description)
            log.info("frontend: its glidein files at {url} (description {hash})", url=url, hash=description)

        return TCP4ServerEndpoint(self.reactor, port, interface=host).listen(site).addCallback(listening)

    def _cycle(self) -> Any:
        return self.frontend.cycle().addErrback(lambda f: log.failure("frontend cycle failed", f))

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        if self.web_port is not None:
            yield self.web_port.stopListening()
        self.glidein_collectors.close()
        self.pool_collectors.close()
        for client in self._schedds.values():
            client.close()
        yield super().stopService()


class Options(DaemonOptions):
    pass


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    return FrontendService(reactor, options["host_config"])
