"""The page: closed and open loops, and the page's latency next to the bare view's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.portal import prepare
from bench.report import Report, ms, pct
from bench.stack import Stack


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
