"""What every gwms daemon does the same way: read its configuration, build its security, listen,
and talk to the pool's collectors. Roles build on these pieces in their makeService."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from gwms.config import ConfigError, HostConfig, load_config
from gwms.credentials.x509 import CredentialError, load_credential
from gwms.protocols.client import Address, ClientSecurity, CollectorList
from gwms.protocols.messages import Command, Limits, MessageServerFactory
from gwms.security import Auditor, ServerSecurity

log = Logger()


class DaemonOptions(usage.Options):
    """``twistd -n gwms-<role> --config FILE``."""

    optParameters = [["config", "c", None, "The host configuration file (TOML)."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self["host_config"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def host_credential(config: HostConfig) -> Any:
    """The certificate (or proxy) this host presents, or None if none is configured."""
    pool = config.pool
    try:
        if pool["proxy"] is not None:
            return load_credential(pool["proxy"])
        if pool["cert"] is not None:
            return load_credential(pool["cert"], pool["key"])
    except CredentialError as e:
        raise ConfigError(f"{config.source}: host credential: {e}") from None
    return None


def server_security(config: HostConfig) -> ServerSecurity:
    from gwms.plugins import authorizer, load_auth_methods
    from gwms.tls import ServerTLS, TLSConfigError

    credential = host_credential(config)
    pinned = None
    if credential is None and config.pool["token"] is not None:
        # A host with only a token (a glidein) still serves TLS: with a certificate of its own
        # making, which clients know by the fingerprint it advertises (gwms.tls).
        from gwms.tls import ephemeral_credential, fingerprint

        credential = ephemeral_credential()
        pinned = fingerprint(credential.cert)
    tls = None
    if credential is not None:
        try:
            tls = ServerTLS(credential, config.pool["ca"])
        except TLSConfigError as e:
            raise ConfigError(f"{config.source}: {e}") from None
        tls.fingerprint = pinned
    methods, levels = load_auth_methods(config)
    return ServerSecurity(levels=levels, methods=methods,
                          authorizer=authorizer(config), auditor=Auditor(config.pool["audit_log"]), tls=tls)


def client_security(config: HostConfig) -> ClientSecurity:
    return ClientSecurity.from_config(config)


def collectors(reactor: Any, config: HostConfig, connector: Any = None,
               security: ClientSecurity | None = None) -> CollectorList:
    """The pool's collectors as this host's configuration names them. ``connector`` and
    ``security`` are for in-memory pools (``gwms.testing``)."""
    addresses = [Address(host=h, port=p) for h, p in config.pool["collectors"]]
    return CollectorList(reactor, addresses, security or client_security(config), Limits.from_pool(config.pool),
                         connect_timeout=config.pool["connect_timeout"], connector=connector)


WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# Seconds a stopping daemon waits for its peers to see their connections close.
CLOSE_GRACE = 2.0


def outbound_host(host: str, port: int) -> str:
    """The address this host uses to reach ``host:port`` (the kernel's choice of interface; no
    packet is sent), or its FQDN if there is no route."""
    import socket

    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return str(s.getsockname()[0])
    except OSError:
        return socket.getfqdn()


class MessageListener(service.Service):
    """Listens on a TCP address (and optionally a UNIX socket) with a message server factory;
    writes the address it got to ``address_file`` (for port 0).

    Bound to every interface (0.0.0.0 or ::), it advertises the address this host reaches
    ``advertise_toward`` (the pool's collector) from: what a worker node's glidein, started by
    a batch system on a host the factory never named, must publish for schedds to reach it."""

    def __init__(self, reactor: Any, factory: MessageServerFactory, tcp: tuple[str, int] | None,
                 unix_socket: Path | None = None, address_file: Path | None = None,
                 advertise_toward: tuple[str, int] | None = None) -> None:
        self.reactor = reactor
        self.advertise_toward = advertise_toward
        self.factory = factory
        self.tcp = tcp
        self.unix_socket = unix_socket
        self.address_file = address_file
        self.ports: list[Any] = []
        self.address: Address | None = None

    def startService(self) -> None:
        super().startService()
        endpoints = []
        if self.tcp is not None:
            host, port = self.tcp
            cls = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
            endpoints.append(cls(self.reactor, port, interface=host))
        if self.unix_socket is not None:
            if self.unix_socket.exists():
                self.unix_socket.unlink()
            # World-connectable on purpose: fs authentication identifies every local user.
            endpoints.append(UNIXServerEndpoint(self.reactor, str(self.unix_socket), mode=0o666))
        self._listening = defer.gatherResults([e.listen(self.factory) for e in endpoints], consumeErrors=True)
        self._listening.addCallback(self._listening_on)
        self._listening.addErrback(self._listen_failed)

    def _listening_on(self, ports: list[Any]) -> None:
        self.ports = ports
        if self.tcp is not None:
            addr = ports[0].getHost()
            host = addr.host
            if host in WILDCARD_HOSTS and self.advertise_toward is not None:
                host = outbound_host(*self.advertise_toward)
            self.address = Address(host=host, port=addr.port)
            log.info("listening on {address}", address=str(self.address))
            if self.address_file is not None:
                write_address_file(self.address_file, str(self.address))

    def _listen_failed(self, failure: Any) -> None:
        log.failure("cannot listen", failure)
        self.reactor.callLater(0, self.reactor.stop)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop listening, then close every connection cleanly (what was written, a reply
        telling a shadow its job was evicted say, still reaches the peer), waiting up to
        CLOSE_GRACE for the peers to see it. A TLS close waits for the peer's own close_notify:
        a peer that does not read (hung, or a blocked client) is then cut off."""
        super().stopService()
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        for proto in list(self.factory.connections):
            proto.flush()
            proto.transport.loseConnection()
        deadline = self.reactor.seconds() + CLOSE_GRACE
        while self.factory.connections and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, 0.05, lambda: None)
        for proto in list(self.factory.connections):
            abort = getattr(proto.transport, "abortConnection", None)
            if abort is not None:
                abort()
        self.factory.security.auditor.close()


def write_address_file(path: Path, address: str) -> None:
    """Where a daemon can be reached, for tests and tools (written atomically)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, path)


def message_factory(reactor: Any, config: HostConfig, commands: Iterable[Command]) -> MessageServerFactory:
    return MessageServerFactory(reactor, server_security(config), commands, Limits.from_pool(config.pool))
