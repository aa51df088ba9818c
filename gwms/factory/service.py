"""The glidein factory daemon (``twistd -n gwms-factory --config FILE``): its web server for
the glidein files, its cycle (``gwms.factory.cycle.Factory``) on a timer, its records.

The glidein files are served by the factory's web server (``gwms.glidein.files``): one
content-addressed description per entry, whose hash goes to the glidein with its submission.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gwms.config import HostConfig
from gwms.factory.cycle import Factory
from gwms.factory.grid import FINISHED
from gwms.factory.records import Glidein, GlideinRecords
from gwms.protocols.client import CollectorList

log = Logger()


def publish_entry_files(config: HostConfig, store: Path) -> dict[str, str]:
    """Publish every entry's glidein files into the web store; {entry: description hash}.

    Each entry's set is the stock validation scripts, the site's own, the CA bundle, the
    entry's attributes (so that they reach the glidein integrity-checked) and the wheelhouse."""
    from gwms.glidein.files import publish, stock_validation_scripts

    settings = config.section("factory")
    common: list[tuple[str, str, Any]] = [("validate", p.name, p) for p in stock_validation_scripts()]
    common += [("validate", Path(p).name, Path(p)) for p in settings["validation_scripts"]]
    ca = settings["ca"] or config.pool["ca"]
    if ca is not None:
        common.append(("ca", "ca.pem", Path(ca)))
    wheels = sorted(Path(settings["wheelhouse"]).glob("*.whl")) if settings["wheelhouse"] else []
    common += [("wheel", w.name, w) for w in wheels]
    out = {}
    for name, entry in settings["entry"].items():
        attrs = {**entry["attributes"], "GLIDEIN_Max_Walltime": int(entry["max_walltime"])}
        if entry["brokers"]:
            attrs["GLIDEIN_Brokers"] = ",".join(entry["brokers"])
        lines = "".join(f"{k}={_attr_text(v)}\n" for k, v in sorted(attrs.items()))
        out[name] = publish(store, [*common, ("attrs", "entry.attrs", lines.encode("utf-8"))])
    return out


