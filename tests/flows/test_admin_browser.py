"""The admin's section in headless Chromium, inside the sandbox portal's frame: the admin sees
it, re-binds handlers deleted in Bitrix24 with its button and sees the result; an ordinary user
never gets it. Saves tests/artifacts/admin-section.png."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from django.test import Client

from tests.flows.conftest import ARTIFACTS
from tests.helpers import install, sb, state

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser, pytest.mark.services]


@pytest.fixture
def open_as(
    sandbox: Any,
    live_server: Any,
    browser: Any,
    celery_worker_process: Any,
    settings: Any,
    redis_client: Any,
) -> Iterator[Any]:
    settings.FLOWPINS_ADMIN_VIEW = True
    sandbox.state.app_url = live_server.url
    install(Client(), sandbox)
    contexts: list[Any] = []

    def opened(user_id: int) -> tuple[Any, Any]:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{sandbox.portal_url('alpha')}?user={user_id}&lang=en&open=1")
        frame = page.frame_locator("#app-frame")
        frame.locator("#flows").wait_for(timeout=15000)
        return page, frame

    yield opened
    for context in contexts:
        context.close()
    deadline = time.monotonic() + 30  # the work the pages queued is done before the next test
    while list(redis_client.scan_iter(match="fp:admin_*_queued:*")):
        assert time.monotonic() < deadline, "the admin view's work did not finish"
        time.sleep(0.05)


def _unbind_everything(sandbox: Any) -> None:
    """Delete the app's bindings in Bitrix24, as an admin could in the portal's settings."""
    token = sb(sandbox, "p/alpha/tokens", {"user_id": 1})["access_token"]
    portal = state(sandbox)
    calls = [("placement.unbind", {"PLACEMENT": p["placement"]}) for p in portal["placements"]]
    calls += [
        ("event.unbind", {"event": e["event"], "handler": e["handler"]}) for e in portal["events"]
    ]
    for method, params in calls:
        answer = requests.post(
            f"{portal['client_endpoint']}{method}", json={**params, "auth": token}, timeout=10
        )
        assert answer.status_code == 200, answer.text[:300]
    assert state(sandbox)["placements"] == [] and state(sandbox)["events"] == []


def test_the_admin_sees_the_section_and_rebinds_the_handlers(open_as: Any, sandbox: Any) -> None:
    page, frame = open_as(1)
    admin = frame.locator("#admin-section")
    admin.wait_for(timeout=20000)
    frame.locator("#admin-bindings li.bound").nth(2).wait_for(timeout=20000)  # read from Bitrix24
    assert frame.locator("#admin-bindings li.missing").count() == 0
    assert frame.locator("#admin-users dd").inner_text().startswith("1 active")

    _unbind_everything(sandbox)
    frame.locator("#admin-rebind").click()
    result = frame.locator('#admin-rebind-state[data-state="done"]')
    result.wait_for(timeout=30000)
    assert result.inner_text().endswith("every handler is in place.")
    assert frame.locator("#admin-bindings li.bound").count() == 3
    assert {p["placement"] for p in state(sandbox)["placements"]} == {"LEFT_MENU"}
    assert {e["event"] for e in state(sandbox)["events"]} == {"ONAPPUNINSTALL", "ONAPPUPDATE"}
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin-section.png"), full_page=False)


def test_an_ordinary_user_never_gets_the_section(open_as: Any) -> None:
    page, frame = open_as(2)
    frame.locator('body[data-admin="no"]').wait_for(timeout=20000)  # the portal said "no"
    assert frame.locator("#admin-section").count() == 0
    assert "Re-bind handlers" not in frame.locator("body").inner_text()
