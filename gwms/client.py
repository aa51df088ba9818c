"""The Python API for users of a schedd; the ``gwms`` job commands are built on it.

Every call returns a Deferred (run it under a reactor, e.g. ``twisted.internet.task.react``).

    schedd = ScheddClient(reactor, Address.parse("unix:/var/lib/gwms/schedd.sock"), security)
    cluster, count = yield schedd.submit_file(Path("job.sub"))
    jobs = yield schedd.query(constraint="JobStatus == 1")
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any, Sequence

from twisted.internet import defer

from gwms import classads
from gwms.protocols.client import Address, ClientSecurity, DaemonClient

SUBMIT_BATCH = 2000  # procs per SUBMIT frame, far below the frame limit


def _ad(**values: Any) -> classads.ClassAd:
    ad = classads.ClassAd()
    for k, v in values.items():
        if v is not None:
            ad[k] = v
    return ad


class ScheddClient:
    def __init__(self, reactor: Any, address: Address, security: ClientSecurity, connector: Any = None) -> None:
        self.reactor = reactor
        self.address = address
        self.client = DaemonClient(reactor, address, security, connector=connector)

    @defer.inlineCallbacks
    def submit_file(self, path: Path, iwd: Path | None = None) -> Any:
        """Queue the jobs of a submit description; fires with (cluster id, number of procs)."""
        from gwms.submit import parse_submit

        text = path.read_text()
        reply = yield self.client.call("NEW_CLUSTER", _ad(), "WRITE")
        cluster = int(reply["ClusterId"])
        result = parse_submit(text, filename=str(path), cluster_id=cluster, owner=getpass.getuser(),
                              iwd=(iwd or path.parent).resolve(), now=int(self.reactor.seconds()))
        count = yield self.submit(cluster, result.cluster_ad, result.proc_ads)
        return cluster, count

    @defer.inlineCallbacks
    def submit(self, cluster: int, cluster_ad: classads.ClassAd, proc_ads: Sequence[classads.ClassAd]) -> Any:
        """Queue procs of a cluster made with NEW_CLUSTER on this connection; fires with the count."""
        procs = list(proc_ads)
        first = True
        for start in range(0, max(len(procs), 1), SUBMIT_BATCH):
            batch = procs[start:start + SUBMIT_BATCH]
            final = start + SUBMIT_BATCH >= len(procs)
            ad = _ad(ClusterId=cluster, Procs=batch, Final=final)
            if first:
                ad["ClusterAd"] = cluster_ad
                first = False
            reply = yield self.client.call("SUBMIT", ad, "WRITE")
        return int(reply.get("Count", len(procs)))

    @defer.inlineCallbacks
    def new_cluster(self) -> Any:
        reply = yield self.client.call("NEW_CLUSTER", _ad(), "WRITE")
        return int(reply["ClusterId"])

    @defer.inlineCallbacks
    def query(self, constraint: str | None = None, projection: Sequence[str] = (), owner: str | None = None,
              history: bool = False, limit: int | None = None) -> Any:
        command = "QUERY_HISTORY" if history else "QUERY_JOBS"
        final, items = yield self.client.call(command, _ad(Constraint=constraint, Projection=",".join(projection) or None,
                                                           Owner=owner, Limit=limit), "READ", stream=True)
        return [classads.decode(raw) for raw in items]

    @defer.inlineCallbacks
    def summary(self, owner: str | None = None) -> Any:
        """Counts of the queue's jobs: an ad with Count, Idle, Running, Held."""
        final, _items = yield self.client.call("QUERY_JOBS", _ad(Summary=True, Owner=owner), "READ", stream=True)
        return final

    def act(self, action: str, job_ids: Sequence[str] = (), constraint: str | None = None,
            reason: str | None = None) -> defer.Deferred[Any]:
        """remove, hold or release jobs by id ("12.0", or "12" for a whole cluster) or constraint;
        fires with the reply ad (Count, Done, Refused, NotFound)."""
        ad = _ad(Action=action, Reason=reason)
        if job_ids:
            ad["JobIds"] = list(job_ids)
        else:
            ad["Constraint"] = constraint
        return self.client.call("ACT_ON_JOBS", ad, "WRITE")

    def close(self) -> None:
        self.client.close()


def default_schedd_address(config: Any) -> Address:
    """The local schedd: its UNIX socket (fs authentication) when configured, else its TCP address."""
    env = os.environ.get("GWMS_SCHEDD")
    if env:
        return Address.parse(env)
    settings = config.section("schedd")
    if settings["unix_socket"] is not None:
        return Address(path=str(settings["unix_socket"]))
    host, port = settings["listen"]
    return Address(host=host, port=port)
