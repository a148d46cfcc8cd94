"""`make bench`: the benchmarks, on the real stack (sandbox, gunicorn, Celery, PostgreSQL,
Redis). Every figure comes with the ceiling or baseline measured in the same run.

Environment: BENCH_DATABASE_URL (default: database flowpins_bench on the local PostgreSQL,
created when missing), BENCH_REDIS_URL (default redis://127.0.0.1:6379/2, flushed), BENCH_QUICK=1
for a shorter run.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from bench.stack import Stack

QUICK = os.environ.get("BENCH_QUICK") == "1"
# BENCH_ONLY=fairness,slow_portal runs only the sections whose function names contain one of
# these words (for working on one figure); unset runs everything.
ONLY = [w for w in os.environ.get("BENCH_ONLY", "").split(",") if w]


def wanted(name: str) -> bool:
    return not ONLY or any(word in name for word in ONLY)


BATCH = 50


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class Report:
    def __init__(self) -> None:
        self.sections: list[tuple[str, list[str], list[list[str]], str]] = []

    def add(self, title: str, header: list[str], rows: list[list[str]], note: str = "") -> None:
        self.sections.append((title, header, rows, note))
        print(self.render_one(title, header, rows, note), flush=True)

    @staticmethod
    def render_one(title: str, header: list[str], rows: list[list[str]], note: str) -> str:
        lines = [
            f"\n### {title}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if note:
            lines += ["", note]
        return "\n".join(lines)

    def markdown(self) -> str:
        return "\n".join(self.render_one(*s) for s in self.sections)


# --- helpers over the app's own database ----------------------------------------------------


def setup_django(stack: Stack) -> None:
    os.environ.update(
        {
            k: v
            for k, v in stack.env.items()
            if k not in os.environ
            or k
            in {
                "DJANGO_SETTINGS_MODULE",
                "DATABASE_URL",
                "REDIS_URL",
                "DEBUG",
                "SECRET_KEY",
                "B24_TOKEN_KEY",
                "B24_OAUTH_SERVERS",
                "B24_APP_BASE_URL",
                "ALLOWED_HOSTS",
                "B24_ALLOW_HTTP",
            }
        }
    )
    import django

    django.setup()


def portal_pk(stack: Stack, name: str) -> int:
    from b24app.models import Portal

    return int(Portal.objects.get(member_id=stack.portal_state(name)["member_id"]).pk)


def wait_all_settled(seconds: float) -> float:
    """Wait until no pin intent is pending; returns when that happened (monotonic)."""
    from django.db import connection

    from flows.models import PinIntent

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not PinIntent.objects.filter(status=PinIntent.Status.PENDING).exists():
            return time.monotonic()
        connection.close()
        time.sleep(0.05)
    raise RuntimeError("pins did not settle in time")


def set_limits(stack: Stack, names: list[str], rate: float, burst: int) -> None:
    """The same bucket on both sides: the sandbox's and the app's shared limiter."""
    import redis

    from b24app.models import Portal

    for name in names:
        stack.sb("config", {"portal": name, "rate": rate, "burst": burst})
    Portal.objects.update(rate_per_second=rate, rate_burst=burst)
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    keys = list(client.scan_iter(match="fp:rl:*"))
    if keys:
        client.delete(*keys)


def prepare(stack: Stack, names: list[str], flows: int, users: list[int]) -> dict[str, Any]:
    """Install, generate flows, open the app for each user — with a generous bucket, so the
    set-up does not eat the budget the measurement starts with."""
    stack.reset()
    for name in names:
        stack.sb("config", {"portal": name, "rate": 1000, "burst": 5000})
        stack.install(name)
        if flows:
            stack.sb(
                f"p/{name}/flows",
                {"count": flows, "visible_to_all": True, "name_prefix": "Bench flow"},
            )
    tokens: dict[str, Any] = {}
    for name in names:
        for user in users:
            tokens[(name, user)] = stack.open_app(name, user)[0]
    time.sleep(0.3)  # let the sandbox's bucket drain at the generous rate
    return tokens


def generated_flow_ids(stack: Stack, name: str) -> list[int]:
    return sorted(
        f["id"] for f in stack.portal_state(name)["flows"] if f["name"].startswith("Bench flow")
    )


# --- 1. pins against the rate limit ---------------------------------------------------------


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
    plan: dict[tuple[str, int], list[int]] = {}
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
    set_limits(stack, names, rate, burst)
    before = {name: stack.portal_state(name)["counters"] for name in names}

    def click(key: tuple[str, int]) -> None:
        ids = plan[key]
        for start in range(0, len(ids), 500):
            response = stack.pin(tokens[key], ids[start : start + 500], True)
            if response.status_code != 202:
                raise RuntimeError(f"click answered {response.status_code}")

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        list(pool.map(click, plan))
    wait_all_settled(600)
    from django.db.models import Max

    from flows.models import PinIntent

    rows = []
    for name in names:
        pk = portal_pk(stack, name)
        last = PinIntent.objects.filter(portal_id=pk).aggregate(t=Max("updated_at"))["t"]
        first = PinIntent.objects.filter(portal_id=pk).order_by("created_at").first()
        assert last is not None and first is not None
        elapsed = max(0.001, (last - first.created_at).total_seconds())
        after = stack.portal_state(name)
        counters = after["counters"]
        pins = sum(len(plan[(name, u)]) for u, _ in per_user)
        wrong = sum(
            len(set(plan[(name, u)]) ^ set(after["pins"].get(str(u), []))) for u, _ in per_user
        )
        requests_made = counters["requests"] - before[name]["requests"]
        needed = sum(math.ceil(n / BATCH) for _, n in per_user)
        t_min = max(0.0, (needed - burst) / rate)
        ceiling = f"{pins / t_min:.0f}" if t_min else "∞ (fits the burst)"
        ratio = f"{t_min / elapsed:.2f}" if t_min else "n/a"
        rows.append(
            [
                name,
                str(pins),
                f"{elapsed:.2f}",
                f"{pins / elapsed:.0f}",
                f"{pins / elapsed / (BATCH * rate):.1f}",
                ceiling,
                ratio,
                str(requests_made),
                str(counters["http_503"] - before[name]["http_503"]),
                str(wrong),
            ]
        )
    report.add(
        title,
        [
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
        ],
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


# --- 2 and 3. the page and the intent endpoint ----------------------------------------------


def closed_loop(
    fn: Callable[[], int], requests_total: int, threads: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests_total))

    def run() -> None:
        session_latencies = []
        for _ in iter(lambda: next(counter, None), None):
            t0 = time.monotonic()
            status = fn()
            if status >= 400:
                raise RuntimeError(f"status {status}")
            session_latencies.append(time.monotonic() - t0)
        with lock:
            latencies.extend(session_latencies)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(run) for _ in range(threads)]:
            f.result()
    return requests_total / (time.monotonic() - started), latencies


def open_loop(fn: Callable[[int], int], rate: float, seconds: float) -> list[float]:
    """Send at a fixed rate regardless of answers; latency from the scheduled send time."""
    total = int(rate * seconds)
    latencies: list[float] = [0.0] * total
    start = time.monotonic() + 0.2

    def one(i: int) -> None:
        at = start + i / rate
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        status = fn(i)
        if status >= 400:
            raise RuntimeError(f"status {status}")
        latencies[i] = time.monotonic() - at

    with ThreadPoolExecutor(max_workers=64) as pool:
        for f in [pool.submit(one, i) for i in range(total)]:
            f.result()
    return latencies


PAGE_TARGET = 2.0  # the page's p50 over the bare view's, in the same run (issue 11)


def page_and_bare(
    stack: Stack,
) -> tuple[Callable[[], int], Callable[[], int], str, dict[str, str]]:
    """A portal whose user sees 200 flows, the page opened once (the snapshot is warm); returns
    two requests for closed loops — GET /ping, and the same verified app POST again — and that
    POST's URL and form."""
    name = stack.portal_names()[0]
    prepare(stack, [name], 0, [])
    stack.sb(f"p/{name}/flows", {"count": 190, "visible_to_all": True})
    _, launched = stack.open_app(name, 1)
    url = launched["url"].replace(stack.env["B24_APP_BASE_URL"], stack.web_url)
    form = launched["form"]
    sessions = threading.local()

    def session() -> requests.Session:
        if not hasattr(sessions, "s"):
            sessions.s = requests.Session()
        return sessions.s  # type: ignore[no-any-return]

    def bare() -> int:
        return session().get(f"{stack.web_url}/ping", timeout=10).status_code

    def page() -> int:
        return session().post(url, data=form, timeout=10).status_code

    return bare, page, url, form


