"""The admin's section of the flows page, over HTTP against the sandbox with the real worker:
the portal's own `user.admin` answer decides who gets it; its figures are the portal's own
(call log, users, failed pins, bindings as Bitrix24 reports them); its button binds the
handlers again in Bitrix24."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from django.test import Client
from django.utils import timezone

from b24app.models import Portal, PortalUser, RestCall
from b24app.status import today_start
from flows import admintasks, adminview
from flows.models import PinIntent
from tests.helpers import (
    api,
    install,
    launch,
    open_app,
    open_page,
    page_token,
    post_frame,
    sb,
    settle_background_work,
    state,
    worker_paused,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

ROOT = Path(__file__).resolve().parents[2]
ADMIN, ORDINARY = 1, 2  # the sandbox's admin and an ordinary user, on every seed portal
SECTION = "/flows/api/admin"
REBIND = "/flows/api/admin/rebind"
ALL_BOUND = [
    {"kind": "placement", "code": "LEFT_MENU", "bound": True},
    {"kind": "event", "code": "ONAPPUNINSTALL", "bound": True},
    {"kind": "event", "code": "ONAPPUPDATE", "bound": True},
]


@pytest.fixture(autouse=True)
def admin_view(
    settings: Any, sandbox: Any, celery_worker_process: Any, redis_client: Any
) -> Iterator[None]:
    """The admin's view on (the test settings turn it off); afterwards, until the work it queued
    (asking the portal who is an admin, reading its bindings) is done, so none runs into the next
    test."""
    settings.FLOWPINS_ADMIN_VIEW = True
    yield
    deadline = time.monotonic() + 30
    while list(redis_client.scan_iter(match="fp:admin_*_queued:*")):
        assert time.monotonic() < deadline, "the admin view's work did not finish"
        time.sleep(0.05)


def section(client: Client, token: str, *, until: Any = None, seconds: float = 30) -> Any:
    """The section's answer once the portal has said who the user is (not 202) and, with
    `until`, once that holds of the answer."""
    deadline = time.monotonic() + seconds
    while True:
        response = api(client, token, "GET", SECTION)
        done = response.status_code != 202 and (until is None or until(response.json()))
        if done:
            return response
        assert time.monotonic() < deadline, response.content[:300]
        time.sleep(0.1)


def settled(answer: dict[str, Any]) -> bool:
    """The bindings were read and nothing is running."""
    return not answer["busy"]


def make_admin(sandbox: Any, portal: str, user_id: int) -> None:
    """In Bitrix24, make this user an administrator of this portal only."""
    with sandbox.state.lock:
        sandbox.state.portals[portal].users[user_id].admin = True


def text_of(html: str) -> str:
    """What a person reads in the HTML."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split()).replace(" .", ".")


def page_settings(page: str) -> Any:
    match = re.search(r'<script id="fp-page" type="application/json">(.*?)</script>', page)
    assert match, "the page carries no settings for its script"
    return json.loads(match.group(1))


def no_section_in(html: str) -> bool:
    """Nothing of the section: no element of it, none of its words."""
    return not any(
        text in html for text in ('id="admin-section"', "For administrators", "Re-bind handlers")
    )


def refused_with_nothing(response: Any, status: int = 403) -> None:
    assert response.status_code == status, response.content[:300]
    body = response.json()
    assert set(body) == {"error"}, body  # no figures, no section
    assert "admin-section" not in body["error"]


