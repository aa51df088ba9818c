"""HTCondor's negotiation rules, level implications and the stock list authorizer."""

import itertools

import pytest

from gwms.config import parse_config
from gwms.plugins.auth_methods import AnonymousMethod, FSMethod, TokenMethod, X509Method
from gwms.plugins.authorization import ListAuthorizer
from gwms.security import (
    ANONYMOUS, GRANTING, AuthorizationRequest, ChannelFacts, Identity, NegotiationFailed,
    ServerSecurity, combine, negotiate,
)

# The table from the HTCondor manual: rows are the client, columns the server.
TABLE = {
    "NEVER":     {"NEVER": False, "OPTIONAL": False, "PREFERRED": False, "REQUIRED": "fail"},
    "OPTIONAL":  {"NEVER": False, "OPTIONAL": False, "PREFERRED": True, "REQUIRED": True},
    "PREFERRED": {"NEVER": False, "OPTIONAL": True, "PREFERRED": True, "REQUIRED": True},
    "REQUIRED":  {"NEVER": "fail", "OPTIONAL": True, "PREFERRED": True, "REQUIRED": True},
}


@pytest.mark.parametrize("client,server", list(itertools.product(TABLE, TABLE)))
def test_combination_table(client, server):
    expected = TABLE[client][server]
    if expected == "fail":
        with pytest.raises(NegotiationFailed, match="REQUIRED by the .* and NEVER allowed"):
            combine(client, server, "encryption")
    else:
        assert combine(client, server, "encryption") is expected


METHODS = {m.name: m for m in (X509Method(), TokenMethod({}, "pool"), FSMethod(), AnonymousMethod())}


def level(text=""):
    return parse_config(text).levels


def test_negotiate_picks_the_clients_first_method_the_server_accepts_and_forces_tls():
    policy = level('[security]\nmethods = ["token", "x509"]\n')["WRITE"]
    agreement = negotiate("REQUIRED", "OPTIONAL", ["x509", "token"], policy, METHODS, False, "WRITE")
    assert agreement.method == "x509" and agreement.authenticate and agreement.encrypt


def test_negotiate_read_in_the_clear_by_default():
    agreement = negotiate("OPTIONAL", "OPTIONAL", ["x509"], level()["READ"], METHODS, False, "READ")
    assert agreement.authenticate is False and agreement.encrypt is False and agreement.method is None


def test_negotiate_without_a_common_method_names_both_sides():
    with pytest.raises(NegotiationFailed, match="client offers anonymous, the server accepts x509, token, fs"):
        negotiate("OPTIONAL", "OPTIONAL", ["anonymous"], level()["WRITE"], METHODS, False, "WRITE")


def test_fs_only_over_the_local_socket_and_local_never_runs_tls():
    policy = level()["WRITE"]
    with pytest.raises(NegotiationFailed, match="fs works only over the local socket"):
        negotiate("REQUIRED", "REQUIRED", ["fs"], policy, METHODS, False, "WRITE")
    agreement = negotiate("REQUIRED", "REQUIRED", ["fs"], policy, METHODS, True, "WRITE")
    assert agreement.method == "fs" and agreement.encrypt is False


def test_level_implications():
    assert GRANTING["READ"] >= {"WRITE", "ADMINISTRATOR", "DAEMON", "NEGOTIATOR", "ADVERTISE_STARTD"}
    assert GRANTING["WRITE"] == {"WRITE", "ADMINISTRATOR"}
    assert GRANTING["ADVERTISE_STARTD"] == {"ADVERTISE_STARTD"}


def req(name, level, peer="127.0.0.1", method="x509", command="UPDATE"):
    return AuthorizationRequest(Identity(method=method, name=name), peer, command, level)


CONF = """
[security.READ]
allow = ["*"]
[security.WRITE]
allow = ["alice", "token:svc"]
deny = ["mallory"]
[security.ADMINISTRATOR]
allow = ["root"]
[security.DAEMON]
allow_regex = ["/DC=org/DC=example/OU=Services/CN=.*"]
deny_regex = [".*CN=evil.*"]
deny_networks = ["10.66.0.0/16"]
[security.ADVERTISE_STARTD]
allow_networks = ["127.0.0.0/8"]
"""


def test_authorizer_exact_regex_deny_wins_and_unlisted_denied():
    a = ListAuthorizer(level(CONF))
    assert a.authorize(req("alice", "WRITE")).allowed
    d = a.authorize(req("bob", "WRITE"))
    assert not d.allowed and d.rule == "'bob' is not listed for WRITE"
    assert a.authorize(req("/DC=org/DC=example/OU=Services/CN=host1", "DAEMON")).allowed
    d = a.authorize(req("/DC=org/DC=example/OU=Services/CN=evil1", "DAEMON"))
    assert not d.allowed and d.rule.startswith("deny_regex[DAEMON]")


