"""The open page keeps itself current: the snapshot's version answers "unchanged" cheaply, a
page that wants a fresher list gets one queued, flows added by id survive an older list, and a
Pin all at any size is sent and polled in chunks that fit the request limits."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from django.test import Client

from b24app.models import Portal
from b24app.redisconn import redis_client
from flows import apiauth, listing, page, snapshots, tasks
from flows.models import Flow
from tests.flows.conftest import USER
from tests.helpers import api, install, open_app, sb, state, visible_to, worker_paused

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The list refreshes sent to the broker during the test (they are still sent)."""
    sent: list[dict[str, Any]] = []
    original = tasks.refresh_snapshot.apply_async

    def spy(*args: Any, **kw: Any) -> Any:
        sent.append(dict(kw.get("kwargs") or {}))
        return original(*args, **kw)

    monkeypatch.setattr(tasks.refresh_snapshot, "apply_async", spy)
    return sent


def _age_snapshot(portal: Portal, seconds: float) -> None:
    """Make the user's snapshot look `seconds` older, as time passing would."""
    for key in (snapshots.snapshot_key(portal, USER), snapshots.meta_key(portal, USER)):
        data = json.loads(redis_client().get(key))
        data["fetched_at"] -= seconds
        redis_client().set(key, json.dumps(data))


def _refresh_now(portal: Portal) -> None:
    """A list refresh landing (what the worker does), run here."""
    tasks.refresh_snapshot(portal_id=portal.pk, user_id=USER, force=True)


