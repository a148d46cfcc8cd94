"""What a warm render keeps between requests (the page shell per language, the sorted rows per
snapshot version, the app.info answer) never carries one user's rows, token, nonce or language
into another's page, and a new snapshot version or a new intent shows in the very next render."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from django.core import signing
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from b24app import frame
from b24app.models import Portal
from b24app.redisconn import redis_client
from flows import apiauth, snapshots, tasks
from flows.models import PinIntent
from tests.helpers import install, launch, open_page, post_frame, sb, state, visible_to

pytestmark = pytest.mark.django_db(transaction=True)


def rows(response: Any) -> list[dict[str, Any]]:
    match = re.search(
        r'<script id="fp-rows" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    assert match
    return list(json.loads(match.group(1)))


def page_data(response: Any) -> dict[str, Any]:
    match = re.search(
        r'<script id="fp-page" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    assert match
    return dict(json.loads(match.group(1)))


def token_claims(response: Any) -> dict[str, Any]:
    token = re.search(r'data-token="([^"]+)"', response.content.decode())
    assert token
    return dict(signing.loads(token.group(1), salt=apiauth.TOKEN_SALT))


def nonces(response: Any) -> set[str]:
    return set(re.findall(r'<script nonce="([^"]+)"', response.content.decode()))


def csp_nonce(response: Any) -> str:
    found = re.search(r"'nonce-([^']+)'", response["Content-Security-Policy"])
    assert found
    return found.group(1)


def test_warm_pages_of_two_users_two_portals_and_two_languages_never_mix(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox, "alpha")
    install(client, sandbox, "beta")
    portals = {
        name: Portal.objects.get(member_id=state(sandbox, name)["member_id"])
        for name in ("alpha", "beta")
    }
    PinIntent.objects.create(
        portal=portals["alpha"],
        user_id=2,
        flow_id=visible_to(sandbox, 2, "alpha")[-1],
        desired=True,
        observed=True,
        status=PinIntent.Status.DONE,
    )
    people = [("alpha", 2, "ru"), ("alpha", 3, "en"), ("beta", 2, "en"), ("beta", 3, "ru")]
    for name, user_id, lang in people:  # every list fetched: the next opens are warm
        open_page(client, sandbox, user_id, name, lang)
    # Every list with the same version and fetch time: only who it belongs to tells them apart.
    same = time.time()
    for name, user_id, _ in people:
        for key in (
            snapshots.snapshot_key(portals[name], user_id),
            snapshots.meta_key(portals[name], user_id),
        ):
            data = json.loads(redis_client().get(key))  # type: ignore[arg-type]
            data.update(version=7, fetched_at=same)
            redis_client().set(key, json.dumps(data), ex=600)
    domains = {name: Portal.objects.get(pk=p.pk).domain for name, p in portals.items()}
    assert domains["alpha"] not in domains["beta"] and domains["beta"] not in domains["alpha"]
    for _ in range(2):  # twice round: each page after another's, from what the first kept
        for name, user_id, lang in people:
            response = post_frame(client, launch(sandbox, name, user_id, lang=lang))
            assert response.status_code == 200
            shown = rows(response)
            assert sorted(r["id"] for r in shown) == visible_to(sandbox, user_id, name)
            pinned = [r["id"] for r in shown if r["pinned"]]
            if (name, user_id) == ("alpha", 2):
                assert pinned == [visible_to(sandbox, 2, "alpha")[-1]] == [shown[0]["id"]]
                assert shown[0]["intent"]["message"] == "Закреплён."
            else:
                assert pinned == [] and all(r["intent"] is None for r in shown), (name, user_id)
            claims = token_claims(response)
            assert claims == {
                "p": portals[name].pk,
                "u": user_id,
                "l": lang,
                "m": portals[name].member_id,
            }
            assert nonces(response) == {csp_nonce(response)}
            html = response.content.decode()
            other = "beta" if name == "alpha" else "alpha"
            assert domains[name] in html and domains[other] not in html
            if lang == "ru":
                assert "Поиск потоков" in html and "Search flows" not in html
            else:
                assert "Search flows" in html and "Поиск потоков" not in html
            assert page_data(response)["version"] == snapshots.meta(portals[name], user_id).version  # type: ignore[union-attr]


def test_a_new_snapshot_version_shows_in_the_next_render(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    first = open_page(client, sandbox, 2)
    portal = Portal.objects.get()
    victim = rows(first)[0]
    created = sb(sandbox, "p/alpha/flow", {"name": "Поток, созданный только что"})["created"]
    sb(sandbox, "p/alpha/flow", {"id": victim["id"], "name": "Переименованный поток"})
    again = post_frame(client, launch(sandbox, "alpha", 2, lang="en"))
    assert created not in [r["id"] for r in rows(again)]  # the same version: the same rows
    tasks.refresh_snapshot(portal_id=portal.pk, user_id=2, force=True)  # a refresh lands
    after = post_frame(client, launch(sandbox, "alpha", 2, lang="en"))
    by_id = {r["id"]: r for r in rows(after)}
    assert created in by_id and by_id[victim["id"]]["name"] == "Переименованный поток"
    assert page_data(after)["version"] > page_data(first)["version"]


def test_a_new_or_changed_intent_shows_in_the_next_render(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    shown = rows(open_page(client, sandbox, 2))
    last = shown[-1]["id"]
    intent = PinIntent.objects.create(
        portal=Portal.objects.get(),
        user_id=2,
        flow_id=last,
        desired=True,
        status=PinIntent.Status.PENDING,
    )
    pending = rows(post_frame(client, launch(sandbox, "alpha", 2, lang="en")))
    row = next(r for r in pending if r["id"] == last)
    assert row["pinned"] is False and row["intent"]["status"] == "pending"
    assert row["intent"]["message"] == "Pinning…"
    PinIntent.objects.filter(pk=intent.pk).update(observed=True, status=PinIntent.Status.DONE)
    done = rows(post_frame(client, launch(sandbox, "alpha", 2, lang="en")))
    assert done[0]["id"] == last and done[0]["pinned"] is True
    PinIntent.objects.filter(pk=intent.pk).update(desired=False, observed=False)
    unpinned = rows(post_frame(client, launch(sandbox, "alpha", 2, lang="en")))
    assert [r["id"] for r in unpinned] == [r["id"] for r in shown]  # back in name order
    assert all(not r["pinned"] for r in unpinned)


def test_a_snapshot_gone_while_its_version_lingers_renders_the_loading_state(
    sandbox: Any,
) -> None:
    client = Client()
    install(client, sandbox)
    open_page(client, sandbox, 2)
    portal = Portal.objects.get()
    redis_client().delete(snapshots.snapshot_key(portal, 2))  # the meta key stays
    response = post_frame(client, launch(sandbox, "alpha", 2, lang="en"))
    assert 'data-loading="1"' in response.content.decode() and rows(response) == []
    assert page_data(response)["version"] is None


@pytest.fixture
def app_info_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The app.info questions the frame asks the OAuth server (they are still asked)."""
    asked: list[str] = []
    original = frame.oauth.app_info

    def spy(server_endpoint: str, access_token: str, **kw: Any) -> Any:
        asked.append(access_token)
        return original(server_endpoint, access_token, **kw)

    monkeypatch.setattr(frame.oauth, "app_info", spy)
    return asked