def seed_figures(portal: Portal, other: Portal) -> None:
    """Known call-log rows, users and failed pins, on the portal and on another one."""
    RestCall.objects.filter(member_id=portal.member_id).delete()
    today, yesterday = timezone.now(), today_start() - timedelta(hours=1)
    rows = [  # (when, method, status, error, commands)
        (today, "batch", 200, "", 30),
        (today, "tasks.flow.Flow.list", 200, "", 1),
        (today, "user.admin", 200, "", 1),
        (today, "placement.get", 200, "", 1),
        (today, "batch", 503, "QUERY_LIMIT_EXCEEDED", 1),
        (today, "tasks.flow.Flow.pin", 401, "expired_token", 1),
        (yesterday, "batch", 503, "QUERY_LIMIT_EXCEEDED", 1),
        (yesterday, "batch", 200, "", 50),
    ]
    for member_id in (portal.member_id, other.member_id):
        for when, method, http_status, error, commands in rows:
            RestCall.objects.create(
                member_id=member_id,
                method=method,
                http_status=http_status,
                error=error,
                commands=commands,
                created_at=when,
            )
    for p in (portal, other):
        PortalUser.objects.create(portal=p, user_id=3)
        PortalUser.objects.create(portal=p, user_id=5, state=PortalUser.State.NEEDS_REOPEN)
        PortalUser.objects.create(portal=p, user_id=6)
    failed = PinIntent.Status.FAILED
    intents = [  # (portal, user, flow, status, problem, hours ago)
        (portal, 3, 101, failed, "denied", 1),
        (portal, 3, 103, failed, "denied", 2),
        (portal, 5, 102, failed, "denied", 23),
        (portal, 5, 104, failed, "reopen", 0),
        (portal, 6, 105, failed, "gave_up", 30),  # more than a day ago
        (portal, 6, 106, PinIntent.Status.DONE, "", 0),
        (portal, 6, 107, PinIntent.Status.PENDING, "", 0),
        (other, 3, 101, failed, "internal", 0),
    ]
    for p, user_id, flow_id, status, problem, hours in intents:
        PinIntent.objects.create(
            portal=p, user_id=user_id, flow_id=flow_id, desired=True, status=status, problem=problem
        )
        PinIntent.objects.filter(portal=p, user_id=user_id, flow_id=flow_id).update(
            updated_at=timezone.now() - timedelta(hours=hours)
        )


def test_an_admin_sees_the_portals_own_figures(
    sandbox: Any, celery_worker_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adminview, "BINDINGS_FRESH_SECONDS", 3600)  # read once, on the open
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, ADMIN)
    first = section(client, token, until=settled)
    assert first.status_code == 200
    assert first.json()["figures"]["bindings"]["expected"] == ALL_BOUND
    portal = Portal.objects.get()
    other = Portal.objects.create(
        member_id="f" * 32,
        domain="other.bitrix24.com",
        client_endpoint="https://other.bitrix24.com/rest/",
        server_endpoint="https://oauth.bitrix.info/rest/",
    )
    with worker_paused():  # nothing calls the portal (and so logs a call) while we compare
        seed_figures(portal, other)
        answer = section(client, token).json()
    figures = answer["figures"]
    assert figures["install"]["state"] == "active"
    assert figures["rest_today"] == {"calls": 6, "commands": 35, "errors": 2, "limited": 1}
    assert figures["users"] == {"active": 3, "reopen": 1}  # the admin, users 3 and 6; user 5
    assert figures["failed"] == [
        {"problem": "denied", "words": "You can no longer see this flow.", "pins": 3, "users": 2},
        {
            "problem": "reopen",
            "words": "Please reopen the app: your Bitrix24 session has ended.",
            "pins": 1,
            "users": 1,
        },
    ]
    assert figures["bindings"]["expected"] == ALL_BOUND
    html = text_of(answer["html"])
    assert "6 requests · 2 errors · 1 refused for the rate limit (503)" in html
    assert "3 active · 1 must reopen the app" in html
    assert "You can no longer see this flow. — 3 pins, 2 users" in html
    assert "Please reopen the app: your Bitrix24 session has ended. — 1 pin, 1 user" in html


def test_the_first_open_renders_at_once_and_a_worker_asks_the_portal(
    sandbox: Any, celery_worker_process: Any
) -> None:
    """The page never waits on `user.admin`: an admin's first open renders while the question
    is only queued, and the section opens once the worker's job has the portal's answer."""
    client = Client()
    install(client, sandbox)
    asked = state(sandbox)["counters"]["calls"]["user.admin"]
    with worker_paused():
        response = post_frame(client, launch(sandbox, "alpha", ADMIN))
        assert response.status_code == 200, response.content[:300]
        page = response.content.decode()
        assert page_settings(page)["admin"] is None and no_section_in(page)  # being asked
        token = page_token(response)
        waiting = api(client, token, "GET", SECTION)
        assert (waiting.status_code, waiting.json()) == (202, {"checking": True})
        assert state(sandbox)["counters"]["calls"]["user.admin"] == asked  # nobody waited on it
        portal = Portal.objects.get()
        assert admintasks.admin_check.apply(
            kwargs={"portal_id": portal.pk, "user_id": ADMIN}
        ).get() == ("admin")  # the worker's job, run here
    assert state(sandbox)["counters"]["calls"]["user.admin"] == asked + 1
    assert section(client, token).status_code == 200


def test_the_section_speaks_the_users_language(sandbox: Any, celery_worker_process: Any) -> None:
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, ADMIN, lang="ru")
    answer = section(client, token, until=settled).json()
    assert "Для администраторов" in answer["html"]
    assert "Перепривязать обработчики" in answer["html"]


