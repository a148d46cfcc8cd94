"""`make bench`: the benchmarks, on the real stack (sandbox, gunicorn, Celery, PostgreSQL,
Redis). Every figure comes with the ceiling or baseline measured in the same run.

Environment: BENCH_DATABASE_URL (default: database flowpins_bench on the local PostgreSQL,
created when missing), BENCH_REDIS_URL (default redis://127.0.0.1:6379/2, flushed), BENCH_QUICK=1
for a shorter run.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.clicks import bench_intents
from bench.page import bench_page
from bench.pins import bench_click_latency, bench_lossy, bench_one_call_per_pin, bench_pins
from bench.portal import setup_django
from bench.reads import bench_reads
from bench.report import ONLY, QUICK, Report, wanted
from bench.scale import bench_scale
from bench.stack import Stack
from bench.tenants import bench_events, bench_fairness, bench_slow_portal, bench_stampede


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds into main()'s finally, which stops every process


# The four runs of bench_pins, in order: each a table of the report (data).
PIN_RUNS: list[dict[str, Any]] = [
    dict(
        title="Pins, scaled-down limit (10/s, burst 20): 200 pins on each of 5 portals",
        rate=10,
        burst=20,
        per_user=[(1, 200)],
        portals=5,
    ),
    dict(
        title="Pins at the real default limit (2/s, burst 50): 1,000 pins of one user, 5 portals",
        rate=2,
        burst=50,
        per_user=[(1, 1000)],
        portals=5,
    ),
    dict(
        title="Pins at the real default limit: 200 pins each of 5 "
        "users, 30% pinned beforehand in Bitrix24, 5 portals",
        rate=2,
        burst=50,
        per_user=[(1, 200), (2, 200), (3, 200), (5, 200), (6, 200)],
        portals=5,
        prepin_ratio=0.3,
    ),
    dict(
        title="Pins where the bucket is the limit (2/s, burst 50): "
        "4,000 pins of one user, 5 portals",
        rate=2,
        burst=50,
        per_user=[(1, 4000)],
        portals=5,
    ),
]


def run_sections(stack: Stack, report: Report) -> None:
    """Every section BENCH_ONLY asks for (all when unset), at BENCH_QUICK's sizes or the full."""
    if wanted("bench_pins"):
        for run in PIN_RUNS:
            bench_pins(stack, report, **run)
    if wanted("bench_one_call_per_pin"):
        bench_one_call_per_pin(stack, report, 60 if QUICK else 110)
    if wanted("bench_click_latency"):
        bench_click_latency(stack, report, 10 if QUICK else 30)
    if wanted("bench_page"):
        bench_page(stack, report, 150 if QUICK else 400)
    if wanted("bench_intents"):
        bench_intents(stack, report, 2 if QUICK else 4)
    if wanted("bench_fairness"):
        bench_fairness(stack, report, 1000 if QUICK else 2000, 3)
    if wanted("bench_reads"):
        bench_reads(stack, report, [100] if QUICK else [100, 1000, 2000])
    if wanted("bench_lossy"):
        bench_lossy(stack, report)
    if wanted("bench_slow_portal"):
        bench_slow_portal(stack, report, 5 if QUICK else 10)
    if wanted("bench_events"):
        bench_events(stack, report, 50 if QUICK else 200)
    if wanted("bench_stampede"):
        bench_stampede(stack, report, 50)


def report_memory(stack: Stack, report: Report) -> None:
    report.add(
        "Memory: peak RSS",
        ["process", "MB"],
        [
            ["web (largest gunicorn process)", f"{stack.peak_rss_mb('web'):.0f}"],
            ["worker (one Celery process, 32 threads)", f"{stack.peak_rss_mb('worker1'):.0f}"],
        ],
    )


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="flowpins-bench-"))
    stack = Stack(portals=5, workers=2, tmp=tmp)
    report = Report()
    print(f"Flow Pins benchmarks ({'quick' if QUICK else 'full'} run); logs in {tmp}", flush=True)
    try:
        if not ONLY or not all("scale" in word for word in ONLY):
            stack.start()
            setup_django(stack)
            run_sections(stack, report)
            report_memory(stack, report)
    finally:
        stack.stop()
    if wanted("bench_scale"):  # its own stack of hundreds of portals
        bench_scale(report, tmp)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    written = out / ("partial.md" if ONLY else "latest.md")
    written.write_text(report.markdown() + "\n")
    print(f"\nwritten: bench/results/{written.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
