"""Property-based fuzzing (Hypothesis) of every endpoint that takes outside input.

Each test starts from a genuine request (a frame POST, an event, a page's JSON call by a user who
opened the app) and replaces, drops or adds fields with generated values: any text, digits that
are not ASCII ("²".isdigit() is True, int("²") raises), huge and deeply nested values, odd JSON,
odd content types. Two properties hold for every one of them:

- never a 5xx: whatever comes in is answered, and an error in words is a 4xx;
- a refused request (4xx) changes no stored row (`stored_state`).

The sandbox is seeded once per test, not per example; the portal's rate limits are raised (and the
per-user API buckets emptied before each example) so the examples reach the validation behind
them instead of a deliberate 429/503.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import redis as redis_lib
from celery import Task
from django.test import Client
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from b24app.models import Portal
from flows.models import Flow
from tests.helpers import WORKER, install, launch, open_app, sb
from tests.security.conftest import stored_state

pytestmark = pytest.mark.django_db(transaction=True)

FUZZ = settings(
    # 150 keeps the file well under a minute; FLOWPINS_FUZZ_EXAMPLES=5000 for a deeper hunt.
    max_examples=int(os.environ.get("FLOWPINS_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,  # nothing written into the work tree; a failure prints its example
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- values --------------------------------------------------------------------------------------

# Any text a client can send (lone surrogates cannot be encoded as UTF-8 by anyone).
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=200)
# Digits that are not ASCII digits, signs, spaces, exponents, overflow, NULs.
NUMBERISH = st.sampled_from(
    ["²", "٣", "①", "１２", "߀", "𝟗", "3600", "0", "-1", "+5", " 12 ", "1e3", "0x10", "1_000",
     "3.5", "NaN", "99999999999", "9" * 5000, "", " ", "\x00", "1\x00", "12\n"]
)  # fmt: skip
TOKENISH = st.from_regex(r"\A[A-Za-z0-9._\-]{8,80}\Z")
HUGE = st.integers(min_value=2_000, max_value=300_000).map(lambda n: "A" * n)
NESTED = st.integers(min_value=1, max_value=20_000).map(lambda n: "[" * n + "]" * n)
NESTED_OBJECT = st.integers(min_value=1, max_value=3_000).map(lambda n: '{"a":' * n + "1" + "}" * n)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
JSONISH = JSON_VALUES.map(json.dumps)
VALUE = st.one_of(TEXT, NUMBERISH, TOKENISH, HUGE, NESTED, NESTED_OBJECT, JSONISH)
# None drops the field.
FIELD_VALUE = st.none() | VALUE

FRAME_FIELDS = [
    "AUTH_ID",
    "REFRESH_ID",
    "member_id",
    "SERVER_ENDPOINT",
    "AUTH_EXPIRES",
    "APPLICATION_TOKEN",
    "APPLICATION_SCOPE",
    "PLACEMENT",
    "PLACEMENT_OPTIONS",
    "status",
]
CONTENT_TYPES = st.sampled_from(
    [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=koi8-r",
        "application/x-www-form-urlencoded; charset=nonsense",
        "multipart/form-data; boundary=xyz",
        "multipart/form-data",
        "application/json",
        "text/plain",
        "",
    ]
) | TEXT.filter(lambda t: "\n" not in t and "\r" not in t)


@pytest.fixture(autouse=True)
def _keep_background_work_here(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tasks requests queue are kept here, not sent: a Celery worker that an earlier test
    left running would run them and change stored rows between an example's two looks."""
    queued: list[str] = []
    monkeypatch.setattr(Task, "apply_async", lambda task, *a, **k: queued.append(task.name))
    monkeypatch.setitem(WORKER, "running", False)  # so the helpers run queued jobs in-process
    return queued


def _check(response: Any, before: Any) -> None:
    event(f"HTTP {response.status_code}")  # pytest --hypothesis-show-statistics: how deep it got
    assert response.status_code < 500, response.content[:300]
    if 400 <= response.status_code < 500:
        assert stored_state() == before, "a refused request changed stored rows"


def _roomy_limits(sandbox: Any) -> None:
    """The limits are not under test here: the validation behind them is."""
    sb(sandbox, "config", {"portal": "alpha", "rate": 1000, "burst": 100_000})
    Portal.objects.update(rate_per_second=1000, rate_burst=100_000)


