"""What the startd's unit tests (test_startd, test_delegation) drive a Startd on a Clock with:
a job process that finishes when told to, and requests that carry just an ad."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from gwms import classads
from gwms.startd.process import JobResult, Usage


class FakeProcess:
    """Finishes when told to; records kills and the environment it was started with."""

    def __init__(self, reactor, switch, job, argv, env, sandbox, stdin, stdout, stderr, marker):
        self.finished = defer.Deferred()
        self.pid = 4242
        self.killed = None
        self.env = dict(env)

    def start(self):
        pass

    def usage(self):
        return Usage(0.0, 0.0, 0.0, 0)

    def kill(self, grace):
        self.killed = grace
        self.end(signal=9)
        return defer.succeed(None)

    def end(self, code=None, signal=None):
        if not self.finished.called:
            self.finished.callback(JobResult(code, signal, Usage(0.1, 0.0, 1.0, 100), 0))


@dataclass
class FakeRequest:
    ad: Any


def ad(**values: Any) -> classads.ClassAd:
    a = classads.ClassAd()
    for k, v in values.items():
        a[k] = v
    return a
