"""Correlated logs: with LOG_FORMAT=json a web process and a Celery worker write one JSON object
per line, and the worker's lines for a task carry the request id, member_id and user id of the
web request that queued it, with the task's id; no line holds a secret.

A private stack (its own Redis, a gunicorn web and a worker, both LOG_FORMAT=json), so the
session's worker never takes these tasks and the worker log holds only this test's lines."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from django.conf import settings
from django.test import Client

from b24app.logcontext import FIELDS
from b24app.models import Portal, PortalUser
from devtools.procs import worker_command
from devtools.supervisor import Process, start
from flows.models import PinIntent
from tests.faults.stack import RedisServer, start_web, wait_until
from tests.helpers import (
    frame_path,
    install,
    launch,
    page_token,
    portal_pins,
    visible_to,
    worker_paused,
)

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

USER = 2


@dataclass
class JsonStack:
    base: str
    web_log: Path
    worker_log: Path
    worker: Process


@pytest.fixture(scope="module")
def _redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def json_stack(
    worker_env: dict[str, str], _redis: RedisServer, tmp_path: Path
) -> Iterator[JsonStack]:
    """gunicorn and a worker with LOG_FORMAT=json on a private broker; the session's worker is
    paused meanwhile (it shares the database, and its sweep would converge this user too)."""
    _redis.flush()
    env = {
        **worker_env,
        "REDIS_URL": _redis.url(0),
        "CELERY_BROKER_URL": _redis.url(0),
        "LOG_FORMAT": "json",
    }
    with worker_paused():
        web, base = start_web(env, tmp_path / "web.log")
        worker_log = tmp_path / "worker.log"
        cmd = worker_command(concurrency=2, hostname="jsonlogs@%h", quiet=True)
        worker = start("celery worker", cmd, env=env, log=worker_log)
        try:
            worker.wait_for_log("ready.", 40)
            yield JsonStack(base, tmp_path / "web.log", worker_log, worker)
        finally:
            worker.stop(signal.SIGTERM)
            web.stop()


def open_over_http(base: str, sandbox: Any, secrets: list[str]) -> list[requests.Response]:
    """Open the app from the portal as USER against the web process until the page has its
    rows (a first open shows a loading state while the worker fetches the list): every page."""
    pages: list[requests.Response] = []

    def opened() -> bool:
        launched = launch(sandbox, "alpha", USER)
        secrets.extend(launched["form"][k] for k in ("AUTH_ID", "REFRESH_ID", "APPLICATION_TOKEN"))
        page = requests.post(base + frame_path(launched), data=launched["form"], timeout=10)
        assert page.status_code == 200, page.text[:300]
        pages.append(page)
        return 'data-loading="1"' not in page.text

    wait_until(opened, 30, "the worker to fetch the flow list", step=0.3)
    return pages


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, each of which must be one JSON object with the context fields."""
    text = path.read_text()
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]  # not one in writing
    lines = [line for line in complete.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"a worker log line is not JSON: {line[:300]!r}")
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message", *FIELDS} <= entry.keys(), line
        parsed.append(entry)
    return parsed


def task_lines(lines: list[dict[str, Any]], task: str) -> dict[str, list[dict[str, Any]]]:
    """The lines of each run of `task` (by task id), found by Celery's own "succeeded" line."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for entry in lines:
        found = re.search(rf"Task {re.escape(task)}\[([0-9a-f-]+)\] succeeded", entry["message"])
        if found:
            runs[found.group(1)] = [e for e in lines if e["task_id"] == found.group(1)]
    return runs


def test_a_click_s_request_id_member_and_user_reach_the_worker_lines_of_its_task(
    sandbox: Any, json_stack: JsonStack
) -> None:
    install(Client(), sandbox)
    portal = Portal.objects.get()
    secrets: list[str] = [settings.B24_CLIENT_SECRET, settings.SECRET_KEY]
    pages = open_over_http(json_stack.base, sandbox, secrets)
    assert 'data-loading="1"' in pages[0].text  # a first open: the list is fetched by a task
    opened_id = pages[0].headers["X-Request-ID"]
    token = page_token(pages[-1])
    secrets.append(token)
    flow = visible_to(sandbox, USER)[0]
    answer = requests.post(
        f"{json_stack.base}/flows/api/pin",
        json={"flow_id": flow, "pinned": True},
        headers={"X-Flowpins-Token": token},
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    click_id = answer.headers["X-Request-ID"]
    assert click_id != opened_id
    wait_until(lambda: flow in portal_pins(sandbox, USER), 30, "the pin to reach the portal")

    def converged() -> dict[str, list[dict[str, Any]]]:
        runs = task_lines(json_lines(json_stack.worker_log), "flows.converge")
        return {k: v for k, v in runs.items() if any(e["request_id"] == click_id for e in v)}

    runs = wait_until(converged, 20, "the converge task's lines with the click's request id")
    assert PinIntent.objects.get(flow_id=flow).status == PinIntent.Status.DONE
    for task_id, entries in runs.items():
        for entry in entries:  # every line of that task: the click's request, portal and user
            assert (entry["request_id"], entry["member_id"], entry["user_id"]) == (
                click_id,
                portal.member_id,
                USER,
            ), entry
            assert entry["task_id"] == task_id
    # The list fetch the first open queued carries that open's request id the same way (the
    # frame's verification put the member_id and user on it).
    lines = json_lines(json_stack.worker_log)
    fetches = task_lines(lines, "flows.refresh_snapshot")
    assert any(
        all(
            (e["request_id"], e["member_id"], e["user_id"]) == (opened_id, portal.member_id, USER)
            for e in entries
        )
        for entries in fetches.values()
    ), fetches

    user = PortalUser.objects.get(portal=portal, user_id=USER)
    secrets += [user.access_token, user.refresh_token, portal.application_token]
    secrets = [s for s in secrets if s]
    for path in (json_stack.worker_log, json_stack.web_log):
        text = path.read_text()
        leaked = [s[:6] + "…" for s in secrets if s in text]
        assert not leaked, f"{path.name} holds secrets: {leaked}"


def test_a_request_id_is_honoured_only_when_it_is_a_short_plain_token(db: Any) -> None:
    client = Client()
    given = client.get("/ping", HTTP_X_REQUEST_ID="lb-7f3a9c2e.1")
    assert given.headers["X-Request-ID"] == "lb-7f3a9c2e.1"
    refused = (
        "x",
        "a" * 65,
        "abc def ghi",
        'id"\n{"level":"CRITICAL"}',
        "abcdefgh\n",
        "ok-id\r\nX: 1",
    )
    for forged in refused:
        answer = client.get("/ping", HTTP_X_REQUEST_ID=forged)
        assert re.fullmatch(r"[0-9a-f-]{36}", answer.headers["X-Request-ID"]), forged
    assert (
        client.get("/ping").headers["X-Request-ID"] != client.get("/ping").headers["X-Request-ID"]
    )