def bench_page(stack: Stack, report: Report, renders: int) -> None:
    bare, page, _, _ = page_and_bare(stack)
    name = stack.portal_names()[0]
    flows_shown = len(stack.portal_state(name)["flows"])

    closed_loop(bare, 50, 4)
    closed_loop(page, 20, 4)  # warm-up
    before = stack.portal_state(name)["counters"]["requests"]
    bare_rps, bare_lat = closed_loop(bare, renders, 4)
    page_rps, page_lat = closed_loop(page, renders, 4)
    rest = stack.portal_state(name)["counters"]["requests"] - before
    report.add(
        f"The page: /b24/app/ with {flows_shown} flows from a warm snapshot",
        ["view", "requests/s", "p50 ms", "p99 ms", "p50 vs bare", "REST calls per render"],
        [
            [
                "bare Django view (/ping)",
                f"{bare_rps:.0f}",
                ms(pct(bare_lat, 50)),
                ms(pct(bare_lat, 99)),
                "1.00",
                "0",
            ],
            [
                "/b24/app/ (verified POST)",
                f"{page_rps:.0f}",
                ms(pct(page_lat, 50)),
                ms(pct(page_lat, 99)),
                f"{pct(page_lat, 50) / pct(bare_lat, 50):.2f}",
                f"{rest / renders:.3f}",
            ],
        ],
        f"{renders} requests each, 4 client threads, same gunicorn (2 workers × 8 threads). "
        f"Target: the page's p50 at most {PAGE_TARGET:.0f}× the bare view's.",
    )


