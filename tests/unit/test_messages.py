"""The message layer's promises to the daemons built on it."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from gwms import classads
from gwms.protocols.messages import Command, MessageServerFactory
from gwms.testing.network import MemoryNetwork, memory_config, memory_security


class NoAudit:
    def record(self, request, decision):
        pass

    def close(self):
        pass


def test_pipelined_requests_reach_their_handlers_in_the_order_they_were_sent():
    clock = MemoryReactorClock()
    config = memory_config('[security.READ]\nallow = ["*"]\n')
    handled = []
    slow = defer.Deferred()  # an unanswered request does not hold back the ones behind it

    def first(request):
        handled.append(("FIRST", request.ad["N"]))
        return slow if request.ad["N"] == 0 else classads.ClassAd()

    def second(request):
        handled.append(("SECOND", request.ad["N"]))
        return classads.ClassAd()

    factory = MessageServerFactory(clock, memory_security(config, NoAudit()),
                                   [Command("FIRST", "READ", first), Command("SECOND", "READ", second)])
    net = MemoryNetwork(clock)
    client, _server, _pump = net.connect(factory, "alice", "READ", config=config)
    net.flush()
    sent, answers = [], []
    for n in range(40):
        command = "SECOND" if n % 3 == 1 else "FIRST"
        ad = classads.ClassAd()
        ad["N"] = n
        client.call(command, ad).addCallback(answers.append)
        sent.append((command, n))
    net.flush()  # every request is written before the server reads any
    assert handled == sent
    assert len(answers) == 39  # all but the one whose handler has not answered yet
    slow.callback(classads.ClassAd())
    net.flush()
    assert len(answers) == 40
