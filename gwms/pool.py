"""``twistd -n gwms-pool --config FILE``: every central role of a one-host pool in one process.

The pool's collector, negotiator and schedd; the glidein collector; a factory whose entries
use the ``local`` grid (glideins are local processes: the pool's startds arrive only as
glideins); the frontend; the factory's web server. With no ``[pool] ca`` configured it makes
the pool's credentials once, in ``[onehost] credentials``: a CA, a host certificate for
localhost (every daemon's identity) and a pilot certificate the glideins present.

The collectors may listen on port 0: the other roles are made once both collectors listen, with
their actual addresses.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from gwms.config import HostConfig
from gwms.daemon import DaemonOptions

log = Logger()

HOST_DN = "/O=gwms/OU=Hosts/CN=localhost"
PILOT_DN = "/O=gwms/OU=Pilots/CN=glidein"


def ensure_credentials(directory: Path) -> dict[str, Path]:
    """The one-host pool's credentials in ``directory``, made the first time: the CA, the host
    certificate and key (localhost), the pilot credential (certificate and key in one file,
    mode 0600, as glideins take it) and the pool's token signing key (for glideins with tokens)."""
    from gwms.credentials.ca import CA_CERT, init_ca, issue_host, issue_pilot

    directory = Path(directory)
    if not (directory / CA_CERT).exists():
        init_ca(directory, name="gwms one-host pool CA")
    host_cert, host_key = directory / "host-localhost.pem", directory / "host-localhost.key"
    if not host_cert.exists():
        host_cert, host_key = issue_host(directory, "localhost")
    pilot = directory / "pilot.pem"
    if not pilot.exists():
        cert, key = issue_pilot(directory, "glidein", "localhost")
        fd = os.open(pilot.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(cert.read_bytes() + key.read_bytes())
        pilot.with_suffix(".tmp").replace(pilot)
    signing_key = directory / "pool-signing.key"
    if not signing_key.exists():
        from gwms.credentials.tokens import generate_signing_key

        generate_signing_key(signing_key)
    return {"ca": directory / CA_CERT, "cert": host_cert, "key": host_key, "pilot": pilot,
            "signing_key": signing_key}


def _with(config: HostConfig, section: str, **values: Any) -> HostConfig:
    sections = dict(config.sections)
    sections[section] = {**config.section(section), **values}
    return dataclasses.replace(config, sections=sections)


class PoolService(service.MultiService):
    def __init__(self, reactor: Any, config: HostConfig) -> None:
        from gwms.collector.service import CollectorService

        super().__init__()
        self.reactor = reactor
        onehost = config.section("onehost")
        if config.pool["ca"] is None:
            creds = ensure_credentials(onehost["credentials"])
            config = dataclasses.replace(config, pool={**config.pool, "ca": creds["ca"], "cert": creds["cert"],
                                                       "key": creds["key"],
                                                       "token_signing_key": config.pool["token_signing_key"]
                                                       or creds["signing_key"]})
            if config.section("factory")["credential"] is None:
                config = _with(config, "factory", credential=creds["pilot"])
            if config.section("factory")["token_signing_key"] is None:
                config = _with(config, "factory", token_signing_key=config.pool["token_signing_key"])
        self.config = config
        self.collector = CollectorService(reactor, config)
        self.collector.setServiceParent(self)
        glidein_config = _with(config, "collector", listen=onehost["glidein_collector_listen"],
                               address_file=onehost["glidein_collector_address_file"], unix_socket=None,
                               name=f"glideins@{socket.getfqdn()}")
        self.glidein_collector = CollectorService(reactor, glidein_config)
        self.glidein_collector.setServiceParent(self)
        self.roles: dict[str, service.Service] = {}

    def startService(self) -> None:
        super().startService()
        d = defer.gatherResults([self.collector.listener._listening, self.glidein_collector.listener._listening])
        d.addCallback(lambda _: self._start_roles())
        d.addErrback(lambda f: (log.failure("gwms-pool could not start", f), self.reactor.stop()))

    def _start_roles(self) -> None:
        from gwms.factory.service import FactoryService
        from gwms.frontend.service import FrontendService
        from gwms.negotiator.service import NegotiatorService
        from gwms.schedd.service import ScheddService

        pool_address = self.collector.listener.address
        glidein_address = self.glidein_collector.listener.address
        assert pool_address is not None and glidein_address is not None
        pool = (pool_address.host, pool_address.port)
        glideins = (glidein_address.host, glidein_address.port)
        config = dataclasses.replace(self.config, pool={**self.config.pool, "collectors": [pool]})
        config = _with(config, "factory", collectors=[glideins])
        config = _with(config, "frontend", glidein_collectors=[glideins], pool_collectors=[pool])
        self.roles = {"negotiator": NegotiatorService(self.reactor, config),
                      "schedd": ScheddService(self.reactor, config),
                      "factory": FactoryService(self.reactor, config),
                      "frontend": FrontendService(self.reactor, config)}
        for role in self.roles.values():
            role.setServiceParent(self)  # started at once: the parent runs
        log.info("gwms-pool: collector at {pool}, glidein collector at {glideins}", pool=str(pool_address),
                 glideins=str(glidein_address))


    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop the frontend and the factory's cycle first, then the glideins (their startds
        give back their jobs to the schedd, which must still be up), then everything else."""
        frontend, factory = self.roles.get("frontend"), self.roles.get("factory")
        if frontend is not None and frontend.running:
            yield frontend.stopService()
        if factory is not None:
            loop = getattr(factory, "_loop", None)
            if loop is not None and loop.running:
                loop.stop()
            left = yield factory.remove_all_glideins()
            if left:
                log.warn("gwms-pool: {n} glideins did not end in time", n=left)
        yield super().stopService()


class Options(DaemonOptions):
    pass


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    return PoolService(reactor, options["host_config"])