def test_an_ordinary_user_and_another_portals_admin_get_nothing(
    sandbox: Any, celery_worker_process: Any
) -> None:
    """A valid page token is not enough: only the portal's own `user.admin` answer, for that
    portal, opens the section."""
    client = Client()
    install(client, sandbox, "alpha")
    install(client, sandbox, "beta")
    make_admin(sandbox, "beta", 3)  # an admin of beta, an ordinary user of alpha

    ordinary = open_app(client, sandbox, ORDINARY, "alpha")
    refused_with_nothing(section(client, ordinary))
    refused_with_nothing(api(client, ordinary, "POST", REBIND, {}))
    page = open_page(client, sandbox, ORDINARY, "alpha").content.decode()
    assert no_section_in(page)
    assert page_settings(page)["admin"] is False  # the page's script does not even ask

    beta_admin = open_app(client, sandbox, 3, "beta")
    assert section(client, beta_admin).status_code == 200  # the portal says so: beta's admin
    # ...and binding the handlers may now use their token (the stored flag follows the portal)
    assert PortalUser.objects.get(
        portal__member_id=state(sandbox, "beta")["member_id"], user_id=3
    ).is_admin
    alpha_user = open_app(client, sandbox, 3, "alpha")
    refused_with_nothing(section(client, alpha_user))
    refused_with_nothing(api(client, alpha_user, "POST", REBIND, {}))


def _admin_rest(sandbox: Any, method: str, params: dict[str, Any]) -> Any:
    """Call the portal's REST API as its admin would, e.g. from Bitrix24's own settings."""
    token = sb(sandbox, "p/alpha/tokens", {"user_id": ADMIN})["access_token"]
    endpoint = state(sandbox)["client_endpoint"]
    answer = requests.post(f"{endpoint}{method}", json={**params, "auth": token}, timeout=10)
    assert answer.status_code == 200, answer.text[:300]
    return answer.json()["result"]


def test_rebind_puts_back_bindings_deleted_in_bitrix24(
    sandbox: Any, celery_worker_process: Any
) -> None:
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, ADMIN)
    assert section(client, token, until=settled).json()["figures"]["bindings"]["expected"] == (
        ALL_BOUND
    )
    before = state(sandbox)
    for placement in before["placements"]:
        _admin_rest(sandbox, "placement.unbind", {"PLACEMENT": placement["placement"]})
    for event in before["events"]:
        _admin_rest(sandbox, "event.unbind", {"event": event["event"], "handler": event["handler"]})
    assert state(sandbox)["placements"] == [] and state(sandbox)["events"] == []

    asked = api(client, token, "POST", REBIND, {})
    assert asked.status_code == 202, asked.content[:300]
    assert "Re-binding the handlers…" in asked.json()["html"]
    done = section(client, token, until=lambda a: a["figures"]["rebind"] == "done").json()
    assert done["figures"]["bindings"]["expected"] == ALL_BOUND
    assert "every handler is in place" in done["html"]
    after = state(sandbox)
    assert sorted((p["placement"], p["handler"]) for p in after["placements"]) == sorted(
        (p["placement"], p["handler"]) for p in before["placements"]
    )
    assert sorted((e["event"], e["handler"]) for e in after["events"]) == sorted(
        (e["event"], e["handler"]) for e in before["events"]
    )


def queued_jobs() -> list[Any]:
    """What the paused worker would run, taken off every queue of the broker (oldest first in
    each): each job as a signature carrying the rest of its chain."""
    import base64

    import redis as redis_lib
    from celery import signature
    from django.conf import settings

    broker = redis_lib.Redis.from_url(settings.CELERY_BROKER_URL)
    jobs = []
    for queue in settings.FLOWPINS_QUEUES:
        while raw := broker.rpop(queue):
            message = json.loads(raw)
            args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
            job = signature(message["headers"]["task"], args=args, kwargs=kwargs)
            jobs.append((job, [signature(s) for s in reversed(embed.get("chain") or [])]))
    return jobs


