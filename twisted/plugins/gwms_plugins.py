# One ServiceMaker per gwms role. twistd imports this file to list its subcommands: keep it to
# these lines (no reactor import, no work at import time).
from twisted.application.service import ServiceMaker

gwms_collector = ServiceMaker(
    "gwms collector", "gwms.collector.service", "The gwms collector: the pool's registry of ClassAds.",
    "gwms-collector")