def _empty_buckets(redis_client: redis_lib.Redis) -> None:
    keys = list(redis_client.scan_iter(match="fp:bucket:*", count=1000))
    if keys:
        redis_client.delete(*keys)


# --- frame POSTs ---------------------------------------------------------------------------------


@pytest.fixture
def frames(sandbox: Any, settings: Any) -> dict[str, Any]:
    settings.B24_RATE_PER_SECOND, settings.B24_RATE_BURST = 1000.0, 100_000
    client = Client()
    install(client, sandbox)
    _roomy_limits(sandbox)
    return {
        "client": client,
        "/b24/app/": launch(sandbox, "alpha", 2),
        "/b24/install/": launch(sandbox, "alpha", 1, installer=True),
    }


def _frame_request(launched: dict[str, Any], path: str, fields: dict[str, Any], lang: Any) -> Any:
    form = dict(launched["form"])
    for name, value in fields.items():
        if value is None:
            form.pop(name, None)
        else:
            form[name] = value
    query = dict(parse_qsl(urlsplit(launched["url"]).query))
    if lang is not None:
        query["LANG"] = lang
    return form, f"{path}?{urlencode(query)}"


@pytest.mark.parametrize("path", ["/b24/app/", "/b24/install/"])
@FUZZ
@given(
    fields=st.dictionaries(st.sampled_from(FRAME_FIELDS), FIELD_VALUE, max_size=4),
    lang=st.none() | TEXT | st.sampled_from(["ru", "RU", "de", "ru\x00", "е"]),
    urlencoded=st.booleans(),
)
@example(fields={"AUTH_EXPIRES": "²"}, lang=None, urlencoded=True)
@example(fields={"AUTH_EXPIRES": "١٢٣"}, lang=None, urlencoded=False)
@example(fields={"PLACEMENT_OPTIONS": "[" * 5000 + "]" * 5000}, lang=None, urlencoded=True)
@example(
    fields={"PLACEMENT_OPTIONS": '{"a":' * 2000 + "1" + "}" * 2000}, lang=None, urlencoded=True
)
@example(fields={"APPLICATION_SCOPE": "task\x00placement"}, lang=None, urlencoded=True)
@example(fields={"PLACEMENT": "DEFAULT\x00"}, lang="ru\x00", urlencoded=True)
@example(fields={"REFRESH_ID": "A" * 300_000}, lang=None, urlencoded=True)
def test_frame_posts_never_fail_and_refusals_change_nothing(
    frames: dict[str, Any], path: str, fields: dict[str, Any], lang: Any, urlencoded: bool
) -> None:
    form, url = _frame_request(frames[path], path, fields, lang)
    before = stored_state()
    if urlencoded:
        response = frames["client"].post(
            url, data=urlencode(form), content_type="application/x-www-form-urlencoded"
        )
    else:
        response = frames["client"].post(url, data=form)
    _check(response, before)


# --- events --------------------------------------------------------------------------------------


@pytest.fixture
def genuine_event(sandbox: Any, settings: Any) -> dict[str, Any]:
    settings.B24_RATE_PER_SECOND, settings.B24_RATE_BURST = 1000.0, 100_000
    client = Client()
    install(client, sandbox)
    _roomy_limits(sandbox)
    delivered = sb(sandbox, "p/alpha/event", {"event": "ONAPPUPDATE", "deliver": False})
    return {"client": client, "payload": dict(delivered["deliveries"][0]["payload"])}


EVENT_NAMES = st.sampled_from(
    ["ONAPPINSTALL", "ONAPPUPDATE", "ONAPPUNINSTALL", "ONAPPUSERREADY", "ONAPPPAYMENT",
     "onappupdate", " ONAPPUPDATE ", "ONAPPUPDATE\x00", "ONTASKADD"]
) | TEXT  # fmt: skip
BRACKET_KEYS = st.one_of(
    st.sampled_from(
        ["access_token", "refresh_token", "application_token", "member_id", "user_id",
         "expires_in", "expires", "server_endpoint", "client_endpoint", "domain", "scope",
         "status"]
    ).map(lambda k: f"auth[{k}]"),
    TEXT.map(lambda k: f"auth[{k}]"),
    st.sampled_from(["CLEAN", "LANGUAGE_ID", "VERSION"]).map(lambda k: f"data[{k}]"),
    TEXT.map(lambda k: f"data[{k}]"),
    TEXT,
)  # fmt: skip


