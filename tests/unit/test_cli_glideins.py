"""`gwms factory status` and `gwms frontend status` rows, from the ads they read."""

from __future__ import annotations

import io

from gwms import classads
from gwms.cli.glideins import FACTORY_COLUMNS, FRONTEND_COLUMNS, factory_rows, frontend_rows, table


def ad(**values):
    a = classads.ClassAd()
    for k, v in values.items():
        a[k] = v
    return a


ENTRY = ad(MyType="glidefactory", Name="A@f1", EntryName="A", FactoryName="f1", GLIDEIN_Site="SiteA",
           GlideinEnabled=True, GlideinMonitorTotalStatusIdle=3, GlideinMonitorTotalStatusRunning=5,
           GlideinMonitorTotalStatusHeld=1)
MONITORS = [ad(ReqEntry="A", ReqFactory="f1", ReqClientName=c, GlideinMonitorRequestedIdle=r,
               GlideinMonitorStatusIdle=i, GlideinMonitorStatusRunning=n, GlideinMonitorStatusHeld=h)
            for c, r, i, n, h in (("fe.main", 2, 2, 4, 1), ("fe.other", 1, 1, 1, 0))]
REQUESTS = [ad(ClientName="fe.main", ReqName="A@f1", MatchingIdleJobs=7, EffectiveIdleJobs=3.5, RunningJobs=4,
               ReqIdleGlideins=2, ReqMaxGlideins=6, ReqRemoveExcess="NO", FactoryIdleGlideins=2,
               PoolUnclaimedGlideins=0, CurbReason="ramp-up"),
            ad(ClientName="fe.other", ReqName="A@f1", MatchingIdleJobs=1, EffectiveIdleJobs=1.0, RunningJobs=1,
               ReqIdleGlideins=1, ReqMaxGlideins=2, ReqRemoveExcess="NO", PoolUnclaimedGlideins=0, CurbReason="")]


def test_factory_status_has_a_row_per_entry_and_per_frontend_with_matching_jobs():
    rows = factory_rows([ENTRY], MONITORS, REQUESTS)
    assert [(r["client"], r["matching_jobs"], r["requested"], r["idle"], r["running"], r["held"]) for r in rows] == [
        ("(all)", 8, 3, 3, 5, 1), ("fe.main", 7, 2, 2, 4, 1), ("fe.other", 1, 1, 1, 1, 0)]
    out = io.StringIO()
    table(rows, FACTORY_COLUMNS, out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["Entry", "Site", "Frontend", "Enabled", "IdleJobs", "ReqIdle", "Idle", "Running",
                                "Held"]
    assert lines[2].split() == ["A", "SiteA", "fe.main", "True", "7", "2", "2", "4", "1"]


def test_frontend_status_shows_requests_and_what_curbed_them_and_dashes_for_unreported_numbers():
    rows = frontend_rows(REQUESTS)
    assert [(r["group"], r["effective_idle_jobs"], r["req_idle"], r["curbed_by"]) for r in rows] == [
        ("fe.main", 3.5, 2, "ramp-up"), ("fe.other", 1.0, 1, "")]
    out = io.StringIO()
    table(rows, FRONTEND_COLUMNS, out)
    assert out.getvalue().splitlines()[2].split()[:10] == ["fe.other", "A@f1", "1", "1.0", "1", "1", "2", "-", "-",
                                                           "-"]
