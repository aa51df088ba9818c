# One ServiceMaker per gwms role. twistd imports this file to list its subcommands: keep it to
# these lines (no reactor import, no work at import time).
from twisted.application.service import ServiceMaker

gwms_collector = ServiceMaker(
    "gwms collector", "gwms.collector.service", "The gwms collector: the pool's registry of ClassAds.",
    "gwms-collector")
gwms_startd = ServiceMaker(
    "gwms startd", "gwms.startd.service", "The gwms startd: slots, claims and a starter per job.", "gwms-startd")
gwms_schedd = ServiceMaker(
    "gwms schedd", "gwms.schedd.service", "The gwms schedd: the durable job queue and its shadows.", "gwms-schedd")
gwms_negotiator = ServiceMaker(
    "gwms negotiator", "gwms.negotiator.service", "The gwms negotiator: matchmaking and fair share.",
    "gwms-negotiator")
gwms_factory = ServiceMaker(
    "gwms factory", "gwms.factory.service", "The gwms glidein factory: entries, glidein submission, file serving.",
    "gwms-factory")
gwms_frontend = ServiceMaker(
    "gwms frontend", "gwms.frontend.service", "The gwms VO frontend: asks factories for glideins where jobs wait.",
    "gwms-frontend")
gwms_pool = ServiceMaker(
    "gwms pool", "gwms.pool", "A whole one-host pool in one process: collectors, negotiator, schedd, factory "
    "with local glideins, frontend.", "gwms-pool")
gwms_gcb = ServiceMaker(
    "gwms gcb", "gwms.gcb.broker", "The gwms connection broker: relays connections to daemons behind firewalls.",
    "gwms-gcb")