def test_rows_since_the_shown_version_answer_unchanged_until_a_refresh_lands(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    client, token, portal = opened["client"], opened["token"], opened["portal"]
    first = api(client, token, "GET", "/flows/api/rows").json()
    version = first["version"]
    assert first["loading"] is False and first["rows"]
    same = api(client, token, "GET", f"/flows/api/rows?since={version}").json()
    assert same["unchanged"] is True and "rows" not in same and same["version"] == version
    created = sb(sandbox, "p/alpha/flow", {"name": "Поток, созданный только что"})["created"]
    renamed = first["rows"][0]["id"]
    sb(sandbox, "p/alpha/flow", {"id": renamed, "name": "Новое имя", "active": False})
    _refresh_now(portal)
    changed = api(client, token, "GET", f"/flows/api/rows?since={version}").json()
    assert changed["version"] > version and "unchanged" not in changed
    by_id = {row["id"]: row for row in changed["rows"]}
    assert created in by_id
    assert (by_id[renamed]["name"], by_id[renamed]["active"]) == ("Новое имя", False)


def test_a_page_asking_for_a_fresher_list_gets_one_refresh_queued(
    sandbox: Any, opened: dict[str, Any], enqueued: list[dict[str, Any]]
) -> None:
    client, token, portal = opened["client"], opened["token"], opened["portal"]
    version = api(client, token, "GET", "/flows/api/rows").json()["version"]
    young = api(client, token, "GET", f"/flows/api/rows?since={version}&max_age=0").json()
    assert young["refreshing"] is False and enqueued == []  # seconds old: nothing to add
    _age_snapshot(portal, 40)
    fine = api(client, token, "GET", f"/flows/api/rows?since={version}&max_age=60").json()
    assert fine["refreshing"] is False and enqueued == []  # young enough for this page
    asked = api(client, token, "GET", f"/flows/api/rows?since={version}&max_age=30").json()
    assert asked["refreshing"] is True and asked["unchanged"] is True
    again = api(client, token, "GET", f"/flows/api/rows?since={version}&max_age=30").json()
    assert again["refreshing"] is True
    assert len(enqueued) == 1  # one refresh in flight, however often the page asks


def test_a_page_open_refreshes_any_snapshot_but_one_only_seconds_old(
    sandbox: Any, opened: dict[str, Any], enqueued: list[dict[str, Any]]
) -> None:
    client, portal = opened["client"], opened["portal"]
    assert open_app(client, sandbox, USER) and enqueued == []  # fetched a moment ago
    _age_snapshot(portal, listing.REFRESH_SKIP_SECONDS + 1)  # well under the old 20 s
    open_app(client, sandbox, USER)
    assert len(enqueued) == 1


def test_a_flow_added_by_id_survives_a_list_fetched_before_the_add(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    client, token, portal = opened["client"], opened["token"], opened["portal"]
    before = snapshots.get(portal, USER)
    assert before is not None
    hidden = sb(sandbox, "p/alpha/flow", {"name": "Только по ссылке", "access": ["U2"]})["created"]
    started = time.time() - 1  # a fetch that asked before the add and lands after it
    added = api(client, token, "POST", "/flows/api/add", {"flow": f"/flow/{hidden}/"}).json()
    assert added["flow"]["id"] == hidden and added["version"] > before.version
    older_list = snapshots.Snapshot(flows=list(before.flows), fetched_at=started, source="list")
    landed = snapshots.put(portal, USER, older_list, started=started)
    assert hidden in {f.flow_id for f in landed.flows} and landed.version > added["version"]
    newer_list = snapshots.Snapshot(flows=list(before.flows), fetched_at=time.time(), source="list")
    truth = snapshots.put(portal, USER, newer_list, started=time.time())
    assert hidden not in {f.flow_id for f in truth.flows}  # a later list tells the truth


def test_status_by_post_names_only_the_asked_flows_and_at_most_a_chunk(
    sandbox: Any, opened: dict[str, Any]
) -> None:
    client, token = opened["client"], opened["token"]
    rows = api(client, token, "GET", "/flows/api/rows").json()["rows"]
    first, second = rows[0]["id"], rows[1]["id"]
    pinned = api(
        client, token, "POST", "/flows/api/pin", {"flow_ids": [first, second], "pinned": True}
    )
    assert pinned.status_code in (202, 503)
    one = api(client, token, "POST", "/flows/api/status", {"flow_ids": [first]})
    assert [i["flow_id"] for i in one.json()["intents"]] == [first]
    assert api(client, token, "POST", "/flows/api/status", {"flow_ids": []}).json() == {
        "intents": []
    }
    too_many = list(range(1, apiauth.MAX_FLOWS_PER_REQUEST + 2))
    assert (
        api(client, token, "POST", "/flows/api/status", {"flow_ids": too_many}).status_code == 400
    )
    for bad in ({"flow_ids": "1,2"}, {"flow_ids": [True]}, {"flow_ids": [-1]}, ["x"]):
        assert api(client, token, "POST", "/flows/api/status", bad).status_code == 400
    legacy = api(client, token, "GET", f"/flows/api/status?ids={second}").json()["intents"]
    assert [i["flow_id"] for i in legacy] == [second]


def test_a_pin_all_of_a_thousand_flows_fits_the_per_user_limits(sandbox: Any) -> None:
    """Two chunks of 500, then ten rounds of status polls (two chunks each), back to back —
    faster than the page sends them — and nothing is refused."""
    client = Client()
    install(client, sandbox)
    sb(sandbox, "p/alpha/flows", {"count": 1000, "visible_to_all": True})
    token = open_app(client, sandbox, USER)
    ids = [row["id"] for row in api(client, token, "GET", "/flows/api/rows").json()["rows"]]
    ids = ids[:1000]
    assert len(ids) == 1000
    chunk = apiauth.MAX_FLOWS_PER_REQUEST
    chunks = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
    too_big = api(client, token, "POST", "/flows/api/pin", {"flow_ids": ids, "pinned": True})
    assert too_big.status_code == 400  # the API caps a request at 500 ids
    for part in chunks:
        answer = api(client, token, "POST", "/flows/api/pin", {"flow_ids": part, "pinned": True})
        assert answer.status_code in (202, 503), answer.content[:300]
        assert len(answer.json()["intents"]) == len(part)
    for _ in range(10):
        for part in chunks:
            polled = api(client, token, "POST", "/flows/api/status", {"flow_ids": part})
            assert polled.status_code == 200, polled.content[:300]
            assert len(polled.json()["intents"]) == len(part)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, "1 поток закреплён"),
        (2, "2 потока закреплены"),
        (5, "5 потоков закреплено"),
        (11, "11 потоков закреплено"),
        (21, "21 поток закреплён"),
        (124, "124 потока закреплены"),
        (111, "111 потоков закреплено"),
        (1001, "1001 поток закреплён"),
    ],
)
def test_the_page_script_gets_russian_plural_forms_it_can_pick_from(n: int, expected: str) -> None:
    """What the page's script does with what the server hands it (it has no ngettext)."""
    from django.utils import translation

    with translation.override("ru"):
        plurals = page.plurals_js(
            {
                "pinned_n": lambda k: translation.ngettext(
                    "%(count)s flow pinned", "%(count)s flows pinned", k
                )
            }
        )
    index = plurals["index"]
    form = int(index[n] if n < 200 else index[100 + n % 100])
    assert plurals["forms"]["pinned_n"][form].replace("%(count)s", str(n)) == expected


