"""The cost of reading real pin states with toggle pairs (25 flows a request), and what a Pin
all saves once they are known."""

from __future__ import annotations

import math
import time

from bench.portal import generated_flow_ids, portal_pk, prepare, set_limits, wait_all_settled
from bench.report import Report
from bench.stack import Stack

USER = 2
PREPINNED_EVERY = 3  # a third of the flows pinned in Bitrix24 beforehand


def _read_once(stack: Stack, name: str, flows: int, rate: float, burst: int) -> list[str]:
    """One user's first read over `flows` generated flows (and the few seed flows they see);
    then a Pin all of the generated ones. One table row."""
    from django.conf import settings

    from flows import pinread, tasks
    from flows.models import PinIntent, PinRead

    prepare(stack, [name], flows, [USER])
    ids = generated_flow_ids(stack, name)
    pinned = set(ids[::PREPINNED_EVERY])
    stack.sb(f"p/{name}/pins", {"user_id": USER, "flow_ids": sorted(pinned), "pinned": True})
    set_limits(stack, [name], rate, burst)
    pk = portal_pk(stack, name)
    before = stack.portal_state(name)["counters"]
    settings.FLOWPINS_READ_PINS = True  # this process asks; the workers read
    started = time.monotonic()
    pinread.request(pk, USER)
    tasks.enqueue_converge(pk, USER)
    while PinRead.objects.filter(portal_id=pk, requested_at__isnull=False).exists():
        if time.monotonic() - started > 600:
            raise RuntimeError("the read did not finish")
        time.sleep(0.05)
    seconds = time.monotonic() - started
    after = stack.portal_state(name)
    known = dict(
        PinIntent.objects.filter(portal_id=pk, user_id=USER).values_list("flow_id", "observed")
    )
    wrong = sum(known.get(fid) is not (fid in pinned) for fid in ids)
    changed = len(set(after["pins"].get(str(USER), [])) ^ pinned)
    requests_made = after["counters"]["requests"] - before["requests"]
    calls = {
        method: count - before["calls"].get(method, 0)
        for method, count in after["counters"]["calls"].items()
        if count != before["calls"].get(method, 0) and method != "tasks.flow.Flow.pin"
    }
    pin_all = _pin_all(stack, name, ids, after["counters"]["pin_toggles"])
    needed = math.ceil(len(known) / 25)  # the user's whole list: the seed flows they see too
    floor = max(0.0, (needed - burst) / rate)
    return [
        str(flows),
        f"{requests_made} ({', '.join(f'{m} {n}' for m, n in sorted(calls.items()))})",
        f"{len(known)} / {needed}",
        f"{seconds:.1f}",
        f"{floor:.1f}",
        str(after["counters"]["http_503"] - before["http_503"]),
        str(wrong),
        str(changed),
        f"{pin_all} (differ: {len(set(ids) - pinned)})",
    ]


def _pin_all(stack: Stack, name: str, ids: list[int], toggles_before: int) -> int:
    """Pin all after the read, as the page sends it (500 a request): the toggles it took."""
    from flows import intents, tasks

    pk = portal_pk(stack, name)
    for start in range(0, len(ids), 500):
        intents.set_desired(pk, USER, ids[start : start + 500], True)
    tasks.enqueue_converge(pk, USER)
    wait_all_settled(600)
    return int(stack.portal_state(name)["counters"]["pin_toggles"]) - toggles_before


def bench_reads(stack: Stack, report: Report, sizes: list[int]) -> None:
    name = stack.portal_names()[0]
    rate, burst = 2.0, 50
    # The stack's workers read no pin states (FLOWPINS_READ_PINS=0, for the other sections):
    # these read them, and give up any read asked of them otherwise.
    stack.restart_workers(FLOWPINS_READ_PINS="1")
    try:
        rows = [_read_once(stack, name, flows, rate, burst) for flows in sizes]
    finally:
        stack.restart_workers()
    report.add(
        "Reading real pin states: toggle pairs, 25 flows a request (2/s, burst 50; a third "
        "pinned beforehand in Bitrix24)",
        [
            "flows",
            "REST requests",
            "flows read / requests needed (÷ 25)",
            "seconds",
            "bucket floor s",
            "503s",
            "wrong states read",
            "pins changed by the read",
            "Pin all toggles after the read",
        ],
        rows,
        "One request of the portal's budget per 25 flows, two toggles per flow; the bucket floor "
        "is (requests − burst) / rate. A Pin all afterwards toggles only the flows that differ "
        "(without the read: about 2 per flow pinned beforehand, since an unknown state costs a "
        "toggle to learn).",
    )
