"""The factory's cycle (``Factory``), independent of how it is run: the twistd daemon
(``gwms.factory.service``), gwms-pool, or a test on a Clock with the fake grid.

Each cycle the factory

1. reads the frontends' requests (``glideclient`` ads) for its entries from the glidein
   collector; a request counts only if the identity that advertised it (the collector stamps
   ``AuthenticatedIdentity``) is allowed for the entry, and a pilot credential sealed inside
   names that same identity; others are ignored and audited;
2. asks each entry's grid plugin, in one call per entry, where its glideins are (queued,
   running, held, finished) and records the answers;
3. removes held glideins, stale ones and, when a frontend asks (``ReqRemoveExcess``), idle
   glideins beyond its request; forgets finished ones;
4. submits glideins so that each frontend has the idle glideins it asked for at each entry,
   within the entry's and the frontend's limits and submit rates;
5. advertises one ``glidefactory`` ad per entry (its attributes and the factory's public key
   for credential passing) and one ``glidefactoryclient`` monitoring ad per entry and
   frontend (requested, idle, running, held).

Glidein records live in SQLite (``gwms.factory.records``), written before each submission, so
that a restarted factory finds its glideins again and never submits a duplicate.
"""

from __future__ import annotations

import math
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from twisted.internet import defer
from twisted.logger import Logger

from gwms import classads
from gwms.config import ConfigError, HostConfig
from gwms.plugins.commands import CommandError
from gwms.factory.grid import FINISHED, HELD, QUEUED, RUNNING, GlideinSubmission, GridStatus
from gwms.factory.records import IDLE_STATES, REMOVING, Glidein, GlideinRecords
from gwms.protocols.client import CollectorList, first_failure, query_ads

log = Logger()

# How long a finished glidein's record is kept (for monitoring) before it is forgotten.
FINISHED_KEPT = 0.0
# Remove-excess modes (glideinWMS's ReqRemoveExcess): NO keeps every glidein; WAIT and IDLE
# remove idle glideins beyond the request (WAIT here is IDLE: a local queue has no "wait");
# ALL also removes running glideins beyond ReqMaxGlideins.
REMOVE_MODES = ("NO", "WAIT", "IDLE", "ALL")


@dataclass
class Request:
    """One frontend group's request at one entry, as read from its glideclient ad."""

    client: str  # ClientName: the frontend and group
    identity: str  # who advertised it (authenticated)
    idle: int  # ReqIdleGlideins
    max_glideins: int  # ReqMaxGlideins
    remove_excess: str  # ReqRemoveExcess
    collectors: str  # GLIDEIN_Collector: the pool the glideins join, "host:port,..."
    trusted: list[str]  # GLIDEIN_Trusted: identities the glideins' startds allow (the schedds)
    # The frontend's own glidein files (its validation scripts): its web URL and the sha256 of
    # its description, passed on to the glideins with their submission.
    client_files: tuple[str, str] | None = None
    sealed_credential: str | None = None  # the frontend's pilot credential, sealed for this factory
    credential: Path | None = None  # where the factory keeps it once opened and checked


@dataclass
class Entry:
    name: str
    settings: dict[str, Any]
    description: str = ""  # hash of its glidein file description
    bucket: "RateBudget" = field(default_factory=lambda: RateBudget(60.0))  # the entry's submit rate
    frontend_buckets: dict[str, "RateBudget"] = field(default_factory=dict)  # a frontend's rate at the entry
    requests: dict[str, Request] = field(default_factory=dict)  # client -> request


@dataclass
class RateBudget:
    """A submit rate (glideins a minute) as a token bucket holding at most a minute's worth:
    a factory that was idle may submit a minute's glideins at once, then the rate holds."""

    per_minute: float
    tokens: float = 0.0
    last: float | None = None  # None: full at the first look

    def available(self, now: float) -> int:
        capacity = max(1.0, self.per_minute)
        if self.last is None:
            self.tokens = capacity
        else:
            self.tokens = min(capacity, self.tokens + (now - self.last) * self.per_minute / 60.0)
        self.last = now
        return int(self.tokens)

    def spend(self, n: int) -> None:
        self.tokens -= n


