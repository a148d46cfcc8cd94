"""Test helpers that drive the simulated portal the way Bitrix24 drives the app."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import requests
from django.test import Client


def sb(sandbox: Any, path: str, payload: dict[str, Any] | None = None) -> Any:
    """Call the sandbox's control API (POST with a payload, GET without)."""
    url = f"{sandbox.url}/_sandbox/{path.lstrip('/')}"
    if payload is None:
        response = requests.get(url, timeout=10)
    else:
        response = requests.post(url, json=payload, timeout=30)
    response.raise_for_status()
    return response.json()


def state(sandbox: Any, portal: str = "alpha") -> dict[str, Any]:
    data = sb(sandbox, f"state?portal={portal}")
    return data["portals"][portal] if "portals" in data else data


def launch(sandbox: Any, portal: str = "alpha", user_id: int = 1, **extra: Any) -> dict[str, Any]:
    """What Bitrix24 would POST into the frame for this user (fresh tokens each time)."""
    return sb(sandbox, f"p/{portal}/launch", {"user_id": user_id, **extra})


def frame_path(launched: dict[str, Any]) -> str:
    url = urlsplit(launched["url"])
    return f"{url.path}?{url.query}" if url.query else url.path


def post_frame(client: Client, launched: dict[str, Any], **overrides: str) -> Any:
    form = {**launched["form"], **overrides}
    return client.post(frame_path(launched), data=form)


def install(client: Client, sandbox: Any, portal: str = "alpha") -> Any:
    """Install the app on a sandbox portal as its admin, as the installer frame does."""
    launched = launch(sandbox, portal, 1, installer=True)
    response = post_frame(client, launched)
    assert response.status_code == 200, response.content[:500]
    sb(sandbox, f"p/{portal}/install_finish", {})
    return response


def page_token(response: Any) -> str:
    """The signed token a rendered app page carries for its own requests."""
    match = re.search(r'data-token="([^"]+)"', response.content.decode())
    assert match, "the page carries no token"
    return match.group(1)


def open_page(
    client: Client, sandbox: Any, user_id: int, portal: str = "alpha", lang: str = "en"
) -> Any:
    """Open the app as this user, as the portal's frame does; the page must render.

    A first open renders at once with a loading state while a worker fetches the list; here
    that job runs in-process (tests with a real worker see it done by the worker), and the app
    is opened again, as a person who reloads would.
    """
    launched = launch(sandbox, portal, user_id, lang=lang)
    response = post_frame(client, launched)
    assert response.status_code == 200, response.content[:400]
    if 'data-loading="1"' in response.content.decode():
        wait_for_flow_list(launched["form"]["member_id"], user_id)
        response = post_frame(client, launch(sandbox, portal, user_id, lang=lang))
        assert response.status_code == 200, response.content[:400]
    return response


# Set by the session's Celery worker fixture once a real worker consumes the queue ("proc": its
# process, so a test with a private stack can pause it).
WORKER: dict[str, Any] = {"running": False, "proc": None}


def wait_for_flow_list(member_id: str, user_id: int, seconds: float = 30) -> None:
    """The list a first open queued: fetched by the real worker when one runs (and waited
    for), else by running the same job here — never both, so REST counts stay exact."""
    import time

    from b24app.models import Portal
    from flows.snapshots import get as snapshot_get
    from flows.tasks import refresh_snapshot

    stored = Portal.objects.get(member_id=member_id)
    if not WORKER["running"]:
        refresh_snapshot(portal_id=stored.pk, user_id=user_id, interactive=True)
        return
    deadline = time.monotonic() + seconds
    while snapshot_get(stored, user_id) is None:
        assert time.monotonic() < deadline, "the worker did not fetch the flow list"
        time.sleep(0.05)


def open_app(
    client: Client, sandbox: Any, user_id: int, portal: str = "alpha", lang: str = "en"
) -> str:
    """Open the app as this user; returns the page token."""
    return page_token(open_page(client, sandbox, user_id, portal, lang))


def visible_to(sandbox: Any, user_id: int, portal: str = "alpha") -> list[int]:
    """The flows Bitrix24 lets this user see, by the sandbox's own rules."""
    return sorted(f["id"] for f in state(sandbox, portal)["flows"] if user_id in f["visible_to"])


def portal_pins(sandbox: Any, user_id: int, portal: str = "alpha") -> set[int]:
    """What Bitrix24 itself records as pinned for this user."""
    return set(state(sandbox, portal)["pins"].get(str(user_id), []))


def settle_background_work(seconds: float = 30) -> None:
    """With a real worker running, wait until no list refresh is in flight, so that what a
    test compares is not changed under it by a job an earlier step queued."""
    import time

    from flows.snapshots import pending_refreshes

    if not WORKER["running"]:
        return  # nothing consumes the queue: nothing can change under the test
    deadline = time.monotonic() + seconds
    while pending_refreshes():
        assert time.monotonic() < deadline, "background refreshes did not settle"
        time.sleep(0.05)


@contextmanager
def worker_paused() -> Iterator[None]:
    """The session's worker, if one runs, stopped (SIGSTOP, after its jobs settle) while the
    test runs the same jobs itself; resumed afterwards."""
    shared = WORKER["proc"] if WORKER["running"] else None
    if shared is not None:
        settle_background_work()  # not stopped in the middle of a job
        shared.pause()
        WORKER["running"] = False
    try:
        yield
    finally:
        if shared is not None:
            # What the test queued meanwhile was for the jobs it ran itself: a resumed worker
            # must not run them while the test's database is being flushed (a deadlock).
            import redis as redis_lib
            from django.conf import settings

            broker = redis_lib.Redis.from_url(settings.CELERY_BROKER_URL)
            broker.delete(*settings.FLOWPINS_QUEUES)
            shared.resume()
            WORKER["running"] = True


def api(client: Client, token: str, method: str, path: str, body: Any = None) -> Any:
    """A request of the page's own script: the signed page token in its header."""
    headers = {"HTTP_X_FLOWPINS_TOKEN": token}
    if method == "GET":
        return client.get(path, **headers)
    return client.post(path, data=json.dumps(body), content_type="application/json", **headers)