def test_authorizer_implications_and_method_qualified_names():
    a = ListAuthorizer(level(CONF))
    assert a.authorize(req("root", "WRITE")).allowed  # ADMINISTRATOR implies WRITE
    d = a.authorize(req("root", "WRITE"))
    assert d.rule == "allow[ADMINISTRATOR] 'root'"
    assert a.authorize(req("svc", "WRITE", method="token")).allowed
    assert not a.authorize(req("svc", "WRITE", method="x509")).allowed
    assert not a.authorize(req("alice", "ADMINISTRATOR")).allowed


def test_advertise_levels_fall_back_to_daemon_lists_but_keep_their_networks():
    a = ListAuthorizer(level(CONF))
    dn = "/DC=org/DC=example/OU=Services/CN=startd"
    d = a.authorize(req(dn, "ADVERTISE_SCHEDD", peer="192.0.2.7"))
    assert d.allowed and d.rule.startswith("allow_regex[DAEMON]")
    d = a.authorize(req(dn, "ADVERTISE_STARTD", peer="192.0.2.7"))
    assert not d.allowed and "allow_networks[ADVERTISE_STARTD]" in d.rule
    assert a.authorize(req(dn, "ADVERTISE_STARTD", peer="127.0.0.1")).allowed


def test_network_deny_blocks_a_site():
    a = ListAuthorizer(level(CONF))
    d = a.authorize(req("/DC=org/DC=example/OU=Services/CN=h", "DAEMON", peer="10.66.3.4"))
    assert not d.allowed and d.rule == "deny_networks[DAEMON] 10.66.0.0/16"


def test_star_admits_anyone_for_read():
    a = ListAuthorizer(level(CONF))
    assert a.authorize(AuthorizationRequest(ANONYMOUS, "198.51.100.1", "QUERY", "READ")).allowed


class Recorder:
    def __init__(self):
        self.events = []

    def record(self, request, decision):
        self.events.append((request, decision))


def security(text=CONF):
    config = parse_config(text)
    return ServerSecurity(levels=config.levels, methods=METHODS, authorizer=ListAuthorizer(config.levels),
                          auditor=Recorder())


TLS_CHANNEL = ChannelFacts(peer_host="127.0.0.1", local=False, tls=True)
PLAIN_CHANNEL = ChannelFacts(peer_host="127.0.0.1", local=False, tls=False)


def test_server_check_enforces_policy_before_lists_and_audits_each_decision():
    s = security()
    d = s.check(ANONYMOUS, PLAIN_CHANNEL, "UPDATE", "WRITE")
    assert not d.allowed and d.rule == "policy: WRITE requires authentication"
    d = s.check(Identity("x509", "alice"), PLAIN_CHANNEL, "UPDATE", "WRITE")
    assert not d.allowed and d.rule == "policy: WRITE requires encryption"
    d = s.check(Identity("x509", "alice"), TLS_CHANNEL, "UPDATE", "WRITE")
    assert d.allowed
    assert [e[1].allowed for e in s.auditor.events] == [False, False, True]
    assert s.auditor.events[2][0].identity.name == "alice"


def test_anonymous_method_is_read_only_whatever_the_lists_say():
    s = security('[security]\nmethods = ["x509", "anonymous"]\n'
                 + CONF.replace('allow = ["alice", "token:svc"]', 'allow = ["*"]'))
    anon = Identity("anonymous", "anonymous", read_only=True)
    d = s.check(anon, TLS_CHANNEL, "UPDATE", "WRITE")
    assert not d.allowed and d.rule == "credential: anonymous identities may only READ"
    assert s.check(anon, TLS_CHANNEL, "QUERY", "READ").allowed


def test_token_scope_limits_levels():
    s = security(CONF.replace('allow = ["alice", "token:svc"]', 'allow = ["svc"]'))
    ident = Identity("token", "svc", scopes=frozenset({"READ"}))
    d = s.check(ident, TLS_CHANNEL, "UPDATE", "WRITE")
    assert not d.allowed and d.rule == "credential: token scope READ does not include WRITE"
    ident = Identity("token", "svc", scopes=frozenset({"ADMINISTRATOR"}))
    assert s.check(ident, TLS_CHANNEL, "UPDATE", "WRITE").allowed  # ADMINISTRATOR implies WRITE


def test_method_not_accepted_for_level():
    s = security(CONF + '\n[security.NEGOTIATOR]\nmethods = ["x509"]\nallow = ["*"]\n')
    d = s.check(Identity("token", "neg"), TLS_CHANNEL, "QUERY_PRIVATE", "NEGOTIATOR")
    assert not d.allowed and d.rule == "policy: method token not accepted for NEGOTIATOR"