def _int_attr(ad: classads.ClassAd, name: str, default: int = 0) -> int:
    value = ad.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return max(0, int(value))


def parse_request(ad: classads.ClassAd) -> Request | None:
    """A request from a glideclient ad, or None if it is malformed (logged by the caller)."""
    client = ad.get("ClientName")
    identity = ad.get("AuthenticatedIdentity")
    if not isinstance(client, str) or not client or not isinstance(identity, str):
        return None
    mode = ad.get("ReqRemoveExcess", "NO")
    mode = mode.upper() if isinstance(mode, str) and mode.upper() in REMOVE_MODES else "NO"
    trusted = ad.get("GLIDEIN_Trusted", [])
    if not isinstance(trusted, list) or not all(isinstance(t, str) for t in trusted):
        trusted = []
    collectors = ad.get("GLIDEIN_Collector", "")
    web, description = ad.get("ClientWebURL"), ad.get("ClientDescription")
    client_files = None
    if isinstance(web, str) and web.startswith(("http://", "https://")) and isinstance(description, str) \
            and len(description) == 64 and all(c in "0123456789abcdef" for c in description):
        client_files = (web, description)
    sealed = ad.get("GlideinEncryptedCredential")
    return Request(client, identity, _int_attr(ad, "ReqIdleGlideins"), _int_attr(ad, "ReqMaxGlideins"),
                   mode, collectors if isinstance(collectors, str) else "", list(trusted), client_files,
                   sealed if isinstance(sealed, str) else None)