# The open-loop rates tried, in order, until one misses the p99 target (requests/s).
RATES = [25, 50, 100, 150, 200, 300, 400, 600, 800, 1000, 1200, 1600, 2000, 2400]
P99_TARGET = 0.050
CLICK_PORTALS, CLICK_USERS_PER_PORTAL = 5, 80  # 400 people: 4 clicks/s each at 1,600/s
# The bench portals' REST limit while clicks are measured, on both sides (the sandbox's bucket
# and the app's limiter): ten times the default rate, the Enterprise burst — the workers
# converge as fast as they can be asked, instead of idling on the 2/s bucket.
CLICK_REST_RATE, CLICK_REST_BURST = 20.0, 250


async def _open_loop_raw(
    host: str, port: int, build: Callable[[int], bytes], rate: float, seconds: float
) -> tuple[list[float], dict[int, int]]:
    """Send `build(i)` at `rate`/s over keep-alive connections (raw HTTP/1.1, one request in
    flight per connection); latency from each request's scheduled send time to its whole answer.

    asyncio over raw sockets costs the generator a few tens of microseconds a request, so the
    figure is the server's, not the client's (a `requests` session costs about a millisecond)."""
    import asyncio

    total = int(rate * seconds)
    latencies: list[float] = [math.inf] * total
    statuses: dict[int, int] = {}
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.Queue()
    for _ in range(256):
        idle.put_nowait(None)  # a connection slot, opened on first use
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2

    async def exchange(
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, payload: bytes
    ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], int]:
        for attempt in (1, 2):  # a keep-alive connection the server closed: open a new one
            if conn is None:
                conn = await asyncio.open_connection(host, port)
            reader, writer = conn
            try:
                writer.write(payload)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                return conn, status
            except (OSError, asyncio.IncompleteReadError):
                writer.close()
                conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def one(i: int) -> None:
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        conn = await idle.get()
        try:
            conn, status = await exchange(conn, build(i))
        except (OSError, asyncio.IncompleteReadError):
            conn, status = None, 599
        idle.put_nowait(conn)
        latencies[i] = loop.time() - at
        statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(one(i) for i in range(total)))
    while not idle.empty():
        conn = idle.get_nowait()
        if conn is not None:
            conn[1].close()
    return latencies, statuses


