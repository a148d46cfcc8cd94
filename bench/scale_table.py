"""The scale section's shape (how many portals, flows, what latency, which pools) and its two
tables: the run against its ceilings, and what each pin and REST request cost."""

from __future__ import annotations

import os
from typing import Any

from bench.report import QUICK, ms, pct

SCALE_PORTALS = int(os.environ.get("BENCH_SCALE_PORTALS", 60 if QUICK else 200))
CLICK_PORTALS = int(os.environ.get("BENCH_SCALE_CLICK_PORTALS", 8))
FLOWS = 100
PREPINNED = 0.3
LATENCY_MS = 150
RATE, BURST = 2.0, 50
# pool:concurrency per worker process, and "+clicks": a third, dedicated click worker beside
# the two (which then take the other queues). BENCH_SCALE_POOLS="threads:8,gevent:32" picks.
POOLS = os.environ.get(
    "BENCH_SCALE_POOLS", "threads:8,threads:32,gevent:32,threads:32+clicks"
).split(",")
CLICK_WORKER_THREADS = 4
WORKERS = 2


SCALE_HEADER = [
    "pool (per process)",
    "flows pinned",
    "seconds",
    "pins/s",
    "REST req/s",
    "× buckets' ceiling",
    "× pool I/O ceiling",
    "calls in flight: peak / mean",
    "Pin all done: p50 / p99 s",
    "latency floor p50 s",
    "single click p99 ms: click → settled / answered → settled",
    "503s",
    "wrong final states",
]
COST_HEADER = [
    "pool (per process)",
    "REST requests",
    "worker CPU ms / request",
    "web / PostgreSQL and the rest / Redis / sandbox CPU ms / request",
    "CPU ms / request, all processes",
    "CPU ceiling req/s (2 cores)",
    "Redis commands / pin",
    "PostgreSQL transactions / pin",
    "rows written / pin",
    "Pin all POST p50 / p99 ms",
    "worker peak RSS MB",
]


def rows(label: str, concurrency: int, run: dict[str, Any]) -> tuple[list[str], list[str]]:
    """One pool's row of each table, from what `bench.scale` measured."""
    pins = SCALE_PORTALS * FLOWS
    seconds, requests = run["seconds"], run["requests"]
    rps = requests / seconds
    buckets = (SCALE_PORTALS + CLICK_PORTALS) * RATE  # the portals' sustained ceiling, req/s
    pool_ceiling = WORKERS * concurrency / (LATENCY_MS / 1000)
    done = list(run["completion"].values())
    floor = [n * LATENCY_MS / 1000 for n in run["bulk_requests"].values()]
    traffic, costs = run["traffic"], run["costs"]
    cpu_all = sum(costs.cpu.values())
    scale = [
        label,
        str(pins),
        f"{seconds:.1f}",
        f"{pins / seconds:.0f}",
        f"{rps:.0f}",
        f"{rps / buckets:.2f} (of {buckets:.0f})",
        f"{rps / pool_ceiling:.2f} (of {pool_ceiling:.0f})",
        f"{traffic['peak']} / {traffic['mean_in_flight']:.0f}",
        f"{pct(done, 50):.1f} / {pct(done, 99):.1f}",
        f"{pct(floor, 50):.2f}",
        f"{ms(pct([c[0] for c in run['clicks']], 99))} / "
        f"{ms(pct([c[0] - c[1] for c in run['clicks']], 99))} (n={len(run['clicks'])})",
        str(run["http_503"]),
        str(run["wrong"]),
    ]
    cost = [
        label,
        str(requests),
        f"{costs.cpu['worker'] * 1000 / requests:.1f}",
        " / ".join(
            f"{costs.cpu[role] * 1000 / requests:.1f}"
            for role in ("web", "postgres", "redis", "sandbox")
        ),
        f"{cpu_all * 1000 / requests:.1f}",
        f"{2 * requests / cpu_all:.0f}",
        f"{costs.redis_commands / pins:.1f}",
        f"{costs.pg['transactions'] / pins:.2f}",
        f"{costs.pg['rows_written'] / pins:.2f}",
        f"{ms(pct(run['pin_all_posts'], 50))} / {ms(pct(run['pin_all_posts'], 99))}",
        "",
    ]
    return scale, cost