class Factory:
    """The factory's cycle, independent of how it is run (twistd, gwms-pool, a test's clock)."""

    def __init__(self, reactor: Any, config: HostConfig, records: GlideinRecords, plugins: Mapping[str, Any],
                 collectors: CollectorList, web_url: str, public_key: str, auditor: Any = None,
                 private_key: Any = None) -> None:
        self.reactor = reactor
        self.config = config
        settings = config.section("factory")
        self.settings = settings
        self.name = settings["name"] or f"factory@{socket.getfqdn()}"
        self.records = records
        self.plugins = plugins
        self.collectors = collectors
        self.web_url = web_url.rstrip("/") + "/"
        self.public_key = public_key
        self.private_key = private_key  # opens the credentials frontends seal for this factory
        self.auditor = auditor
        self.entries = {name: Entry(name, {**entry, "name": name}, bucket=RateBudget(entry["submit_rate"]))
                        for name, entry in sorted(settings["entry"].items())}
        self._refused: set[tuple[str, str, str, str]] = set()  # (identity, entry, client, why) audited already
        self._signing_key: bytes | None = None
        for name, entry in settings["entry"].items():
            if entry["pilot_token"] and settings["token_signing_key"] is None:
                raise ConfigError(f"{config.source}: [factory.entry.{name}] pilot_token needs [factory] "
                                  "token_signing_key")
            if not entry["allowed_frontends"] and entry["enabled"]:
                log.warn("factory: entry {entry} has no allowed_frontends: no request will count, nothing will be "
                         "submitted there", entry=name)
            proxy = entry["http_proxy"]
            if proxy is not None and (not proxy.startswith("http://") or len(proxy) <= len("http://")
                                      or any(c.isspace() for c in proxy)):
                raise ConfigError(f"{config.source}: [factory.entry.{name}] http_proxy must be an http:// URL, "
                                  f"got {proxy!r}")
        self.cycles = 0

    # -- one cycle -----------------------------------------------------------------------------
    @defer.inlineCallbacks
    def cycle(self) -> Any:
        try:
            ads = yield query_ads(self.collectors, "glideclient",
                                  f"ReqFactory == {classads.quote(self.name)}")
        except Exception as e:  # the glidein collector is down: keep the last requests
            log.warn("factory: cannot read the frontends' requests: {error}", error=str(e))
        else:
            self._take_requests(ads)
        for entry in self.entries.values():
            try:
                yield self._track(entry)
                yield self._act(entry)
            except CommandError as e:  # the batch system did not answer: try again next cycle
                log.warn("factory: the cycle of entry {entry} stopped: {error}", entry=entry.name, error=str(e))
            except Exception:
                log.failure("factory: the cycle of entry {entry} failed", entry=entry.name)
        yield self.advertise()
        self.cycles += 1

    def _take_requests(self, ads: list[classads.ClassAd]) -> None:
        for entry in self.entries.values():
            entry.requests = {}
        for ad in ads:
            request = parse_request(ad)
            entry_name = ad.get("ReqEntry")
            entry = self.entries.get(entry_name) if isinstance(entry_name, str) else None
            if request is None or entry is None:
                log.info("factory: ignoring a malformed request {name}", name=str(ad.get("Name")))
                continue
            if request.identity not in entry.settings["allowed_frontends"]:
                self._refuse(request, entry, "not in the entry's allowed_frontends")
                continue
            if request.sealed_credential is not None:
                problem = self._open_credential(request)
                if problem is not None:
                    self._refuse(request, entry, problem)
                    continue
            entry.requests[request.client] = request

    def _refuse(self, request: Request, entry: Entry, why: str) -> None:
        key = (request.identity, entry.name, request.client, why)
        if key not in self._refused:  # audited once, not every cycle
            self._refused.add(key)
            self._audit(request, entry, why)

    def _open_credential(self, request: Request) -> str | None:
        """Open a frontend's sealed pilot credential and keep it (mode 0600) for the request's
        glideins; returns why it is refused, or None. Used only if the identity sealed inside is
        the one the collector authenticated for the request: a credential lifted from another
        frontend's request, or sealed by a frontend naming someone else, is refused."""
        import hashlib

        from gwms.credentials.sealed import SealError, unseal

        if self.private_key is None:
            return "it carries a sealed credential, and this factory has no key to open it"
        try:
            payload = unseal(self.private_key, request.sealed_credential)
        except SealError as e:
            return f"its sealed credential: {e}"
        claimed, text = payload.get("identity"), payload.get("credential")
        if claimed != request.identity:
            return f"its sealed credential names {claimed!r}, not the frontend that advertised it"
        if not isinstance(text, str) or not text.strip():
            return "its sealed credential is empty"
        name = hashlib.sha256(f"{request.identity}\0{request.client}".encode()).hexdigest()[:32]
        path = Path(self.settings["work_dir"]) / "credentials" / f"{name}.pem"
        data = text.encode("utf-8")
        if not path.exists() or path.read_bytes() != data:
            from gwms.credentials.x509 import write_private_file

            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private_file(path, data)
        request.credential = path
        return None

    def _audit(self, request: Request, entry: Entry, why: str) -> None:
        event = {"event": "glidein request ignored", "identity": request.identity, "entry": entry.name,
                 "client": request.client, "reason": why}
        log.warn("factory: ignoring the request of {identity} ({client}) for entry {entry}: {reason}",
                 identity=request.identity, client=request.client, entry=entry.name, reason=why)
        if self.auditor is not None:
            self.auditor.note(event)

    # -- tracking ------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def _track(self, entry: Entry) -> Any:
        plugin = self.plugins[entry.settings["grid"]]
        glideins = self.records.of_entry(entry.name)
        known = [g for g in glideins if g.grid_id is not None]
        statuses: dict[str, GridStatus] = yield plugin.query(entry.settings, [g.grid_id for g in known])
        now = self.reactor.seconds()
        changed, finished = [], []
        for g in known:
            status = statuses.get(g.grid_id)  # type: ignore[arg-type]
            if status is None:
                status = GridStatus(FINISHED, None, "unknown to the grid")
            if status.state == FINISHED:
                finished.append(g)
                if g.state != FINISHED:
                    log.info("glidein {id} at {entry} finished (exit code {code}) {reason}", id=g.glidein_id,
                             entry=entry.name, code=status.exit_code, reason=status.reason)
                    changed.append(self.records.set_state(g, FINISHED, now, exit_code=status.exit_code,
                                                          reason=status.reason))
            elif g.state == REMOVING:
                continue  # asked to go; it will finish
            elif status.state != g.state:
                changed.append(self.records.set_state(g, status.state, now, reason=status.reason))
        self.records.update(changed)
        # A record with no grid id comes from a submission cut short by a restart: it may or
        # may not have reached the grid; counted as idle (so nothing is submitted twice) until stale.
        stale = [g for g in glideins if g.grid_id is None and now - g.submitted > self.settings["stale_after"]]
        done = [g.glidein_id for g in finished if now - g.changed >= FINISHED_KEPT] + [g.glidein_id for g in stale]
        if finished:
            yield plugin.forget(entry.settings, [g.grid_id for g in finished])
        self.records.forget(done)
        for glidein_id in done:  # a finished glidein's token is no use to anyone
            (Path(self.settings["work_dir"]) / "tokens" / f"{glidein_id}.token").unlink(missing_ok=True)

    # -- submitting and removing ---------------------------------------------------------------
    def counts(self, glideins: list[Glidein]) -> dict[str, int]:
        out = {"idle": 0, "running": 0, "held": 0, "removing": 0}
        for g in glideins:
            if g.state in IDLE_STATES:
                out["idle"] += 1
            elif g.state == RUNNING:
                out["running"] += 1
            elif g.state == HELD:
                out["held"] += 1
            elif g.state == REMOVING:
                out["removing"] += 1
        out["total"] = out["idle"] + out["running"] + out["held"] + out["removing"]
        return out

    @defer.inlineCallbacks
    def _act(self, entry: Entry) -> Any:
        plugin = self.plugins[entry.settings["grid"]]
        now = self.reactor.seconds()
        glideins = self.records.of_entry(entry.name)
        to_remove: list[Glidein] = []
        for g in glideins:
            if g.grid_id is None or g.state in (FINISHED, REMOVING):
                continue
            if g.state == HELD:
                to_remove.append(g)
            elif g.state == QUEUED and now - g.submitted > self.settings["stale_after"]:
                to_remove.append(g)
        for client, request in entry.requests.items():
            mine = [g for g in glideins if g.client == client and g.grid_id is not None and g not in to_remove]
            to_remove += self._excess(mine, request)
        # Clients that no longer ask for anything keep their glideins (they end when idle).
        if to_remove:
            yield plugin.remove(entry.settings, [g.grid_id for g in to_remove])
            self.records.update([self.records.set_state(g, REMOVING, now) for g in to_remove])
            log.info("factory: removing {n} glideins at {entry}", n=len(to_remove), entry=entry.name)
        if entry.settings["enabled"]:
            yield self._submit(entry, plugin, now)

    @staticmethod
    def _excess(glideins: list[Glidein], request: Request) -> list[Glidein]:
        if request.remove_excess == "NO":
            return []
        idle = sorted((g for g in glideins if g.state == QUEUED), key=lambda g: g.submitted, reverse=True)
        out = idle[:max(0, len(idle) - request.idle)]
        if request.remove_excess == "ALL":
            left = [g for g in glideins if g.state in (QUEUED, RUNNING) and g not in out]
            newest_first = sorted(left, key=lambda g: g.submitted, reverse=True)
            out += newest_first[:max(0, len(left) - request.max_glideins)]
        return out

    def allocate(self, entry: Entry, now: float) -> dict[str, int]:
        """How many glideins to submit now for each client's request at ``entry``: what each
        asks for (idle and max), within the frontend's limits at the entry (and its submit
        rate there), sharing the entry's room (max idle, max glideins, its submit rate) round
        robin, so that one frontend's large request does not starve another's."""
        budget = entry.bucket.available(now)
        settings = entry.settings
        glideins = self.records.of_entry(entry.name)
        at_entry = self.counts(glideins)
        if at_entry["held"] >= settings["max_held"]:
            return {}
        room = min(settings["max_idle"] - at_entry["idle"], settings["max_glideins"] - at_entry["total"], budget)
        wants: dict[str, int] = {}
        identity_room: dict[str, int] = {}
        for client, request in sorted(entry.requests.items()):
            mine = self.counts([g for g in glideins if g.client == client])
            wants[client] = max(0, min(request.idle - mine["idle"], request.max_glideins - mine["total"]))
            if request.identity not in identity_room:
                limits = settings["frontend_limits"].get(request.identity, {})
                theirs = self.counts([g for g in glideins if g.identity == request.identity])
                rate = 1 << 62
                if "submit_rate" in limits:
                    bucket = entry.frontend_buckets.setdefault(request.identity, RateBudget(limits["submit_rate"]))
                    rate = bucket.available(now)
                identity_room[request.identity] = 0 if theirs["held"] >= limits.get("max_held", 1 << 62) else min(
                    limits.get("max_idle", 1 << 62) - theirs["idle"],
                    limits.get("max_glideins", 1 << 62) - theirs["total"], rate)
        out = dict.fromkeys(wants, 0)
        while room > 0:
            progress = False
            for client, want in wants.items():
                identity = entry.requests[client].identity
                if room > 0 and out[client] < want and identity_room[identity] > 0:
                    out[client] += 1
                    identity_room[identity] -= 1
                    room -= 1
                    progress = True
            if not progress:
                break
        return {c: n for c, n in out.items() if n > 0}

    @defer.inlineCallbacks
    def _submit(self, entry: Entry, plugin: Any, now: float) -> Any:
        for client, n in self.allocate(entry, now).items():
            request = entry.requests[client]
            new = [Glidein(f"{entry.name}-{secrets.token_hex(6)}", entry.name, client, request.identity, now,
                           changed=now) for _ in range(n)]
            self.records.add(new)  # durable before the grid sees them
            credential = self.pilot_credential(entry, request)
            submissions = [GlideinSubmission(g.glidein_id, self.glidein_arguments(entry, request, g.glidein_id),
                                             self.glidein_token(entry, g.glidein_id) or credential) for g in new]
            try:
                accepted: dict[str, str] = yield plugin.submit(entry.settings, submissions)
            except Exception as e:
                log.warn("factory: submitting to {entry} failed: {error}", entry=entry.name, error=str(e))
                accepted = {}
            self.records.update([self.records.set_state(g, QUEUED, now, grid_id=accepted[g.glidein_id])
                                 for g in new if g.glidein_id in accepted])
            self.records.forget([g.glidein_id for g in new if g.glidein_id not in accepted])
            entry.bucket.spend(len(new))
            if request.identity in entry.frontend_buckets:
                entry.frontend_buckets[request.identity].spend(len(new))
            log.info("factory: submitted {n} glideins to {entry} for {client}", n=len(accepted), entry=entry.name,
                     client=client)

    def glidein_token(self, entry: Entry, glidein_id: str) -> Path | None:
        """For an entry with pilot_token: a token for this glidein alone (mode 0600 file), signed
        with the pool's key, scoped to advertising a startd, valid for the glidein's lifetime
        (plus a margin for its queue time); the collector accepts nothing else from it."""
        if not entry.settings["pilot_token"]:
            return None
        from gwms.credentials.tokens import create_token, load_signing_key
        from gwms.credentials.x509 import write_private_file

        if self._signing_key is None:
            self._signing_key = load_signing_key(self.settings["token_signing_key"])
        token = create_token(self._signing_key, f"glidein-{glidein_id}@{self.name}",
                             self.settings["token_issuer"] or self.config.pool["name"], ["ADVERTISE_STARTD"],
                             float(entry.settings["max_walltime"]) + float(self.settings["stale_after"]),
                             now=self.reactor.seconds())
        path = Path(self.settings["work_dir"]) / "tokens" / f"{glidein_id}.token"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(path, token.encode("ascii") + b"\n")
        return path

    def pilot_credential(self, entry: Entry, request: Request) -> Path | None:
        """The credential a glidein gets: the one its frontend handed over, else the entry's,
        the factory's, or the proxy X509_USER_PROXY names."""
        import os

        found = (request.credential or entry.settings["credential"] or self.settings["credential"]
                 or os.environ.get("X509_USER_PROXY"))
        return Path(found) if found else None

    def glidein_arguments(self, entry: Entry, request: Request, glidein_id: str) -> tuple[str, ...]:
        """glidein_startup.sh's options (the plugin adds -credential and -workdir)."""
        s = entry.settings
        args = ["-web", self.web_url, "-descript", entry.description, "-entry", entry.name,
                "-factory", self.name, "-client", request.client, "-name", glidein_id,
                "-collectors", request.collectors, "-lifetime", str(int(s["max_walltime"])),
                "-retire", str(int(0.9 * s["max_walltime"])), "-idle", str(int(s["max_idle_time"])),
                "-failure_backoff", str(int(s["failure_backoff"])), "-listen", s["worker_listen"],
                "-credential_margin", str(int(s["credential_margin"]))]
        for identity in request.trusted:
            args += ["-trusted", identity]
        if request.client_files is not None:
            args += ["-client_web", request.client_files[0], "-client_descript", request.client_files[1]]
        if s["python"]:
            args += ["-python", s["python"]]
        if s["http_proxy"]:
            args += ["-http_proxy", s["http_proxy"]]
        return tuple(args)

    # -- advertising ---------------------------------------------------------------------------
    def entry_ad(self, entry: Entry) -> classads.ClassAd:
        s = entry.settings
        ad = classads.ClassAd()
        ad["MyType"] = "glidefactory"
        ad["Name"] = f"{entry.name}@{self.name}"
        ad["FactoryName"] = self.name
        ad["EntryName"] = entry.name
        ad["GlideinEnabled"] = bool(s["enabled"])
        ad["GLIDEIN_Grid"] = s["grid"]
        ad["GLIDEIN_Contact"] = s["contact"]
        ad["GLIDEIN_Max_Walltime"] = int(s["max_walltime"])
        ad["GLIDEIN_Max_Idle"] = int(s["max_idle_time"])
        for name, value in s["attributes"].items():
            ad[name] = value
        ad["PubKeyType"] = "RSA"
        ad["PubKeyValue"] = self.public_key
        counts = self.counts(self.records.of_entry(entry.name))
        ad["GlideinMonitorTotalStatusIdle"] = counts["idle"]
        ad["GlideinMonitorTotalStatusRunning"] = counts["running"]
        ad["GlideinMonitorTotalStatusHeld"] = counts["held"]
        ad["ClassAdLifetime"] = int(max(3 * self.settings["cycle_interval"], 60))
        return ad

    def client_ads(self, entry: Entry) -> list[classads.ClassAd]:
        glideins = self.records.of_entry(entry.name)
        clients = sorted(set(entry.requests) | {g.client for g in glideins})
        ads = []
        for client in clients:
            request = entry.requests.get(client)
            counts = self.counts([g for g in glideins if g.client == client])
            ad = classads.ClassAd()
            ad["MyType"] = "glidefactoryclient"
            ad["Name"] = f"{entry.name}@{self.name}@{client}"
            ad["ReqFactory"] = self.name
            ad["ReqEntry"] = entry.name
            ad["ReqClientName"] = client
            ad["GlideinMonitorRequestedIdle"] = request.idle if request else 0
            ad["GlideinMonitorRequestedMaxGlideins"] = request.max_glideins if request else 0
            ad["GlideinMonitorStatusIdle"] = counts["idle"]
            ad["GlideinMonitorStatusRunning"] = counts["running"]
            ad["GlideinMonitorStatusHeld"] = counts["held"]
            ad["GlideinMonitorStatusRemoving"] = counts["removing"]
            ad["ClassAdLifetime"] = int(max(3 * self.settings["cycle_interval"], 60))
            ads.append(ad)
        return ads

    @defer.inlineCallbacks
    def advertise(self) -> Any:
        ads = []
        for entry in self.entries.values():
            ads.append(self.entry_ad(entry))
            ads += self.client_ads(entry)
        results = yield defer.DeferredList([self.collectors.advertise(ad, "ADVERTISE_FACTORY") for ad in ads],
                                           consumeErrors=True)
        error = first_failure(results)
        if error is not None:
            log.warn("factory: advertising failed: {error}", error=error)