def saturation(
    stack: Stack, build: Callable[[int], bytes], seconds: float, ok: int
) -> tuple[float, list[list[str]]]:
    """Step the open-loop rate up until p99 passes the target (or answers are refused);
    returns the highest rate that held, and a row per step."""
    import asyncio

    port = int(stack.web_url.rsplit(":", 1)[1])
    held, rows = 0.0, []
    for rate in RATES:
        lat, statuses = asyncio.run(_open_loop_raw("127.0.0.1", port, build, rate, seconds))
        p99 = pct(lat, 99)
        wrong = sum(n for status, n in statuses.items() if status != ok)
        rows.append([f"{rate}", ms(pct(lat, 50)), ms(p99), str(wrong)])
        if p99 > P99_TARGET or wrong:
            break
        held = float(rate)
        time.sleep(1.0)
    return held, rows


def _open_quickly(stack: Stack, name: str, user_id: int) -> str:
    """Open the app as a user without waiting for the list (only the page token is needed)."""
    response = stack._post_frame(stack.sb(f"p/{name}/launch", {"user_id": user_id}))
    match = re.search(r'data-token="([^"]+)"', response.text)
    if response.status_code != 200 or not match:
        raise RuntimeError(f"open app on {name} failed: {response.status_code}")
    return match.group(1)