def _attr_text(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if "\n" in text or "\r" in text or "\0" in text:
        raise ValueError(f"entry attribute values are one line: {value!r}")
    return text


def factory_key(path: Path) -> tuple[Any, str]:
    """The factory's RSA key (made on first start, mode 0600): (private key, public key in PEM).
    Frontends seal their pilot credentials for the factory with the public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    path = Path(path)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb", opener=lambda p, f: __import__("os").open(p, f, 0o600)) as out:
            out.write(pem)
        tmp.replace(path)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, public.decode("ascii")


class FactoryService(service.MultiService):
    """The factory as a daemon: its web server, its cycle, its records."""

    def __init__(self, reactor: Any, config: HostConfig, collectors: CollectorList | None = None) -> None:
        from gwms.daemon import client_security, collectors as pool_collectors
        from gwms.interfaces import IGridSubmitter
        from gwms.plugins import GRID_SUBMITTERS, load_plugin
        from gwms.protocols.client import Address
        from gwms.protocols.messages import Limits
        from gwms.security import Auditor

        super().__init__()
        self.reactor = reactor
        self.config = config
        settings = config.section("factory")
        self.settings = settings
        work = Path(settings["work_dir"])
        work.mkdir(parents=True, exist_ok=True)
        self.store = work / "web"
        self.descriptions = publish_entry_files(config, self.store)
        if collectors is None:
            if settings["collectors"]:
                collectors = CollectorList(reactor, [Address(host=h, port=p) for h, p in settings["collectors"]],
                                        client_security(config), Limits.from_pool(config.pool),
                                        connect_timeout=config.pool["connect_timeout"])
            else:
                collectors = pool_collectors(reactor, config)
        self.collectors = collectors
        kinds = sorted({entry["grid"] for entry in settings["entry"].values()})
        self.plugins = {kind: load_plugin("grid submitter", kind, GRID_SUBMITTERS, IGridSubmitter, config, reactor)
                        for kind in kinds}
        self.records = GlideinRecords(work / "factory.db")
        self.private_key, self.public_key = factory_key(work / "factory_key.pem")
        self.auditor = Auditor(config.pool["audit_log"])
        self.factory: Factory | None = None
        self.web_port: Any = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.web.server import Site

        from gwms.glidein.files import GlideinFilesResource

        super().startService()
        host, port = self.settings["web_listen"]
        site = Site(GlideinFilesResource(self.store))
        site.displayTracebacks = False
        d = TCP4ServerEndpoint(self.reactor, port, interface=host).listen(site)
        d.addCallback(self._listening)
        d.addErrback(lambda f: (log.failure("factory: cannot start the web server", f), self.reactor.stop()))

    def _listening(self, port: Any) -> None:
        self.web_port = port
        bound = port.getHost()
        url = self.settings["web_url"] or f"http://{bound.host}:{bound.port}/"
        if self.settings["address_file"]:
            path = Path(self.settings["address_file"])
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(f"{bound.host}:{bound.port}\n")
            tmp.replace(path)
        self.factory = Factory(self.reactor, self.config, self.records, self.plugins, self.collectors, url,
                               self.public_key, self.auditor, self.private_key)
        for name, entry in self.factory.entries.items():
            entry.description = self.descriptions[name]
        log.info("factory {name}: {n} entries, glidein files at {url}", name=self.factory.name,
                 n=len(self.factory.entries), url=url)
        self._loop = LoopingCall(self._cycle)
        self._loop.clock = self.reactor
        self._loop.start(self.settings["cycle_interval"], now=True)

    def _cycle(self) -> Any:
        assert self.factory is not None
        return self.factory.cycle().addErrback(lambda f: log.failure("factory cycle failed", f))

    @defer.inlineCallbacks
    def remove_all_glideins(self, timeout: float = 60.0) -> Any:
        """Remove every glidein this factory has and wait (up to ``timeout``) until the grid
        says they are gone; returns how many were still there at the end. For gwms-pool, whose
        glideins are its own local processes: a one-host pool that stops leaves nothing behind."""
        from twisted.internet import task

        deadline = self.reactor.seconds() + timeout
        left: list[Glidein] = []
        for name, entry in sorted(self.settings["entry"].items()):
            plugin = self.plugins[entry["grid"]]
            settings = {**entry, "name": name}
            ids = [g.grid_id for g in self.records.of_entry(name) if g.grid_id is not None]
            if ids:
                yield plugin.remove(settings, ids)
            while ids and self.reactor.seconds() < deadline:
                statuses = yield plugin.query(settings, ids)
                ids = [i for i in ids if i in statuses and statuses[i].state != FINISHED]
                if ids:
                    yield task.deferLater(self.reactor, 0.2, lambda: None)
            gone = [g for g in self.records.of_entry(name) if g.grid_id not in ids]
            yield plugin.forget(settings, [g.grid_id for g in gone if g.grid_id is not None])
            self.records.forget([g.glidein_id for g in gone])
            left += [g for g in self.records.of_entry(name)]
        return len(left)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.web_port is not None:
            yield self.web_port.stopListening()
        for plugin in self.plugins.values():  # e.g. the ssh grid's connections
            stop = getattr(plugin, "stop", None)
            if stop is not None:
                try:
                    yield stop()
                except Exception as e:
                    log.warn("factory: stopping grid plugin {name}: {error}", name=plugin.name, error=str(e))
        self.collectors.close()
        self.records.close()
        self.auditor.close()
        yield super().stopService()


from gwms.daemon import DaemonOptions  # noqa: E402  (twistd's Options for the role)


class Options(DaemonOptions):
    pass


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    return FactoryService(reactor, options["host_config"])
