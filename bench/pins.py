"""Pins against the rate limit: batched pins next to the bucket's ceiling and a one-request-per-pin
client, a single click's latency, and pins on a lossy network."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from bench.portal import generated_flow_ids, portal_pk, prepare, set_limits, wait_all_settled
from bench.report import QUICK, Report, ms, pct
from bench.stack import Stack

BATCH = 50


PIN_HEADER = [
    "portal",
    "pins",
    "seconds",
    "pins/s",
    "× sustained 50×rate",
    "bucket ceiling pins/s",
    "ratio to ceiling",
    "REST requests",
    "503s",
    "wrong final states",
]

Plan = dict[tuple[str, int], list[int]]


def _pin_plan(
    stack: Stack, names: list[str], per_user: list[tuple[int, int]], prepin_ratio: float
) -> Plan:
    """The generated flows each (portal, user) pins; a share of them pinned beforehand in
    Bitrix24 when `prepin_ratio` is set."""
    plan: Plan = {}
    for name in names:
        ids = generated_flow_ids(stack, name)
        offset = 0
        for user, count in per_user:
            plan[(name, user)] = ids[offset : offset + count]
            offset += count
            if prepin_ratio:
                stack.sb(
                    f"p/{name}/pins",
                    {
                        "user_id": user,
                        "pinned": True,
                        "flow_ids": plan[(name, user)][:: int(1 / prepin_ratio)],
                    },
                )
    return plan


def _click_all(stack: Stack, plan: Plan, tokens: dict[Any, str]) -> None:
    """Every user clicks Pin on all their flows at once (500 a request), then all settle."""

    def click(key: tuple[str, int]) -> None:
        ids = plan[key]
        for start in range(0, len(ids), 500):
            response = stack.pin(tokens[key], ids[start : start + 500], True)
            if response.status_code != 202:
                raise RuntimeError(f"click answered {response.status_code}")

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        list(pool.map(click, plan))
    wait_all_settled(600)


def _pin_row(
    stack: Stack,
    name: str,
    plan: Plan,
    per_user: list[tuple[int, int]],
    before: dict[str, Any],
    rate: float,
    burst: int,
) -> list[str]:
    """One portal's row: its pins' seconds (first intent to last answer) against the bucket."""
    from django.db.models import Max

    from flows.models import PinIntent

    pk = portal_pk(stack, name)
    last = PinIntent.objects.filter(portal_id=pk).aggregate(t=Max("updated_at"))["t"]
    first = PinIntent.objects.filter(portal_id=pk).order_by("created_at").first()
    assert last is not None and first is not None
    elapsed = max(0.001, (last - first.created_at).total_seconds())
    after = stack.portal_state(name)
    counters = after["counters"]
    pins = sum(len(plan[(name, u)]) for u, _ in per_user)
    wrong = sum(len(set(plan[(name, u)]) ^ set(after["pins"].get(str(u), []))) for u, _ in per_user)
    requests_made = counters["requests"] - before["requests"]
    needed = sum(math.ceil(n / BATCH) for _, n in per_user)
    t_min = max(0.0, (needed - burst) / rate)
    ceiling = f"{pins / t_min:.0f}" if t_min else "∞ (fits the burst)"
    ratio = f"{t_min / elapsed:.2f}" if t_min else "n/a"
    return [
        name,
        str(pins),
        f"{elapsed:.2f}",
        f"{pins / elapsed:.0f}",
        f"{pins / elapsed / (BATCH * rate):.1f}",
        ceiling,
        ratio,
        str(requests_made),
        str(counters["http_503"] - before["http_503"]),
        str(wrong),
    ]


def bench_pins(
    stack: Stack,
    report: Report,
    *,
    title: str,
    rate: float,
    burst: int,
    per_user: list[tuple[int, int]],
    portals: int,
    prepin_ratio: float = 0.0,
) -> None:
    names = stack.portal_names()[:portals]
    tokens = prepare(
        stack, names, max(n for _, n in per_user) * len(per_user), [u for u, _ in per_user]
    )
    plan = _pin_plan(stack, names, per_user, prepin_ratio)
    set_limits(stack, names, rate, burst)
    before = {name: stack.portal_state(name)["counters"] for name in names}
    _click_all(stack, plan, tokens)
    rows = [_pin_row(stack, name, plan, per_user, before[name], rate, burst) for name in names]
    report.add(
        title,
        PIN_HEADER,
        rows,
        f"Limit {rate:g} requests/s, burst {burst}; batches of {BATCH}; "
        f"{stack.workers} worker processes. 50×rate is the batched ceiling once the burst is "
        f"spent ({BATCH * rate:g} pins/s); within the burst more goes through. "
        "Bucket ceiling = pins / ((requests needed − burst) / "
        "rate): the fastest the bucket allows.",
    )


def bench_one_call_per_pin(stack: Stack, report: Report, count: int) -> float:
    """Baseline: the same pins, one `tasks.flow.Flow.pin` request each, paced by the same
    shared limiter (no 503s), at the real default limit."""
    from b24app import tokens
    from b24app.bitrix.errors import RateLimited
    from b24app.models import PortalUser

    name = stack.portal_names()[0]
    prepare(stack, [name], count, [2])
    set_limits(stack, [name], 2, 50)
    ids = generated_flow_ids(stack, name)[:count]
    user = PortalUser.objects.get(portal_id=portal_pk(stack, name), user_id=2)
    started = time.monotonic()
    for fid in ids:
        while True:
            try:
                tokens.call_with_user(
                    user,
                    lambda c, t, f=fid: c.call("tasks.flow.Flow.pin", {"flowId": f}, token=t),
                    max_wait=60,
                )
                break
            except RateLimited:  # the portal disagreed with our bucket: wait and send again
                time.sleep(0.5)
    elapsed = time.monotonic() - started
    counters = stack.portal_state(name)["counters"]
    report.add(
        "Baseline: one request per pin (real default limit 2/s, burst 50)",
        ["pins", "seconds", "pins/s", "503s"],
        [[str(count), f"{elapsed:.1f}", f"{count / elapsed:.2f}", str(counters["http_503"])]],
        "What every one-call-per-pin client is capped at: the bucket's request rate.",
    )
    return count / elapsed


def bench_click_latency(stack: Stack, report: Report, clicks: int) -> None:
    """A single click must still go out at once: click → the portal's answer recorded."""
    from django.db import connection

    from flows.models import PinIntent

    name = stack.portal_names()[0]
    tokens = prepare(stack, [name], 0, [2])
    set_limits(stack, [name], 2, 50)
    flows = [f["id"] for f in stack.portal_state(name)["flows"] if 2 in f["visible_to"]][:4]
    latencies = []
    direct = []
    for i in range(clicks):
        fid = flows[i % len(flows)]
        desired = (i // len(flows)) % 2 == 0
        t0 = time.monotonic()
        stack.pin(tokens[(name, 2)], [fid], desired)
        while True:
            intent = PinIntent.objects.filter(user_id=2, flow_id=fid).first()
            connection.close()
            if intent and intent.status != PinIntent.Status.PENDING:
                break
            time.sleep(0.005)
        latencies.append(time.monotonic() - t0)
        time.sleep(0.55)  # stay under 2 requests/s so the bucket is never the cause
    token = stack.sb(f"p/{name}/tokens", {"user_id": 2})["access_token"]
    endpoint = stack.portal_state(name)["client_endpoint"]
    for fid in flows * 2:
        t0 = time.monotonic()
        requests.post(
            endpoint + "tasks.flow.Flow.pin", json={"flowId": fid, "auth": token}, timeout=10
        )
        direct.append(time.monotonic() - t0)
        time.sleep(0.55)
    report.add(
        "Single click: click → pinned (ms)",
        ["clicks", "p50", "p99", "one direct REST call p50", "overhead p50"],
        [
            [
                str(clicks),
                ms(pct(latencies, 50)),
                ms(pct(latencies, 99)),
                ms(pct(direct, 50)),
                ms(pct(latencies, 50) - pct(direct, 50)),
            ]
        ],
        "Click POST, queue, worker, one pin call to the sandbox, answer recorded; polled "
        "every 5 ms.",
    )


def _lossy_run(stack: Stack, flows: int, ratio: float, seed: int, clicks: str) -> list[str]:
    """One user's pins on a portal that loses `ratio` of the pin answers (a batch's whole
    answer is lost whenever any of its commands' is), at the default limit, from a fresh
    bucket. Returns a table row: seconds to settle, requests, lost answers, wrong states."""
    from flows.models import PinIntent

    name = stack.portal_names()[0]
    tokens = prepare(stack, [name], flows, [1])
    ids = generated_flow_ids(stack, name)[:flows]
    stack.sb(f"p/{name}/pins", {"user_id": 1, "flow_ids": ids[::10], "pinned": True})
    set_limits(stack, [name], 2, 50)
    stack.sb("config", {"pin_drop_ratio": ratio, "seed": seed})
    before = stack.portal_state(name)["counters"]
    t0 = time.monotonic()
    if clicks == "one per row":
        for fid in ids:
            stack.pin(tokens[(name, 1)], [fid], True)
    else:  # Pin all: one request
        stack.pin(tokens[(name, 1)], ids, True)
    took = wait_all_settled(600) - t0
    stack.sb("config", {"pin_drop_ratio": 0.0})
    after = stack.portal_state(name)
    pinned = set(after["pins"].get("1", []))
    wrong = sum(1 for fid in ids if fid not in pinned) + sum(
        1 for i in PinIntent.objects.all() if i.status != "done" or i.observed is not True
    )
    return [
        f"{flows} flows, {clicks}",
        f"{ratio:.0%}",
        str(seed),
        f"{took:.1f}",
        str(after["counters"]["requests"] - before["requests"]),
        str(after["counters"]["dropped_responses"] - before["dropped_responses"]),
        str(wrong),
    ]


def bench_lossy(stack: Stack, report: Report) -> None:
    rows = [_lossy_run(stack, 4, 0.5, seed, "one per row") for seed in (1, 2, 4, 7, 9)]
    rows.append(["target", "50%", "", "≤ 20", "", "", "0"])
    seeds = (7,) if QUICK else (7, 11)
    rows += [_lossy_run(stack, 120, 0.2, seed, "Pin all") for seed in seeds]
    rows.append(["target", "20%", "", "≤ 30 (floor ≈ 33: see README)", "", "", "0"])
    report.add(
        "Lossy network: pins settle while answers are lost (2/s, burst 50; 1 in 10 flows "
        "pinned beforehand in Bitrix24)",
        ["scenario", "answers lost", "seed", "seconds", "REST requests", "lost", "wrong states"],
        rows,
        "Requests shrink after a lost answer (halving down to single toggles) and grow back "
        "while answered; a lost answer's flows wait out a 1 s quiet period while the others go "
        "on. The 20% row is bound by the bucket: see the README for the arithmetic.",
    )