def bench_intents(stack: Stack, report: Report, seconds: float) -> None:
    """The saturation point of POST /flows/api/pin next to the bare view's, measured by the same
    generator: clicks from 400 people (80 on each of 5 portals), each under the per-user limit,
    as people are, while the workers converge what they ask."""
    from flows import snapshots

    names = stack.portal_names()[:CLICK_PORTALS]
    prepare(stack, names, 40, [1])  # installs; one open per portal teaches the app its flows
    people: list[tuple[str, list[int]]] = []
    for name in names:
        added = stack.sb(f"p/{name}/users", {"count": CLICK_USERS_PER_PORTAL - 1})["users"]
        with ThreadPoolExecutor(max_workers=6) as pool:
            tokens = list(pool.map(lambda u, n=name: _open_quickly(stack, n, u), [1, *added]))
        ids = generated_flow_ids(stack, name)
        people += [(token, ids) for token in tokens]
    deadline = time.monotonic() + 300
    while snapshots.pending_refreshes() and time.monotonic() < deadline:  # the first opens' lists
        time.sleep(0.5)
    set_limits(stack, names, CLICK_REST_RATE, CLICK_REST_BURST)
    host = stack.web_url.split("//", 1)[1]
    bare_request = f"GET /ping HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    def bare(i: int) -> bytes:
        return bare_request

    first_turn = [0]  # each climb clicks flows the previous one did not touch

    def click(i: int) -> bytes:
        token, ids = people[i % len(people)]
        turn = first_turn[0] + i // len(people)
        body = (
            f'{{"flow_id":{ids[turn % len(ids)]},"pinned":{"true" if turn % 2 == 0 else "false"}}}'
        )
        return (
            f"POST /flows/api/pin HTTP/1.1\r\nHost: {host}\r\nX-Flowpins-Token: {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        ).encode()

    import asyncio

    port = int(stack.web_url.rsplit(":", 1)[1])
    asyncio.run(_open_loop_raw("127.0.0.1", port, bare, 200, 1))  # warm-up
    bare_rate, bare_rows = saturation(stack, bare, seconds, 200)
    # The endpoint alone: the workers are paused, so the clicks' runs wait in the queue.
    stack.pause_workers()
    try:
        alone_rate, alone_rows = saturation(stack, click, seconds, 202)
    finally:
        stack.resume_workers()
    wait_all_settled(600)
    first_turn[0] = 20
    rest_before = sum(stack.portal_state(n)["counters"]["requests"] for n in names)
    click_rate, click_rows = saturation(stack, click, seconds, 202)
    sent = sum(int(r[0]) for r in click_rows) * seconds
    settle_started = time.monotonic()
    settled = wait_all_settled(600) - settle_started
    rest = sum(stack.portal_state(n)["counters"]["requests"] for n in names) - rest_before
    columns = [bare_rows, alone_rows, click_rows]
    rows = []
    for k in range(max(len(c) for c in columns)):
        cells = [c[k] if k < len(c) else ["", "", "", ""] for c in columns]
        rate = next(cell[0] for cell in cells if cell[0])
        rows.append([rate] + [f"{cell[1]} / {cell[2]}" if cell[1] else "" for cell in cells])
    ratio = click_rate / bare_rate if bare_rate else float("nan")
    report.add(
        "Clicks under load: the saturation point (open loop, p99 ≤ 50 ms)",
        [
            "rate /s",
            "bare view p50 / p99 ms",
            "POST /flows/api/pin, workers paused",
            "POST /flows/api/pin, workers converging",
        ],
        rows,
        f"**Saturation: bare view {bare_rate:.0f}/s; POST /flows/api/pin {alone_rate:.0f}/s "
        f"alone, {click_rate:.0f}/s while the workers converge every click (ratio to bare "
        f"{ratio:.2f})** — targets: ≥ 300 clicks/s and ≥ 0.50 of the bare view. "
        f"Each step {seconds:g} s; a step whose p99 passes 50 ms (or with any other answer than "
        f"200/202) ends the climb. One asyncio generator over raw keep-alive connections. "
        f"{len(people)} people on {len(names)} portals (each under the per-user limit); REST "
        f"limit {CLICK_REST_RATE:g}/s, burst {CLICK_REST_BURST} per portal; with the workers "
        f"running, {sent:.0f} clicks took {rest} REST requests and settled {settled:.1f} s "
        f"after the last step. See the README for the CPU each click costs.",
    )


# --- one noisy user, and one slow portal -----------------------------------------------------


def _click_to_settled(stack: Stack, token: str, user: int, fid: int, desired: bool) -> float:
    from django.db import connection

    from flows.models import PinIntent

    t0 = time.monotonic()
    if stack.pin(token, [fid], desired).status_code != 202:
        raise RuntimeError("a click was refused")
    while True:
        intent = PinIntent.objects.filter(user_id=user, flow_id=fid).first()
        connection.close()
        if intent and intent.status != PinIntent.Status.PENDING:
            return time.monotonic() - t0
        if time.monotonic() - t0 > 120:
            raise RuntimeError("a click did not settle")
        time.sleep(0.01)


def bench_fairness(stack: Stack, report: Report, flows: int, passes: int) -> None:
    """User A pins all, unpins all, pins all … over `flows` flows at the real limit (2/s, burst
    50), each pass after the last settled, so A keeps the bucket busy well past its burst;
    meanwhile user B, on the same portal, clicks single flows. B must not wait behind A."""
    name = stack.portal_names()[0]
    tokens = prepare(stack, [name], flows + 10, [1, 2])
    ids = generated_flow_ids(stack, name)
    a_ids, b_ids = ids[:flows], ids[flows:]
    set_limits(stack, [name], 2, 50)
    before = stack.portal_state(name)["counters"]
    noisy_done = threading.Event()
    noisy_seconds: list[float] = []

    def noisy() -> None:
        t0 = time.monotonic()
        for p in range(passes):
            for start in range(0, len(a_ids), 500):
                stack.pin(tokens[(name, 1)], a_ids[start : start + 500], p % 2 == 0)
            wait_all_settled(900)
        noisy_seconds.append(time.monotonic() - t0)
        noisy_done.set()

    thread = threading.Thread(target=noisy)
    thread.start()
    time.sleep(2)  # A's burst is being spent: the bucket is the limit from here on
    latencies = []
    i = 0
    while not noisy_done.is_set():
        latencies.append(
            _click_to_settled(stack, tokens[(name, 2)], 2, b_ids[i % len(b_ids)], i % 2 == 0)
        )
        i += 1
        time.sleep(1.5)
    thread.join()
    after = stack.portal_state(name)["counters"]
    limit_503 = after["errors"].get("QUERY_LIMIT_EXCEEDED", 0) - before["errors"].get(
        "QUERY_LIMIT_EXCEEDED", 0
    )
    report.add(
        "Fair share: one user's Pin all / Unpin all passes vs a colleague's single clicks "
        "(2/s, burst 50)",
        [
            "A's toggles",
            "A's seconds",
            "B's clicks during A's work",
            "B click→pinned p50 ms",
            "B p99 ms",
            "target p99",
            "REST requests",
            "503s",
        ],
        [
            [
                str(passes * flows),
                f"{noisy_seconds[0]:.1f}",
                str(len(latencies)),
                ms(pct(latencies, 50)),
                ms(pct(latencies, 99)),
                "≤ 3000",
                str(after["requests"] - before["requests"]),
                str(limit_503),
            ]
        ],
        "Bulk rounds leave 5 slots of the bucket to interactive ones, so B's click never waits "
        "for A's batches; a one-request-per-pin client would put B behind A's "
        "passes × flows / 2 seconds of requests.",
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


def bench_slow_portal(stack: Stack, report: Report, seconds: float) -> None:
    """Twelve users of one portal open the app cold, once a second each; the page latency of
    another portal is measured while that portal answers normally, then while it answers every
    REST call in 10 s. A web request that waited on the portal would hold a server thread for
    10 s per open and starve the other tenant; ours render at once either way."""
    import redis

    other, busy = stack.portal_names()[:2]
    prepare(stack, [other, busy], 0, [])
    _, other_launch = stack.open_app(other, 2)
    other_url = other_launch["url"].replace(stack.env["B24_APP_BASE_URL"], stack.web_url)
    busy_launches = [stack.sb(f"p/{busy}/launch", {"user_id": u}) for u in (1, 2, 3, 5, 6)]
    broker = redis.Redis.from_url(stack.env["REDIS_URL"])

    def other_page() -> int:
        return requests.post(other_url, data=other_launch["form"], timeout=60).status_code

    def measure(latency_ms: int | None) -> tuple[list[float], list[float]]:
        if latency_ms is None:
            return closed_loop(other_page, 100, 2)[1], []
        stack.sb("config", {"portal": busy, "latency_ms": latency_ms})
        stop = threading.Event()
        opens: list[float] = []

        def user(i: int) -> None:
            launched = busy_launches[i % len(busy_launches)]
            url = launched["url"].replace(stack.env["B24_APP_BASE_URL"], stack.web_url)
            while not stop.is_set():
                broker.delete(*(broker.scan_iter(match="fp:snap:*")), "fp:none")  # cold
                t0 = time.monotonic()
                requests.post(url, data=launched["form"], timeout=60)
                opens.append(time.monotonic() - t0)
                stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))

        users = [threading.Thread(target=user, args=(i,)) for i in range(12)]
        for t in users:
            t.start()
        time.sleep(1)
        measured: list[float] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            measured.extend(closed_loop(other_page, 10, 2)[1])
        stop.set()
        for t in users:
            t.join()
        stack.sb("config", {"portal": busy, "latency_ms": 0})
        return measured, opens

    closed_loop(other_page, 20, 2)
    quiet, _ = measure(None)
    normal, normal_opens = measure(0)
    slow, slow_opens = measure(10_000)

    def row(label: str, lat: list[float], opens: list[float]) -> list[str]:
        return [
            label,
            ms(pct(lat, 50)),
            ms(pct(lat, 99)),
            f"{pct(lat, 99) / pct(normal, 99):.2f}" if normal else "",
            ms(pct(opens, 50)) if opens else "",
            ms(pct(opens, 99)) if opens else "",
        ]

    report.add(
        "A slow portal (every REST call 10 s): another portal's page latency",
        [
            "while the busy portal …",
            "other page p50 ms",
            "other page p99 ms",
            "p99 vs normal",
            "busy portal's cold opens p50 ms",
            "p99 ms",
        ],
        [
            row("is quiet", quiet, []),
            row("answers normally (12 cold opens/s)", normal, normal_opens),
            row("answers in 10 s (12 cold opens/s)", slow, slow_opens),
        ],
        "No web request waits on a portal: a cold page renders a loading state at once and a "
        "worker fetches the list (one fetch per user in flight). Target: the last two rows alike.",
    )