def _rest(sandbox: Any) -> dict[str, Any]:
    counters = state(sandbox)["counters"]
    return {"requests": counters["requests"], **counters["calls"]}


def test_without_flow_list_a_list_takes_one_request_per_50_tasks_and_per_50_flows(
    sandbox: Any,
) -> None:
    """An older portal: the flows of the user's tasks (pages of 50) and every flow known on the
    portal, read with Flow.get 50 to a batch request — never a request per flow."""
    with worker_paused():  # nothing but the fetch below talks to the portal meanwhile
        client = Client()
        install(client, sandbox)
        # Flows with tasks: user 2 is responsible for one task of each (and not for the others).
        sb(sandbox, "p/alpha/flows", {"count": 100, "access": ["U2"], "tasks_per_flow": 3})
        open_app(client, sandbox, 1)  # the admin's list teaches the app every flow
        open_app(client, sandbox, USER)
        sb(sandbox, "config", {"portal": "alpha", "flow_list_enabled": False})
        portal = Portal.objects.get()
        with sandbox.state.lock:  # the seeded data, by the sandbox's own visibility rule
            seeded = sandbox.state.portals["alpha"]
            user = seeded.users[USER]
            task_flows = [
                t.flow_id
                for t in seeded.tasks.values()
                if t.flow_id and seeded.can_see_task(user, t)
            ]
        known = set(Flow.objects.filter(portal=portal).values_list("flow_id", flat=True))
        asked = known | set(task_flows)
        assert len(task_flows) > 100 and len(asked) > 100  # several pages of each
        before = _rest(sandbox)
        listing.refresh(portal.pk, USER, force=True)
        after = _rest(sandbox)
    spent = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    pages = max(1, -(-len(task_flows) // 50))  # `next` until the last page
    batches = -(-len(asked) // 50)
    assert spent == {
        "requests": 1 + pages + batches,  # Flow.list, refused as unknown, is the first
        "tasks.task.list": pages,
        "batch": batches,
        "tasks.flow.Flow.get": len(asked),
    }
    snap = snapshots.get(portal, USER)
    assert snap is not None and snap.source == "tasks"
    assert sorted(f.flow_id for f in snap.flows) == visible_to(sandbox, USER)


def test_on_an_older_portal_a_flow_without_a_task_is_added_by_its_link_and_remembered(
    sandbox: Any,
) -> None:
    client = Client()
    install(client, sandbox)
    sb(sandbox, "config", {"portal": "alpha", "flow_list_enabled": False})
    no_task = sb(sandbox, "p/alpha/flow", {"name": "Без задач", "access": ["U2"]})["created"]
    hidden = sb(sandbox, "p/alpha/flow", {"name": "Не для него", "access": ["U3"]})["created"]
    token = open_app(client, sandbox, USER)
    portal = Portal.objects.get()
    shown = [row["id"] for row in api(client, token, "GET", "/flows/api/rows").json()["rows"]]
    assert no_task in visible_to(sandbox, USER) and no_task not in shown  # no task: not found
    link = f"https://alpha.example/workgroups/group/0/tasks/flow/?ID={no_task}"
    added = api(client, token, "POST", "/flows/api/add", {"flow": link})
    assert added.status_code == 200 and added.json()["flow"]["id"] == no_task
    assert Flow.objects.get(portal=portal, flow_id=no_task).source == Flow.Source.USER
    redis_client().delete(snapshots.snapshot_key(portal, USER), snapshots.meta_key(portal, USER))
    listing.refresh(portal.pk, USER, force=True)  # a later list still has it: it is remembered
    rows = [row["id"] for row in api(client, token, "GET", "/flows/api/rows").json()["rows"]]
    assert no_task in rows
    refused = api(client, token, "POST", "/flows/api/add", {"flow": str(hidden)})
    assert refused.status_code == 404
    assert not Flow.objects.filter(portal=portal, flow_id=hidden).exists()
    assert hidden not in [
        row["id"] for row in api(client, token, "GET", "/flows/api/rows").json()["rows"]
    ]
