"""Placements are declared once: install binds every registered one in Bitrix24, and the app's
one handler URL renders the placement Bitrix24 names, with the verified portal and user."""

from __future__ import annotations

from typing import Any

import pytest
from django.http import HttpResponse, JsonResponse
from django.test import Client

from b24app import placements
from b24app.placements import FrameRequest, Placement
from tests.helpers import install, launch, post_frame, state
from tests.security.framing import frame_ancestors, portal_origin

pytestmark = pytest.mark.django_db(transaction=True)


def _task_tab(request: FrameRequest) -> HttpResponse:
    """A second feature's widget: says whom it was opened for and with what options."""
    return JsonResponse(
        {
            "member_id": request.portal.member_id,
            "user_id": request.b24user.user_id,
            "task": request.frame.placement_options.get("taskId"),
        }
    )


@pytest.fixture
def task_tab(monkeypatch: pytest.MonkeyPatch) -> Placement:
    registry = dict(placements._REGISTRY)
    tab = Placement("TASK_VIEW_TAB", _task_tab, title={"en": "Pins", "ru": "Закрепления"})
    registry[tab.code] = tab
    monkeypatch.setattr(placements, "_REGISTRY", registry)
    return tab


def test_install_binds_every_registered_placement_once(sandbox: Any, task_tab: Placement) -> None:
    client = Client()
    install(client, sandbox)
    install(client, sandbox)  # a reinstall: still one binding each
    bound = sorted((p["placement"], p["handler"]) for p in state(sandbox)["placements"])
    app_url = "http://127.0.0.1:8000/b24/app/"
    assert bound == [("LEFT_MENU", app_url), ("TASK_VIEW_TAB", app_url)]


def test_a_placement_opens_its_own_view_with_the_verified_portal_and_user(
    sandbox: Any, task_tab: Placement
) -> None:
    client = Client()
    install(client, sandbox)
    opened = launch(sandbox, "alpha", 2, placement="TASK_VIEW_TAB", placement_options={"taskId": 7})
    answer = post_frame(client, opened)
    assert answer.status_code == 200, answer.content[:300]
    assert answer.json() == {"member_id": state(sandbox)["member_id"], "user_id": 2, "task": 7}
    assert frame_ancestors(answer) == ["'self'", portal_origin(sandbox, "alpha")]
    # The user is whoever Bitrix24 says the token belongs to, whatever else the form holds.
    other = post_frame(client, opened, AUTH_ID=launch(sandbox, "alpha", 3)["form"]["AUTH_ID"])
    assert other.status_code == 200 and other.json()["user_id"] == 3
    # And a token Bitrix24 does not vouch for opens nothing.
    assert post_frame(client, opened, AUTH_ID="forged-token-000000").status_code == 403


def test_a_placement_code_nobody_registered_shows_the_apps_own_page(sandbox: Any) -> None:
    """Bitrix24 opens only bound placements; a POST naming another one gets the main page."""
    client = Client()
    install(client, sandbox)
    answer = post_frame(client, launch(sandbox, "alpha", 2), PLACEMENT="TASK_VIEW_SIDEBAR")
    assert answer.status_code == 200
    assert 'data-token="' in answer.content.decode()  # the flows page


def test_the_menu_item_is_titled_in_every_language_bitrix24_shows_it_in(sandbox: Any) -> None:
    install(Client(), sandbox)
    (menu,) = [p for p in state(sandbox)["placements"] if p["placement"] == "LEFT_MENU"]
    titles = {code: item["TITLE"] for code, item in menu["lang_all"].items()}
    # As the shipped catalogs say it; Kazakh and Belarusian portals read the app in Russian.
    expected = {
        "en": "Flow Pins",
        "ru": "Закрепление потоков",
        "ua": "Закріплення потоків",
        "de": "Angeheftete Flows",
        "la": "Flujos fijados",
        "br": "Fluxos fixados",
        "pl": "Przypięte przepływy",
        "kz": "Закрепление потоков",
        "by": "Закрепление потоков",
        "fr": "Flow Pins",
        "sc": "Flow Pins",
    }
    assert {code: titles.get(code) for code in expected} == expected
    assert menu["title"] == "Flow Pins"