# --- events ------------------------------------------------------------------------------------


def bench_events(stack: Stack, report: Report, count: int) -> None:
    """Bitrix24 does not retry events and de-prioritises slow handlers: answer fast."""
    from urllib.parse import urlencode

    name = stack.portal_names()[0]
    prepare(stack, [name], 0, [])
    result = stack.sb(f"p/{name}/event", {"event": "ONAPPUPDATE", "deliver": False})
    payload = result["deliveries"][0]["payload"]
    # No access token to vouch for it and a wrong application_token: refused.
    forged = {k: v for k, v in payload.items() if not k.startswith("auth[access_token")}
    forged["auth[application_token]"] = "forged-token"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    session = requests.Session()
    rows = []
    for label, body in (
        ("ONAPPUPDATE (verified, recorded, queued)", payload),
        ("forged event (refused)", forged),
    ):
        latencies = []
        for _ in range(count):
            t0 = time.monotonic()
            response = session.post(
                f"{stack.web_url}/b24/events/", data=urlencode(body), headers=headers, timeout=10
            )
            latencies.append(time.monotonic() - t0)
            expected = 200 if body is payload else 403
            if response.status_code != expected:
                raise RuntimeError(f"event answered {response.status_code}")
        rows.append([label, str(count), ms(pct(latencies, 50)), ms(pct(latencies, 99))])
    report.add(
        "Event handler latency",
        ["event", "requests", "p50 ms", "p99 ms"],
        rows,
        "Target: under 100 ms. Sequential requests to the same gunicorn.",
    )


