"""Scale: hundreds of portals at real-world latency on two worker processes.

The sandbox serves SCALE_PORTALS portals and answers every REST call after 150 ms, as a portal
across the internet does. On each, one user clicks *Pin all* over 100 flows — 30 of them pinned
beforehand in Bitrix24, which the app does not know — all at about the same moment, while people
on a few other portals click single flows. The same run is measured for each worker pool in
POOLS (two worker processes, as in production); every figure is printed next to its ceilings.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.costs import Costs, settle_stats
from bench.portal import generated_flow_ids, portal_pk, setup_django
from bench.report import Report
from bench.scale_table import (
    BURST,
    CLICK_PORTALS,
    CLICK_WORKER_THREADS,
    COST_HEADER,
    FLOWS,
    LATENCY_MS,
    POOLS,
    PREPINNED,
    RATE,
    SCALE_HEADER,
    SCALE_PORTALS,
    WORKERS,
    rows,
)
from bench.stack import Stack

SETUP_THREADS = 12


@dataclass
class Portals:
    bulk: list[str]
    clickers: list[str]
    tokens: dict[str, str]
    ids: dict[str, list[int]]
    pks: dict[str, int] = field(default_factory=dict)


def _setup(stack: Stack) -> Portals:
    """Install every portal, give it FLOWS flows and open the app once as user 1 (the worker
    fetches the list), with a generous bucket and no latency, so the set-up spends nothing the
    measurement starts with."""
    names = stack.portal_names()
    stack.reset()
    stack.sb("config", {"rate": 1000, "burst": 5000, "latency_ms": 0})

    def one(name: str) -> tuple[str, str, list[int]]:
        stack.install(name)
        stack.sb(
            f"p/{name}/flows", {"count": FLOWS, "visible_to_all": True, "name_prefix": "Bench flow"}
        )
        return name, stack.open_app(name, 1)[0], generated_flow_ids(stack, name)

    with ThreadPoolExecutor(max_workers=SETUP_THREADS) as pool:
        opened = list(pool.map(one, names))
    portals = Portals(
        bulk=names[:SCALE_PORTALS],
        clickers=names[SCALE_PORTALS:],
        tokens={n: t for n, t, _ in opened},
        ids={n: ids for n, _, ids in opened},
    )
    portals.pks = {n: portal_pk(stack, n) for n in names}
    return portals


def _restart_workers(stack: Stack, pool: str, concurrency: int, click_worker: bool) -> None:
    """WORKERS processes taking every queue (clicks first) — or, with `click_worker`, every
    queue but the clicks, and a small worker for the clicks alone."""
    from b24app.queues import CLICKS_QUEUE, FLOWPINS_QUEUES

    if "clicks" in stack.procs and stack.procs["clicks"].alive():
        stack.stop_proc("clicks")
    queues = [q for q in FLOWPINS_QUEUES if q != CLICKS_QUEUE] if click_worker else None
    env = {}
    if pool == "gevent":
        # Every greenlet (a task) opens a connection of its own, and a persistent one would
        # outlive it: close each at the end of its task, or PostgreSQL runs out of connections.
        env["DATABASE_URL"] = stack.env["DATABASE_URL"] + "?conn_max_age=0"
    if click_worker:
        stack.start_worker("clicks", CLICK_WORKER_THREADS, queues=[CLICKS_QUEUE])
        stack.wait_worker("clicks", 60)
    stack.restart_workers(concurrency, pool=pool, queues=queues, seconds=60, **env)


def _fresh_start(stack: Stack, portals: Portals) -> None:
    """Every bulk portal back to 30% pinned (unknown to the app), no intents, empty buckets,
    then the real limit and latency."""
    import redis
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE flows_pinintent")
    connection.close()
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    for pattern in ("fp:rl:*", "fp:batch:*", "fp:failures:*", "fp:queued:*"):
        keys = list(client.scan_iter(match=pattern))
        if keys:
            client.delete(*keys)
    for name in portals.bulk + portals.clickers:
        ids = portals.ids[name]
        stack.sb(f"p/{name}/pins", {"user_id": 1, "pinned": False, "flow_ids": ids})
        if name in portals.bulk:
            chosen = ids[:: int(1 / PREPINNED)][: int(len(ids) * PREPINNED)]
            stack.sb(f"p/{name}/pins", {"user_id": 1, "pinned": True, "flow_ids": chosen})
    from b24app.models import Portal

    Portal.objects.update(rate_per_second=RATE, rate_burst=BURST)
    connection.close()
    stack.sb("config", {"rate": RATE, "burst": BURST, "latency_ms": LATENCY_MS})
    stack.sb("traffic", {})


def _settled(portal_id: int, flow_id: int, since: float) -> bool:
    """Whether the click has settled. The polling thread keeps its connection: a connection
    per poll would make PostgreSQL start a backend every few milliseconds, a load of its own."""
    from flows.models import PinIntent

    intent = PinIntent.objects.filter(portal_id=portal_id, user_id=1, flow_id=flow_id).first()
    return bool(
        intent
        and intent.status != PinIntent.Status.PENDING
        and intent.updated_at.timestamp() >= since
    )


def _clicker(
    stack: Stack,
    portals: Portals,
    name: str,
    stop: threading.Event,
    out: list[tuple[float, float]],
) -> None:
    """One person clicking one flow after another on their portal until the bulk work ends."""
    token, pk, ids = portals.tokens[name], portals.pks[name], portals.ids[name]
    turn = 0
    while not stop.is_set():
        fid, desired = ids[turn % len(ids)], (turn // len(ids)) % 2 == 0
        started = time.time()
        if stack.pin(token, [fid], desired).status_code != 202:
            raise RuntimeError("a single click was refused")
        answered = time.time() - started
        while not _settled(pk, fid, started):
            if time.time() - started > 120:
                raise RuntimeError("a single click did not settle")
            time.sleep(0.02)
        out.append((time.time() - started, answered))
        turn += 1
        time.sleep(0.25)
    from django.db import connection

    connection.close()


def _completions(portals: Portals, clicked: dict[str, float]) -> dict[str, float]:
    from django.db import connection
    from django.db.models import Max

    from flows.models import PinIntent

    last = dict(
        PinIntent.objects.filter(portal_id__in=[portals.pks[n] for n in portals.bulk])
        .values_list("portal_id")
        .annotate(t=Max("updated_at"))
    )
    connection.close()
    return {n: last[portals.pks[n]].timestamp() - clicked[n] for n in portals.bulk}


def _measure(stack: Stack, portals: Portals) -> dict[str, Any]:
    _fresh_start(stack, portals)
    before_counts = {n: c["counters"] for n, c in stack.sb("state")["portals"].items()}
    before = Costs.read(stack)
    stop, clicks = threading.Event(), []
    clickers = [
        threading.Thread(target=_clicker, args=(stack, portals, n, stop, clicks))
        for n in portals.clickers
    ]
    for thread in clickers:
        thread.start()
    time.sleep(1.0)  # the clicks' p99 is measured under the bulk work, and a while before it
    clicked: dict[str, float] = {}

    posts: list[float] = []

    def pin_all(name: str) -> None:
        clicked[name] = time.time()
        if stack.pin(portals.tokens[name], portals.ids[name], True).status_code != 202:
            raise RuntimeError("a Pin all was refused")
        posts.append(time.time() - clicked[name])

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(pin_all, portals.bulk))
    done_at = _wait_bulk(portals)
    stop.set()
    for thread in clickers:
        thread.join()
    traffic = stack.sb("traffic")
    settle_stats()
    costs = Costs.read(stack).since(before)
    after = stack.sb("state")["portals"]
    wrong = sum(set(after[n]["pins"].get("1", [])) != set(portals.ids[n]) for n in portals.bulk)
    requests_by_portal = {
        n: after[n]["counters"]["requests"] - before_counts[n]["requests"] for n in portals.bulk
    }
    return {
        "seconds": done_at - t0,
        "completion": _completions(portals, clicked),
        "clicks": clicks,
        "traffic": traffic,
        "costs": costs,
        "requests": sum(
            a["counters"]["requests"] - before_counts[n]["requests"] for n, a in after.items()
        ),
        "bulk_requests": requests_by_portal,
        "http_503": sum(
            a["counters"]["http_503"] - before_counts[n]["http_503"] for n, a in after.items()
        ),
        "wrong": wrong,
        "pin_all_posts": posts,
    }


def _wait_bulk(portals: Portals) -> float:
    from django.db import connection

    from flows.models import PinIntent

    bulk = [portals.pks[n] for n in portals.bulk]
    deadline = time.time() + 900
    while time.time() < deadline:
        pending = PinIntent.objects.filter(
            portal_id__in=bulk, status=PinIntent.Status.PENDING
        ).exists()
        if not pending:
            connection.close()
            return time.time()
        time.sleep(0.05)
    raise RuntimeError("the Pin all runs did not settle in time")


def bench_scale(report: Report, tmp: Any) -> None:
    """Its own stack: SCALE_PORTALS + CLICK_PORTALS portals, measured once per pool."""
    keys = {k: os.environ[k] for k in ("SECRET_KEY", "B24_TOKEN_KEY") if k in os.environ}
    stack = Stack(portals=SCALE_PORTALS + CLICK_PORTALS, workers=WORKERS, tmp=tmp, keys=keys)
    scale_rows, cost_rows = [], []
    try:
        from django.apps import apps

        if apps.ready:  # the database is made afresh: let go of the other stack's connection
            from django.db import connection

            connection.close()
        stack.start()

        if not apps.ready:
            setup_django(stack)
        portals = _setup(stack)
        for variant in POOLS:
            shape, _, extra = variant.partition("+")
            pool, size = shape.split(":")
            concurrency = int(size)
            label = f"{pool} × {concurrency}" + (
                f" + a click worker (threads × {CLICK_WORKER_THREADS})" if extra else ""
            )
            _restart_workers(stack, pool, concurrency, click_worker=bool(extra))
            print(f"scale: {label} ...", flush=True)
            scale, cost = rows(label, concurrency, _measure(stack, portals))
            cost[-1] = f"{max(stack.peak_rss_mb(f'worker{n + 1}') for n in range(WORKERS)):.0f}"
            print(" | ".join(scale), "\n", " | ".join(cost), flush=True)  # before any later fails
            scale_rows.append(scale)
            cost_rows.append(cost)
    finally:
        stack.stop()
    where = (
        f"{SCALE_PORTALS} portals, every REST call {LATENCY_MS} ms, limit {RATE:.0f}/s burst "
        f"{BURST}; {WORKERS} worker processes"
    )
    report.add(
        f"Scale: Pin all over {FLOWS} flows on each of {SCALE_PORTALS} portals at once "
        f"({PREPINNED:.0%} pinned beforehand), single clicks on {CLICK_PORTALS} other portals",
        SCALE_HEADER,
        scale_rows,
        f"{where}. Buckets' ceiling: every portal's sustained rate added up (the bursts let a "
        "short job beat it). Pool I/O ceiling: calls the pools can hold at once ÷ latency. "
        "Latency floor: a portal's requests × latency (one run per user at a time). "
        "Calls in flight as the sandbox served them, over all portals.",
    )
    report.add(
        "Scale: what each pin and REST request costs",
        COST_HEADER,
        cost_rows,
        "CPU per REST request: each role's processes; PostgreSQL and the rest is the machine's "
        "CPU less the load generator and the roles counted (PostgreSQL's backends come and "
        "go), so it holds the kernel's work too. The CPU ceiling is this machine's 2 cores ÷ "
        "the total. Redis commands include the Celery broker's; PostgreSQL transactions are "
        "statements outside atomic blocks plus atomic blocks.",
    )
