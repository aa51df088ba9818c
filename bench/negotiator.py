"""Negotiator benchmark: one full matchmaking cycle, pure code (no daemons, no network).

100,000 idle jobs in 200 autoclusters (20 submitters x 10 autoclusters: RequestCpus 1-4, varied
RequestMemory, Requirements naming one or two GLIDEIN_Site values or none, a few with a Rank)
against 10,000 unclaimed glidein slots (20 sites, each with its own slot shapes; 10%
partitionable).  Prints one JSON object.

    python bench/negotiator.py [--jobs 100000] [--autoclusters 10] [--submitters 20] [--slots 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gwms import classads
from gwms.negotiator.matchmaker import Matchmaker, ResourceRequest
from gwms.negotiator.priorities import Priorities

SITES = 20

# A glidein slot as the startd advertises it (with the private ClaimId the negotiator sees).
SLOT = ('[MyType = "Machine"; Name = "{name}"; Machine = "{machine}"; OpSys = "LINUX"; Arch = "X86_64"; '
        'State = "Unclaimed"; Activity = "Idle"; SlotType = "{slot_type}"; Cpus = {cpus}; Memory = {memory}; '
        'Disk = {disk}; TotalCpus = {cpus}; TotalMemory = {memory}; LoadAvg = 0.0; KeyboardIdle = 1000; '
        'Start = TARGET.RequestMemory <= MY.Memory && TARGET.RequestCpus <= MY.Cpus; Rank = 0; '
        'GLIDEIN_Site = "{site}"; GLIDEIN_Entry_Name = "{entry}"; GLIDEIN_Factory = "factory"; '
        'GLIDEIN_Name = "v1"; GLIDEIN_ClusterId = {i}; GLIDEIN_Max_Walltime = 172800; '
        'UidDomain = "example.org"; FileSystemDomain = "example.org"; StartdIpAddr = "<10.{a}.{b}.{c}:9618>"; '
        'ClaimId = "<10.{a}.{b}.{c}:9618>#1700000000#{i}#0123456789abcdef0123456789abcdef"]')


def site_name(s: int) -> str:
    return f"Site_{s:02d}"


def make_slots(n: int, rng: random.Random) -> list[classads.ClassAd]:
    # Each site's glideins come from two entries with one slot shape each (as glidein configs
    # give them): shapes vary across sites, not within an entry.
    shapes = {}
    for s in range(SITES):
        for e in range(2):
            cpus = (1, 2, 4, 8)[(s + e) % 4]
            shapes[(s, e)] = (cpus, cpus * (2048, 2500, 4096)[(s + 2 * e) % 3], cpus * 20_000_000)
    ads = []
    for i in range(n):
        site = rng.randrange(SITES)
        entry = rng.randrange(2)
        a, b, c = (i >> 16) & 255, (i >> 8) & 255, i & 255
        machine = f"wn{i}.{site_name(site).lower()}.example.org"
        if i % 10 == 0:  # partitionable: whole nodes of 8, 16 or 32 cores
            cpus = (8, 16, 32)[site % 3]
            memory, disk, slot_type = cpus * 2048, cpus * 20_000_000, "Partitionable"
            name = f"slot1@glidein_{i}@{machine}"
        else:
            cpus, memory, disk = shapes[(site, entry)]
            slot_type = "Static"
            name = f"slot1@glidein_{i}@{machine}"
        text = SLOT.format(name=name, machine=machine, slot_type=slot_type, cpus=cpus, memory=memory, disk=disk,
                           site=site_name(site), entry=f"entry_{site_name(site)}_{entry}", i=i, a=a, b=b, c=c)
        ads.append(classads.parse_new(text))
    rng.shuffle(ads)  # the collector's order is arbitrary
    return ads


def make_requests(jobs: int, submitters: int, per_submitter: int, rng: random.Random) -> list[ResourceRequest]:
    n = submitters * per_submitter
    counts = [jobs // n + (1 if k < jobs % n else 0) for k in range(n)]
    requests = []
    for k in range(n):
        user = k // per_submitter
        cpus = 1 + k % 4
        memory = cpus * (1024, 1500, 2000, 3000)[(k // 4) % 4]
        kind = k % 5
        common = ('TARGET.Arch == "X86_64" && TARGET.OpSys == "LINUX" && TARGET.Disk >= RequestDisk '
                  '&& TARGET.Memory >= RequestMemory && TARGET.Cpus >= RequestCpus')
        extra = ""
        if kind == 0:  # anywhere
            requirements = common
        elif kind in (1, 2):  # one site
            requirements = f'TARGET.GLIDEIN_Site == "{site_name(rng.randrange(SITES))}" && {common}'
        elif kind == 3:  # a list of sites, glideinWMS style
            sites = ",".join(site_name(s) for s in rng.sample(range(SITES), 3))
            requirements = f"stringListMember(TARGET.GLIDEIN_Site, DESIRED_Sites) && {common}"
            extra = f'DESIRED_Sites = "{sites}"; '
        else:  # anywhere, preferring big memory
            requirements = common
            extra = "Rank = TARGET.Memory; "
        text = (f'[MyType = "Job"; Owner = "user{user}"; Submitter = "user{user}@pool"; AutoClusterId = {k}; '
                f'RequestCpus = {cpus}; RequestMemory = {memory}; RequestDisk = {cpus * 1_000_000}; '
                f'{extra}Requirements = {requirements}; JobCount = {counts[k]}]')
        requests.append(ResourceRequest(schedd=f"schedd{user % 4}@submit.example.org", submitter=f"user{user}@pool",
                                        autocluster_id=k, job_ad=classads.parse_new(text), count=counts[k]))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--submitters", type=int, default=20)
    parser.add_argument("--autoclusters", type=int, default=10, help="per submitter")
    parser.add_argument("--slots", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    slots = make_slots(args.slots, rng)
    requests = make_requests(args.jobs, args.submitters, args.autoclusters, rng)
    priorities = Priorities(None)
    # Different histories, so that fair share has something to do.
    priorities.update({}, 0.0)
    priorities.update({f"user{u}@pool": float(10 * u) for u in range(args.submitters)}, 86400.0)

    started = time.perf_counter()
    matches, stats = Matchmaker(priorities).cycle(requests, slots, now=86400.0)
    wall = time.perf_counter() - started

    per_user: dict[str, float] = {}
    for m in matches:
        per_user[m.submitter] = per_user.get(m.submitter, 0.0) + m.request_cpus
    pslot_matches = sum(1 for m in matches if m.slot_ad.get("SlotType") == "Partitionable")
    print(json.dumps({
        "benchmark": "negotiator cycle",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "idle_jobs": sum(r.count for r in requests),
        "autoclusters": len(requests),
        "submitters": stats.submitters,
        "slots": stats.slots,
        "pool_cpus": sum(float(s["Cpus"]) for s in slots),
        "seconds": round(wall, 3),
        "matches": stats.matches,
        "matches_on_partitionable_slots": pslot_matches,
        "match_evaluations": stats.match_evaluations,
        "slot_groups": stats.slot_groups,
        "spins": stats.spins,
        "cpus_matched_best_and_worst_submitter": [per_user.get("user0@pool", 0.0),
                                                  per_user.get(f"user{args.submitters - 1}@pool", 0.0)],
    }, indent=1))


if __name__ == "__main__":
    main()
