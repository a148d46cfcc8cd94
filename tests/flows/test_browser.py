"""End to end in headless Chromium: the sandbox's portal page frames the app (different
origins), a user pins and unpins, and the sandbox's own record agrees. Saves a screenshot."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.helpers import install, portal_pins

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser, pytest.mark.services]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    # Playwright's sync API keeps an event loop on this thread; Django's ORM calls made by the
    # test itself are still synchronous, so let them through.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page_for(sandbox: Any, live_server: Any, browser: Any, celery_worker_process: Any) -> Any:
    sandbox.state.app_url = live_server.url
    install(Client(), sandbox)
    contexts: list[Any] = []

    def open_as(user_id: int, lang: str = "en") -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{sandbox.portal_url('alpha')}?user={user_id}&lang={lang}&open=1")
        frame = page.frame_locator("#app-frame")
        frame.locator("#flows").wait_for(timeout=15000)
        return page, frame

    yield open_as
    for context in contexts:
        context.close()


def test_a_user_pins_and_unpins_inside_the_portal_frame(
    page_for: Any, sandbox: Any, live_server: Any
) -> None:
    assert not live_server.url.startswith(sandbox.url.rsplit(":", 1)[0])  # two origins
    page, frame = page_for(2)
    row = frame.locator("tr[data-flow-id]").first
    flow_id = int(row.get_attribute("data-flow-id"))
    button = row.locator(".pin-btn")
    assert button.inner_text() == "Pin"
    button.click()
    row.locator(".pin-btn:not(.busy)", has_text="Unpin").wait_for(timeout=20000)
    assert row.locator(".state").inner_text() == "Pinned."
    assert portal_pins(sandbox, 2) == {flow_id}
    assert portal_pins(sandbox, 3) == set()  # another user's pins stay untouched
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "flows-page.png"), full_page=True)
    row = frame.locator(f'tr[data-flow-id="{flow_id}"]')
    row.locator(".pin-btn").click()
    row.locator(".pin-btn:not(.busy)", has_text="Pin").wait_for(timeout=20000)
    assert portal_pins(sandbox, 2) == set()


def test_the_russian_page_and_markup_in_names_shown_as_text(page_for: Any) -> None:
    page, frame = page_for(1, "ru")
    assert frame.locator(".pin-btn").first.inner_text() == "Закрепить"
    names = frame.locator("td.name").all_inner_texts()
    assert any("<script>alert(1)</script>" in n for n in names)  # shown as text, not run
    assert frame.locator("td.name script").count() == 0
    search = frame.locator("#search")
    search.fill("поток")
    visible = frame.locator("tr[data-flow-id]:visible").count()
    assert 0 < visible < len(names)
    if os.environ.get("FLOWPINS_SCREENSHOTS"):
        page.screenshot(path=str(ARTIFACTS / "flows-page-ru.png"), full_page=True)