@FUZZ
@given(
    name=st.none() | EVENT_NAMES,
    fields=st.dictionaries(BRACKET_KEYS, FIELD_VALUE, max_size=5),
    # Mostly Bitrix24's own encoding and body, so most examples get past the parsing.
    content_type=st.one_of(st.none(), st.none(), st.none(), CONTENT_TYPES),
    raw=st.one_of(st.none(), st.none(), st.none(), st.binary(max_size=2000)),
)
@example(name="ONAPPUPDATE", fields={"auth[expires_in]": "²"}, content_type=None, raw=None)
@example(name="ONAPPINSTALL", fields={"auth[scope]": "task\x00"}, content_type=None, raw=None)
@example(name="ONAPPUNINSTALL", fields={"data[CLEAN]": "1"}, content_type=None, raw=None)
@example(name=None, fields={}, content_type="multipart/form-data", raw=b"--x\r\n\r\n")
def test_events_never_fail_and_refusals_change_nothing(
    genuine_event: dict[str, Any],
    name: Any,
    fields: dict[str, Any],
    content_type: Any,
    raw: bytes | None,
) -> None:
    payload = dict(genuine_event["payload"])
    if name is not None:
        payload["event"] = name
    for key, value in fields.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    body = raw if raw is not None else urlencode(payload).encode()
    before = stored_state()
    response = genuine_event["client"].generic(
        "POST",
        "/b24/events/",
        data=body,
        content_type=content_type
        if content_type is not None
        else "application/x-www-form-urlencoded",
    )
    _check(response, before)


# --- the page's JSON endpoints -------------------------------------------------------------------


@pytest.fixture
def page(sandbox: Any, settings: Any, redis_client: redis_lib.Redis) -> dict[str, Any]:
    settings.B24_RATE_PER_SECOND, settings.B24_RATE_BURST = 1000.0, 100_000
    client = Client()
    install(client, sandbox)
    _roomy_limits(sandbox)
    token = open_app(client, sandbox, 2)
    known = sorted(Flow.objects.values_list("flow_id", flat=True))
    assert known, "the user sees no flows: nothing to fuzz the pins with"
    return {"client": client, "token": token, "known": known, "redis": redis_client}


def _flow_id(known: list[int]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(known),
        st.sampled_from(known),
        st.integers(),
        st.integers(min_value=2**31 - 2, max_value=2**64),
        st.booleans(),
        st.floats(allow_nan=True),
        st.sampled_from(["1", "²", str(known[0]), "", None]),
        st.lists(st.sampled_from(known), max_size=3),
    )


def _flow_ids(known: list[int]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(st.sampled_from(known), min_size=1, max_size=30),  # what the page sends
        st.lists(_flow_id(known), max_size=20),
        st.lists(st.sampled_from(known), min_size=490, max_size=520),  # around the cap
        _flow_id(known),
        JSON_VALUES,
    )


