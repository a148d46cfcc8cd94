"""Clicks under load: the saturation point of POST /flows/api/pin, by an open-loop generator
over raw keep-alive connections."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from bench.portal import generated_flow_ids, prepare, set_limits, wait_all_settled
from bench.report import Report, ms, pct
from bench.stack import Stack

# The open-loop rates tried, in order, until one misses the p99 target (requests/s).
RATES = [25, 50, 100, 150, 200, 300, 400, 600, 800, 1000, 1200, 1600, 2000, 2400]
P99_TARGET = 0.050
CLICK_PORTALS, CLICK_USERS_PER_PORTAL = 5, 80  # 400 people: 4 clicks/s each at 1,600/s
# The bench portals' REST limit while clicks are measured, on both sides (the sandbox's bucket
# and the app's limiter): ten times the default rate, the Enterprise burst — the workers
# converge as fast as they can be asked, instead of idling on the 2/s bucket.
CLICK_REST_RATE, CLICK_REST_BURST = 20.0, 250


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _exchange(host: str, port: int, conn: Conn | None, payload: bytes) -> tuple[Conn, int]:
    """One request and its whole answer on a keep-alive connection (opened when None);
    returns the connection to reuse and the answer's status."""
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


async def _open_loop_raw(
    host: str, port: int, build: Callable[[int], bytes], rate: float, seconds: float
) -> tuple[list[float], dict[int, int]]:
    """Send `build(i)` at `rate`/s over keep-alive connections (raw HTTP/1.1, one request in
    flight per connection); latency from each request's scheduled send time to its whole answer.

    asyncio over raw sockets costs the generator a few tens of microseconds a request, so the
    figure is the server's, not the client's (a `requests` session costs about a millisecond)."""
    total = int(rate * seconds)
    latencies: list[float] = [math.inf] * total
    statuses: dict[int, int] = {}
    idle: asyncio.Queue[Conn | None] = asyncio.Queue()
    for _ in range(256):
        idle.put_nowait(None)  # a connection slot, opened on first use
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2

    async def one(i: int) -> None:
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        conn = await idle.get()
        try:
            conn, status = await _exchange(host, port, conn, build(i))
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


def _click_people(stack: Stack, names: list[str]) -> list[tuple[str, list[int]]]:
    """80 people on each portal with the app open (page token, the flows they click); returns
    once the first opens' lists have landed."""
    from flows import snapshots

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
    return people


def _requests(
    host: str, people: list[tuple[str, list[int]]], first_turn: list[int]
) -> tuple[Callable[[int], bytes], Callable[[int], bytes]]:
    """The generator's two requests: GET /ping, and the i-th click (person i mod all, each
    turn the next flow, pinning and unpinning in turn, from `first_turn[0]` on)."""
    bare_request = f"GET /ping HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    def bare(i: int) -> bytes:
        return bare_request

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

    return bare, click


def _side_by_side(columns: list[list[list[str]]]) -> list[list[str]]:
    """The climbs' rows as one table: a row per rate, "p50 / p99" of each climb that got there."""
    rows = []
    for k in range(max(len(c) for c in columns)):
        cells = [c[k] if k < len(c) else ["", "", "", ""] for c in columns]
        rate = next(cell[0] for cell in cells if cell[0])
        rows.append([rate] + [f"{cell[1]} / {cell[2]}" if cell[1] else "" for cell in cells])
    return rows


INTENTS_HEADER = [
    "rate /s",
    "bare view p50 / p99 ms",
    "POST /flows/api/pin, workers paused",
    "POST /flows/api/pin, workers converging",
]


def bench_intents(stack: Stack, report: Report, seconds: float) -> None:
    """The saturation point of POST /flows/api/pin next to the bare view's, measured by the same
    generator: clicks from 400 people (80 on each of 5 portals), each under the per-user limit,
    as people are, while the workers converge what they ask."""
    names = stack.portal_names()[:CLICK_PORTALS]
    people = _click_people(stack, names)
    set_limits(stack, names, CLICK_REST_RATE, CLICK_REST_BURST)
    first_turn = [0]  # each climb clicks flows the previous one did not touch
    bare, click = _requests(stack.web_url.split("//", 1)[1], people, first_turn)
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
    ratio = click_rate / bare_rate if bare_rate else float("nan")
    report.add(
        "Clicks under load: the saturation point (open loop, p99 ≤ 50 ms)",
        INTENTS_HEADER,
        _side_by_side([bare_rows, alone_rows, click_rows]),
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