def test_a_warm_reopen_reads_neither_the_snapshot_nor_app_info_again(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch, app_info_calls: list[str]
) -> None:
    client = Client()
    install(client, sandbox)
    open_page(client, sandbox, 2)
    launched = launch(sandbox, "alpha", 2)
    assert post_frame(client, launched).status_code == 200
    asked = len(app_info_calls)
    read: list[str] = []
    original = snapshots.get

    def counting(portal: Portal, user_id: int) -> snapshots.Snapshot | None:
        read.append("snapshot")
        return original(portal, user_id)

    monkeypatch.setattr(snapshots, "get", counting)
    with CaptureQueriesContext(connection) as queries:
        response = post_frame(client, launched)
    assert response.status_code == 200 and rows(response)
    assert read == []  # the sorted rows of this version were kept
    assert len(queries.captured_queries) == 1
    assert len(app_info_calls) == asked


def test_an_app_info_answer_is_trusted_no_longer_than_before(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch, app_info_calls: list[str]
) -> None:
    client = Client()
    install(client, sandbox)
    launched = launch(sandbox, "alpha", 2)
    assert post_frame(client, launched).status_code == 200
    asked = len(app_info_calls)
    assert post_frame(client, launched).status_code == 200
    assert len(app_info_calls) == asked  # kept
    keys = list(redis_client().scan_iter(match="fp:verify:*"))
    assert keys and all(0 < redis_client().ttl(k) <= 300 for k in keys)
    assert all(launched["form"]["AUTH_ID"].encode() not in redis_client().get(k) for k in keys)  # type: ignore[operator]
    later = time.time() + 301
    monkeypatch.setattr(frame.VOUCHED, "clock", lambda: later)  # the answer's time has passed
    assert post_frame(client, launched).status_code == 200
    assert len(app_info_calls) == asked + 1


def test_with_verifications_not_cached_every_open_asks_bitrix24_and_still_works(
    sandbox: Any, settings: Any, app_info_calls: list[str]
) -> None:
    """B24_VERIFY_CACHE_SECONDS=0: nothing is trusted beyond its request — and nothing breaks
    (a zero expiry must not reach Redis, which refuses it)."""
    settings.B24_VERIFY_CACHE_SECONDS = 0
    client = Client()
    install(client, sandbox)
    launched = launch(sandbox, "alpha", 2)
    asked = len(app_info_calls)
    assert post_frame(client, launched).status_code == 200
    assert post_frame(client, launched).status_code == 200
    assert len(app_info_calls) == asked + 2
    assert not list(redis_client().scan_iter(match="fp:verify:*"))