def test_a_read_queued_before_the_rebind_is_not_taken_for_its_result(
    sandbox: Any, celery_worker_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of the bindings queued before the click (the section was opened while its last
    read was old) that runs before the handlers are bound again does not answer the click:
    the section goes on waiting for the read that follows the re-binding, then reports it."""
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, ADMIN)
    section(client, token, until=settled)
    for placement in state(sandbox)["placements"]:
        _admin_rest(sandbox, "placement.unbind", {"PLACEMENT": placement["placement"]})
    monkeypatch.setattr(adminview, "BINDINGS_FRESH_SECONDS", 0)  # every look reads again
    portal = Portal.objects.get()
    with worker_paused():
        section(client, token)  # the last read is old: it queues another
        assert api(client, token, "POST", REBIND, {}).status_code == 202
        jobs = {job.name: (job, then) for job, then in queued_jobs()}
        # The paused worker may hold the first job queued (it was waiting on the queue): the
        # read. Whoever holds it, it is run here first, before the handlers are bound again.
        held = "flows.admin_bindings" not in jobs
        admintasks.admin_bindings.apply(kwargs={"portal_id": portal.pk, "user_id": ADMIN}).get()
        waiting = section(client, token).json()
        assert (waiting["figures"]["rebind"], waiting["busy"]) == ("running", True)
        assert "Re-binding the handlers…" in waiting["html"]
        assert "still lacks" not in waiting["html"]
        rebind, then = jobs["b24app.bind_handlers"]
        rebind.apply().get()
        assert section(client, token).json()["figures"]["rebind"] == "running"
        assert [job.name for job in then] == ["flows.admin_bindings"]
        then[0].apply().get()  # the read that follows the re-binding, as the chain queued it
        done = section(client, token).json()
        assert done["figures"]["rebind"] == "done"
        assert done["figures"]["bindings"]["expected"] == ALL_BOUND
        assert "every handler is in place" in done["html"]
        reads = state(sandbox)["counters"]["calls"]["event.get"]
    if held:  # the worker runs it now; the test's database must outlive it
        deadline = time.monotonic() + 30
        while state(sandbox)["counters"]["calls"]["event.get"] == reads:
            assert time.monotonic() < deadline, "the held read did not run"
            time.sleep(0.05)


def test_the_section_reports_bindings_missing_in_bitrix24(
    sandbox: Any, celery_worker_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the section shows is what Bitrix24 reports, read again once the last read is old."""
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, ADMIN)
    section(client, token, until=settled)
    _admin_rest(sandbox, "placement.unbind", {"PLACEMENT": "LEFT_MENU"})
    monkeypatch.setattr(adminview, "BINDINGS_FRESH_SECONDS", 0)  # every look reads again
    answer = section(
        client,
        token,
        until=lambda a: not a["busy"] and not a["figures"]["bindings"]["expected"][0]["bound"],
    ).json()
    assert answer["figures"]["bindings"]["expected"] == [
        {"kind": "placement", "code": "LEFT_MENU", "bound": False},
        *ALL_BOUND[1:],
    ]
    assert "LEFT_MENU — missing" in text_of(answer["html"])


def test_the_product_shows_the_section_unless_it_is_turned_off(tmp_path: Path) -> None:
    """A portal admin who opens the app sees the section with no setting made: it is on by
    default in the product's own settings (the test settings turn it off)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "FLOWPINS_")) and k not in {"DEBUG", "SECRET_KEY"}
    }
    env.update(DEBUG="1", FLOWPINS_ENV_FILE=os.devnull, FLOWPINS_VAR_DIR=str(tmp_path))
    show = "from django.conf import settings; print(settings.FLOWPINS_ADMIN_VIEW)"

    def setting(**values: str) -> str:
        proc = subprocess.run(
            [sys.executable, "manage.py", "shell", "-v", "0", "-c", show],
            cwd=ROOT,
            env={**env, **values},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-800:]
        return proc.stdout.strip()

    assert setting() == "True"
    assert setting(FLOWPINS_ADMIN_VIEW="0") == "False"


def test_turned_off_the_section_is_not_there_and_nobody_is_asked(
    sandbox: Any, settings: Any
) -> None:
    settings.FLOWPINS_ADMIN_VIEW = False
    client = Client()
    install(client, sandbox)  # asks `user.admin` of the installer, as it always did
    asked = state(sandbox)["counters"]["calls"]["user.admin"]
    response = open_page(client, sandbox, ADMIN)
    page = response.content.decode()
    assert page_settings(page)["admin"] is False and no_section_in(page)
    token = page_token(response)
    refused = api(client, token, "GET", SECTION)
    assert refused.status_code == 404 and set(refused.json()) == {"error"}
    assert api(client, token, "POST", REBIND, {}).status_code == 404
    settle_background_work()
    assert state(sandbox)["counters"]["calls"]["user.admin"] == asked  # no request spent
