"""End to end in headless Chromium: the sandbox's portal page frames the app (different
origins), a user pins and unpins, and the sandbox's own record agrees; the page opened in each
of Bitrix24's languages we ship shows no English, the admin's section included. Saves
screenshots."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client

from b24app.models import Portal
from flows import page as flows_page
from flows.models import PinIntent
from tests.flows.conftest import ARTIFACTS
from tests.flows.test_i18n import parse_po
from tests.helpers import install, portal_pins, sb, settle_background_work, visible_to

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser, pytest.mark.services]


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
    assert row.locator(".state").inner_text() == "state not read yet"  # reading is off here
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


def _wait_for_list_refreshes() -> None:
    """Until no list refresh is queued or running (the open's own has landed)."""
    settle_background_work()


def _loaded(frame: Any) -> None:
    """Until the page shows its rows (a first open fills them in when the list lands)."""
    frame.locator('#flows[data-loading="0"] tr[data-flow-id]').first.wait_for(timeout=20000)


def test_the_open_page_updates_in_place_when_flows_change_in_bitrix24(
    page_for: Any, sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flow created, one renamed, one removed in Bitrix24 while the page is open: the page
    shows all three without a reload, keeping a pin and the search filter."""
    monkeypatch.setattr(flows_page, "PAGE_REFRESH_SECONDS", 2, raising=False)  # sped up
    page, frame = page_for(2)
    _loaded(frame)
    rows = frame.locator("tr[data-flow-id]")
    ids = [int(i) for i in rows.evaluate_all("rs => rs.map(r => r.dataset.flowId)")]
    kept, renamed, removed = ids[0], ids[1], ids[2]
    kept_row = frame.locator(f'tr[data-flow-id="{kept}"]')
    kept_row.locator(".pin-btn").click()
    kept_row.locator(".pin-btn:not(.busy)", has_text="Unpin").wait_for(timeout=20000)
    _wait_for_list_refreshes()
    frame.locator("#search").fill("свеж")
    assert frame.locator("tr[data-flow-id]:visible").count() == 0

    created = sb(sandbox, "p/alpha/flow", {"name": "Свежий поток", "efficiency": 42})["created"]
    sb(sandbox, "p/alpha/flow", {"id": renamed, "name": "Свежее имя", "active": False})
    sb(sandbox, "p/alpha/flow", {"id": removed, "delete": True})

    frame.locator(f'tr[data-flow-id="{created}"]').wait_for(timeout=20000)
    frame.locator(f'tr[data-flow-id="{removed}"]').wait_for(state="detached", timeout=20000)
    renamed_row = frame.locator(f'tr[data-flow-id="{renamed}"]')
    assert renamed_row.locator("td.name").inner_text() == "Свежее имя"
    assert renamed_row.locator(".pill").inner_text() == "inactive"
    assert frame.locator(f'tr[data-flow-id="{created}"] td.eff').inner_text().endswith("42%")
    visible = frame.locator("tr[data-flow-id]:visible")
    assert sorted(int(i) for i in visible.evaluate_all("rs => rs.map(r => r.dataset.flowId)")) == (
        sorted([created, renamed])
    )  # the filter holds for what changed
    assert kept_row.get_attribute("data-pinned") == "1"  # the pin survives the update
    assert kept_row.locator(".state").inner_text() == "Pinned."
    frame.locator("#search").fill("")
    assert frame.locator("tr[data-flow-id]").count() == len(ids)  # +1 created, -1 removed


def test_a_flow_created_just_before_the_open_is_on_the_page_within_10_seconds(
    page_for: Any, sandbox: Any
) -> None:
    page, frame = page_for(2)  # an earlier open: there is a snapshot, seconds old
    _loaded(frame)
    _wait_for_list_refreshes()
    page.close()
    created = sb(sandbox, "p/alpha/flow", {"name": "Только что созданный"})["created"]
    time.sleep(3)
    opened_at = time.monotonic()
    page, frame = page_for(2)
    frame.locator(f'tr[data-flow-id="{created}"]').wait_for(timeout=10000)
    assert time.monotonic() - opened_at <= 10
    assert frame.locator(f'tr[data-flow-id="{created}"] td.name').inner_text() == (
        "Только что созданный"
    )


def _summary(frame: Any, pattern: str, seconds: float) -> str:
    progress = frame.locator("#progress")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = progress.inner_text()
        if re.fullmatch(pattern, text):
            return str(text)
        time.sleep(0.2)
    raise AssertionError(f"no summary like {pattern!r}; the line says {progress.inner_text()!r}")


def test_pin_all_over_more_than_500_flows_shows_progress_and_a_summary(
    page_for: Any, sandbox: Any
) -> None:
    sb(sandbox, "p/alpha/flows", {"count": 520, "visible_to_all": True})
    page, frame = page_for(2)
    total = len(visible_to(sandbox, 2))
    assert total > 500
    frame.locator(f"tr[data-flow-id]:nth-child({total})").wait_for(timeout=30000)
    seen: list[str] = []
    frame.locator("#pin-all").click()
    progress = frame.locator("#progress")
    progress.wait_for(timeout=5000)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = progress.inner_text()
        seen.append(text)
        if re.fullmatch(r"\d+ flows? pinned", text):
            break
        time.sleep(0.1)
    assert seen[-1] == f"{total} flows pinned", seen[-5:]
    steps = [s for s in seen if re.fullmatch(rf"Pinning \d+ of {total}…", s)]
    assert steps, seen[:5]  # the progress line counted settled flows as they came back
    assert portal_pins(sandbox, 2) == set(visible_to(sandbox, 2))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "flows-pin-all.png"), full_page=False)


def test_pin_all_names_the_flows_that_failed_and_why(page_for: Any, sandbox: Any) -> None:
    page, frame = page_for(2)
    _loaded(frame)
    names = dict(
        zip(
            (
                int(i)
                for i in frame.locator("tr[data-flow-id]").evaluate_all(
                    "rs => rs.map(r => r.dataset.flowId)"
                )
            ),
            frame.locator("td.name").all_inner_texts(),
            strict=True,
        )
    )
    _wait_for_list_refreshes()
    lost = sorted(names)[:2]
    for flow_id in lost:  # user 2 can no longer see them; the open page still shows them
        sb(sandbox, "p/alpha/flow", {"id": flow_id, "access": ["U3"]})
    frame.locator("#pin-all").click()
    summary = _summary(frame, r".* failed: .*", 60)
    first, second = (names[i] for i in lost)
    assert summary in (
        f"{len(names) - 2} flows pinned; 2 flows failed: "
        f"You can no longer see this flow. ({a}, {b})"
        for a, b in ((first, second), (second, first))
    ), summary
    assert portal_pins(sandbox, 2) == set(names) - set(lost)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "flows-pin-all-failed.png"), full_page=False)


def test_flows_pinned_in_bitrix24_show_pinned_on_the_first_open_and_stay_pinned(
    page_for: Any, sandbox: Any, settings: Any
) -> None:
    """The first open reads the real pin states (toggle pairs, in the worker): within seconds
    the page shows what the user pinned in Bitrix24 itself, and every user's pins there are
    exactly as they were before the page was opened."""
    settings.FLOWPINS_READ_PINS = True
    flows = visible_to(sandbox, 2)
    pinned = set(flows[::3])
    sb(sandbox, "p/alpha/pins", {"user_id": 2, "flow_ids": sorted(pinned), "pinned": True})
    everyone = {uid: portal_pins(sandbox, uid) for uid in range(1, 7)}
    page, frame = page_for(2)
    for flow_id in pinned:  # shown within seconds of the open
        frame.locator(f'tr.pinned[data-flow-id="{flow_id}"]').wait_for(timeout=20000)
    unread = frame.locator("tr[data-flow-id] .state.unread")
    unread.first.wait_for(state="detached", timeout=20000)  # every state known now
    assert {
        int(r.get_attribute("data-flow-id")) for r in frame.locator("tr.pinned").all()
    } == pinned
    assert frame.locator("#check-pins").is_visible()
    assert {uid: portal_pins(sandbox, uid) for uid in range(1, 7)} == everyone


@pytest.fixture
def admin_view(settings: Any, redis_client: Any) -> Iterator[None]:
    """The admin's view on (the test settings turn it off); afterwards, until the work it
    queued (asking the portal who is an admin, reading its bindings) is done."""
    settings.FLOWPINS_ADMIN_VIEW = True
    yield
    deadline = time.monotonic() + 30
    while list(redis_client.scan_iter(match="fp:admin_*_queued:*")):
        assert time.monotonic() < deadline, "the admin view's work did not finish"
        time.sleep(0.05)


def _admin_section_shown(frame: Any) -> None:
    """Until the admin's section shows the bindings Bitrix24 reports and the re-binding's
    result."""
    frame.locator("#admin-bindings li.bound").nth(2).wait_for(timeout=20000)
    frame.locator('#admin-rebind-state[data-state="done"]').wait_for(timeout=30000)


# Bitrix24's LANG → the language the page must be written in (b24app.langs).
SHIPPED = {"ua": "uk", "de": "de", "la": "es", "br": "pt-br", "pl": "pl", "ru": "ru"}
# Words a language shares with English by right (German says "Flow" and "Status" too): not
# counted as English left on that language's page.
SAME_AS_ENGLISH = {"de": {"Flow", "Status", "Installation"}, "es": {"%(errors)s error"}}
# Everything the page shows or will show: every text node of the frame's document (hidden
# notices too), the titles, labels, placeholders and alt texts, the document's title, and the
# texts the page's script shows later (its messages and every plural form).
PAGE_TEXTS = """root => {
  const doc = root.ownerDocument, out = [doc.title];
  const walker = doc.createTreeWalker(doc.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const tag = node.parentElement ? node.parentElement.tagName : "";
    if (tag !== "SCRIPT" && tag !== "STYLE") out.push(node.textContent);
  }
  for (const el of doc.querySelectorAll("[title], [aria-label], [placeholder], [alt], input")) {
    for (const name of ["title", "aria-label", "placeholder", "alt"]) {
      if (el.hasAttribute(name)) out.push(el.getAttribute(name));
    }
    if (["button", "submit", "reset"].includes(el.type)) out.push(el.value);
  }
  out.push(...Object.values(JSON.parse(doc.getElementById("fp-messages").textContent)));
  const plurals = JSON.parse(doc.getElementById("fp-page").textContent).plurals.forms;
  for (const forms of Object.values(plurals)) out.push(...forms);
  return out.map(t => t.replace(/\\s+/g, " ").trim()).filter(t => t);
}"""


def _english_messages() -> dict[str, re.Pattern[str]]:
    """Every English message of the app (msgids and their plurals), as a pattern that matches
    it with any values in its placeholders."""
    po = (ARTIFACTS.parent.parent / "locale" / "ru" / "LC_MESSAGES" / "django.po").read_text(
        encoding="utf-8"
    )
    english: dict[str, re.Pattern[str]] = {}
    for entry in parse_po(po).values():
        for message in filter(None, (entry.msgid, entry.plural)):
            parts = re.split(r"%\(\w+\)[sd]", " ".join(message.split()))
            english[message] = re.compile(".+".join(re.escape(part) for part in parts))
    return english


def _pieces(text: str) -> set[str]:
    """The text and the parts it joins with "·", "—" or commas (one text node of the admin's
    section holds several messages: "0 errors · 0 refused for the rate limit (503)")."""
    return {text, *filter(None, (p.strip() for p in re.split(r"[·—]|,\s", text)))}


def _english_left(texts: list[str], allowed: set[str]) -> list[str]:
    english = _english_messages()
    return sorted(
        {
            piece
            for text in texts
            for piece in _pieces(text)
            for message, pattern in english.items()
            if message not in allowed and pattern.fullmatch(piece)
        }
    )


def test_the_page_in_each_bitrix24_language_we_ship_has_no_english_left(
    page_for: Any, settings: Any, admin_view: None
) -> None:
    """Opened by the portal's admin, with every part shown: the admin's section too, with a
    failed pin and the result of a re-binding (asked once; later pages show it too)."""
    assert set(SHIPPED.values()) == {code for code, _name in settings.LANGUAGES} - {"en"}
    settings.FLOWPINS_READ_PINS = True  # its button ("Check pins in Bitrix24") is shown too
    PinIntent.objects.create(
        portal=Portal.objects.get(),
        user_id=3,
        flow_id=101,
        desired=True,
        status=PinIntent.Status.FAILED,
        problem="denied",
    )  # listed in the section, with its plurals
    page, frame = page_for(1, "en")
    _loaded(frame)
    frame.locator("#admin-bindings li.bound").nth(2).wait_for(timeout=20000)
    frame.locator("#admin-rebind").click()
    _admin_section_shown(frame)
    english = _english_left(frame.locator("html").evaluate(PAGE_TEXTS), set())
    assert {"Pin all", "Search flows", "Flow", "Status", "Pin"} <= set(english)  # it can see
    assert {"For administrators", "Installed and active", "1 pin", "1 user"} <= set(english)
    for shown in (r"\d+ errors?", r"Re-bound at .+"):  # ...the admin's section's lines too
        assert any(re.fullmatch(shown, t) for t in english), (shown, english)
    ARTIFACTS.mkdir(exist_ok=True)
    left: dict[str, list[str]] = {}
    for code, language in SHIPPED.items():
        page, frame = page_for(1, code)
        _loaded(frame)
        _admin_section_shown(frame)
        assert frame.locator("html").get_attribute("lang") == language
        texts = frame.locator("html").evaluate(PAGE_TEXTS)
        if found := _english_left(texts, SAME_AS_ENGLISH.get(language, set())):
            left[code] = found
        page.screenshot(path=str(ARTIFACTS / f"flows-page-{language}.png"), full_page=True)
        frame.locator("#admin-section").screenshot(
            path=str(ARTIFACTS / f"admin-section-{language}.png")
        )
        page.close()
    assert left == {}