def _token(page: dict[str, Any], variant: str) -> str:
    return {
        "valid": page["token"],
        "tampered": page["token"][:-2] + ("AA" if not page["token"].endswith("AA") else "BB"),
        "truncated": page["token"][: len(page["token"]) // 2],
        "other": "eyJwIjoxLCJ1IjoyfQ:1u:forged",
        "empty": "",
    }[variant]


TOKEN_VARIANTS = st.sampled_from(["valid"] * 6 + ["tampered", "truncated", "other", "empty"])


def _api_post(page: dict[str, Any], path: str, body: bytes, content_type: str, token: str) -> Any:
    # generic(), not post(): post() re-encodes the body into the charset the content type names,
    # and fails itself on a charset that does not exist; a real client just sends the bytes.
    return page["client"].generic(
        "POST", path, data=body, content_type=content_type, HTTP_X_FLOWPINS_TOKEN=token
    )


@st.composite
def pin_bodies(draw: Any, known: list[int]) -> bytes:
    shape = draw(st.sampled_from(["click", "click", "mutated", "json", "raw"]))
    if shape == "raw":
        return bytes(draw(st.binary(max_size=3000)))
    if shape == "json":
        return str(draw(JSONISH | NESTED | NESTED_OBJECT | HUGE)).encode()
    document: dict[str, Any] = {
        "flow_ids": draw(st.lists(st.sampled_from(known), min_size=1, max_size=30)),
        "pinned": draw(st.booleans()),
    }
    if shape == "mutated":
        for key in draw(st.sets(st.sampled_from(["flow_ids", "flow_id", "pinned", "extra"]))):
            choice = draw(st.sampled_from(["drop", "replace"]))
            if choice == "drop":
                document.pop(key, None)
            elif key in ("flow_ids", "flow_id"):
                document[key] = draw(_flow_ids(known))
            else:
                document[key] = draw(JSON_VALUES)
    return json.dumps(document).encode()


@FUZZ
@given(data=st.data(), content_type=CONTENT_TYPES, token=TOKEN_VARIANTS)
def test_pin_never_fails_and_refusals_change_nothing(
    page: dict[str, Any], data: Any, content_type: str, token: str
) -> None:
    _empty_buckets(page["redis"])
    body = data.draw(pin_bodies(page["known"]))
    before = stored_state()
    response = _api_post(page, "/flows/api/pin", body, content_type, _token(page, token))
    _check(response, before)


def test_a_genuine_click_gets_through_the_fuzzed_endpoint(page: dict[str, Any]) -> None:
    """The fuzzers above would pass on an endpoint that refuses everything: this one does not."""
    body = json.dumps({"flow_ids": page["known"][:2], "pinned": True}).encode()
    response = _api_post(page, "/flows/api/pin", body, "application/json", page["token"])
    assert response.status_code == 202, response.content[:300]


@FUZZ
@given(
    ids=st.one_of(
        TEXT,
        NUMBERISH,
        HUGE,
        st.lists(st.one_of(NUMBERISH, TEXT, st.integers().map(str)), max_size=50).map(",".join),
    ),
    extra=st.dictionaries(TEXT, TEXT, max_size=3),
    token=TOKEN_VARIANTS,
)
@example(ids="1,²,3", extra={}, token="valid")
@example(ids="," * 5000, extra={}, token="valid")
def test_status_never_fails(
    page: dict[str, Any], ids: str, extra: dict[str, str], token: str
) -> None:
    _empty_buckets(page["redis"])
    query = urlencode({**extra, "ids": ids})
    before = stored_state()
    response = page["client"].get(
        f"/flows/api/status?{query}", HTTP_X_FLOWPINS_TOKEN=_token(page, token)
    )
    _check(response, before)
    assert stored_state() == before  # a read changes nothing, whatever it answers


@st.composite
def add_bodies(draw: Any, known: list[int]) -> bytes:
    shape = draw(st.sampled_from(["flow", "flow", "flow", "raw"]))
    if shape == "raw":
        return bytes(draw(st.binary(max_size=2000) | NESTED.map(str.encode)))
    known_id = draw(st.sampled_from(known))
    flow = draw(
        st.one_of(
            st.just(known_id),
            st.just(str(known_id)),
            st.builds(lambda t: f"https://x.bitrix24.com/company/flows/{known_id}/{t}", TEXT),
            st.builds(lambda t: f"{t} {known_id}", TEXT),
            TEXT,
            NUMBERISH,
            HUGE,
            JSON_VALUES,
            st.integers(),
        )
    )
    return json.dumps({"flow": flow}).encode()


@FUZZ
@given(data=st.data(), content_type=CONTENT_TYPES, token=TOKEN_VARIANTS)
def test_add_never_fails_and_refusals_change_nothing(
    page: dict[str, Any], data: Any, content_type: str, token: str
) -> None:
    _empty_buckets(page["redis"])
    body = data.draw(add_bodies(page["known"]))
    before = stored_state()
    response = _api_post(page, "/flows/api/add", body, content_type, _token(page, token))
    _check(response, before)


@pytest.mark.parametrize("flow", ["²", "flow ١٢", "0", "-5", "99999999999", "x" * 10_000])
def test_add_refuses_what_is_not_a_flow_id(page: dict[str, Any], flow: str) -> None:
    body = json.dumps({"flow": flow}).encode()
    before = stored_state()
    response = _api_post(page, "/flows/api/add", body, "application/json", page["token"])
    assert response.status_code in (400, 404), response.content[:300]
    assert stored_state() == before
