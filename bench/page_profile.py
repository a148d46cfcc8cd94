"""`python -m bench.page_profile`: where a warm page render's time goes, next to /ping's.

On the bench's stack (sandbox, gunicorn 2×8, a worker, PostgreSQL, Redis) with the page
section's set-up (200 flows, a warm snapshot), it prints:

1. CPU per request of each process group (gunicorn, PostgreSQL's backends of the bench
   database, redis-server, this client) while the bench's closed loop (4 threads) runs;
2. CPU per request of the same requests run in this process through Django's WSGI handler,
   and of the page's steps inside it (each step's own CPU, nested steps included in theirs).

Same environment as `python -m bench` (BENCH_DATABASE_URL, BENCH_REDIS_URL). Figures are
CPU time, so other load on the machine moves them less than latencies; compare ratios within
one run.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests

from bench.page import closed_loop, page_and_bare
from bench.portal import setup_django
from bench.report import pct
from bench.stack import Stack

TICK = os.sysconf("SC_CLK_TCK")
# The page's steps, timed inside the WSGI handler: module, function.
STEPS = [
    ("b24app.frame", "verify_frame_post"),
    ("b24app.frame", "vouch_for_token"),
    ("b24app.frame", "stored_portal_and_user"),
    ("b24app.views", "_store_frame_tokens"),
    ("flows.page", "app_page"),
    ("flows.snapshots", "status"),
    ("flows.page", "sorted_rows"),
    ("flows.page", "_shell"),
    ("flows.page", "_fill"),
    ("flows.page", "page_token"),
    ("flows.tasks", "request_snapshot_refresh"),
]


def _cpu_by_group(web_pgid: int, database: str) -> dict[str, float]:
    found: dict[str, float] = collections.defaultdict(float)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_text().replace("\0", " ")
            pgid = os.getpgid(int(entry))
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        if pgid == web_pgid:
            found["gunicorn"] += cpu
        elif "postgres" in cmd and database in cmd:
            found["postgres"] += cpu
        elif "redis-server" in cmd:
            found["redis-server (all)"] += cpu
    return found


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="flowpins-page-profile-"))
    stack = Stack(portals=2, workers=1, tmp=tmp)
    try:
        stack.start()
        setup_django(stack)
        bare, page, url, form = page_and_bare(stack)
        print(f"page: {len(requests.post(url, data=form, timeout=10).content)} bytes")
        closed_loop(bare, 50, 4)
        closed_loop(page, 50, 4)
        database = stack.env["DATABASE_URL"].rsplit("/", 1)[1]
        n = 600
        print("\nCPU ms per request over gunicorn (closed loop, 4 client threads):")
        for label, call in (("ping", bare), ("page", page)) * 2:
            before, mine = _cpu_by_group(stack.procs["web"].pid, database), _self_cpu()
            rps, latencies = closed_loop(call, n, 4)
            after, mine = _cpu_by_group(stack.procs["web"].pid, database), _self_cpu() - mine
            groups = ", ".join(
                f"{k} {(after[k] - before[k]) / n * 1000:.2f}" for k in sorted(after)
            )
            print(
                f"  {label}: {rps:.0f}/s, p50 {pct(latencies, 50) * 1000:.1f} ms; "
                f"{groups}, client {mine / n * 1000:.2f}"
            )
        _in_process(url, form)
    finally:
        stack.stop()


def _in_process(url: str, form: dict[str, Any]) -> None:
    import importlib

    from django.core.handlers.wsgi import WSGIHandler

    handler = WSGIHandler()
    parts = urlsplit(url)
    body = urlencode(form).encode()

    def call(path: str, method: str = "GET", data: bytes = b"", query: str = "") -> None:
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "HTTP_HOST": "127.0.0.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(data),
            "wsgi.errors": sys.stderr,
            "CONTENT_TYPE": "application/x-www-form-urlencoded",
            "CONTENT_LENGTH": str(len(data)),
        }
        answer = handler(environ, lambda status, headers: None)
        b"".join(answer)
        answer.close()  # type: ignore[attr-defined]

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(module: Any, attr: str) -> None:
        original = getattr(module, attr)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent[f"{module.__name__}.{attr}"] += time.process_time() - started

        setattr(module, attr, wrapper)

    def run(label: str, once: Callable[[], None], n: int = 2000) -> None:
        once()
        spent.clear()
        started = time.process_time()
        for _ in range(n):
            once()
        print(f"  {label}: {(time.process_time() - started) / n * 1000:.3f} ms")
        for step, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"      {step:40s} {seconds / n * 1000:.3f} ms")

    for module_name, attr in STEPS:
        timed(importlib.import_module(module_name), attr)
    print("\nCPU ms per request in this process (Django's WSGI handler, no HTTP):")
    for _ in range(2):
        run("ping", lambda: call("/ping"))
        run("page", lambda: call(parts.path, "POST", body, parts.query))


if __name__ == "__main__":
    main()