# --- 4. refresh stampede ----------------------------------------------------------------------


def bench_stampede(stack: Stack, report: Report, tasks: int) -> None:
    from b24app.celery import app as celery_app
    from b24app.models import PortalUser

    name = stack.portal_names()[0]
    prepare(stack, [name], 0, [1])
    pk = portal_pk(stack, name)
    stack.start_worker("stampede", tasks, queue="stampede")
    try:
        stack.wait_worker("stampede")
        # Room for every call at once: this measures the refresh, not the bucket.
        set_limits(stack, [name], 100, 500)
        stack.sb(f"p/{name}/expire", {"user_id": 1})
        before = stack.portal_state(name)["counters"]
        for _ in range(tasks):
            celery_app.send_task(
                "flows.refresh_snapshot",
                kwargs={"portal_id": pk, "user_id": 1, "force": True},
                queue="stampede",
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counters = stack.portal_state(name)["counters"]
            # The sandbox counts a method call once it passed authentication: an answered list.
            listed = counters["calls"].get("tasks.flow.Flow.list", 0) - before["calls"].get(
                "tasks.flow.Flow.list", 0
            )
            if listed >= tasks:
                break
            time.sleep(0.2)
        expired = counters["errors"].get("expired_token", 0) - before["errors"].get(
            "expired_token", 0
        )
        user = PortalUser.objects.get(portal_id=pk, user_id=1)
        ok = listed
        report.add(
            f"Refresh stampede: {tasks} concurrent tasks on one expired token",
            [
                "tasks",
                "refresh calls",
                "failed refreshes",
                "tasks that listed their flows",
                "calls refused as expired",
                "user state",
            ],
            [
                [
                    str(tasks),
                    str(counters["refresh_ok"] - before["refresh_ok"]),
                    str(counters["refresh_failed"] - before["refresh_failed"]),
                    str(ok),
                    str(expired),
                    user.state,
                ]
            ],
            f"A Celery worker with {tasks} threads; the portal's limit raised so that only the "
            "refresh is measured. Targets: 1 refresh, 0 failures.",
        )
    finally:
        stack.stop_proc("stampede")


# --- main -------------------------------------------------------------------------------------


def _stop_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds into main()'s finally, which stops every process


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="flowpins-bench-"))
    stack = Stack(portals=5, workers=2, tmp=tmp)
    report = Report()
    print(f"Flow Pins benchmarks ({'quick' if QUICK else 'full'} run); logs in {tmp}", flush=True)
    try:
        stack.start()
        setup_django(stack)
        if wanted("bench_pins"):
            bench_pins(
                stack,
                report,
                title="Pins, scaled-down limit (10/s, burst 20): 200 pins on each of 5 portals",
                rate=10,
                burst=20,
                per_user=[(1, 200)],
                portals=5,
            )
        if wanted("bench_pins"):
            bench_pins(
                stack,
                report,
                title="Pins at the real default limit (2/s, burst 50): "
                "1,000 pins of one user, 5 portals",
                rate=2,
                burst=50,
                per_user=[(1, 1000)],
                portals=5,
            )
        if wanted("bench_pins"):
            bench_pins(
                stack,
                report,
                title="Pins at the real default limit: 200 pins each of 5 "
                "users, 30% pinned beforehand in Bitrix24, 5 portals",
                rate=2,
                burst=50,
                per_user=[(1, 200), (2, 200), (3, 200), (5, 200), (6, 200)],
                portals=5,
                prepin_ratio=0.3,
            )
        if wanted("bench_pins"):
            bench_pins(
                stack,
                report,
                title="Pins where the bucket is the limit (2/s, burst 50): "
                "4,000 pins of one user, 5 portals",
                rate=2,
                burst=50,
                per_user=[(1, 4000)],
                portals=5,
            )
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
        if wanted("bench_lossy"):
            bench_lossy(stack, report)
        if wanted("bench_slow_portal"):
            bench_slow_portal(stack, report, 5 if QUICK else 10)
        if wanted("bench_events"):
            bench_events(stack, report, 50 if QUICK else 200)
        if wanted("bench_stampede"):
            bench_stampede(stack, report, 50)
        report.add(
            "Memory: peak RSS",
            ["process", "MB"],
            [
                ["web (largest gunicorn process)", f"{stack.peak_rss_mb('web'):.0f}"],
                ["worker (one Celery process, 8 threads)", f"{stack.peak_rss_mb('worker1'):.0f}"],
            ],
        )
    finally:
        stack.stop()
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    written = out / ("partial.md" if ONLY else "latest.md")
    written.write_text(report.markdown() + "\n")
    print(f"\nwritten: bench/results/{written.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
