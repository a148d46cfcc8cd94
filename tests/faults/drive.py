"""Driving the app the way a user does: open it from the portal, click, wait for the worker."""

from __future__ import annotations

import json
import time
from typing import Any

import requests
from django.test import Client

from flows.models import PinIntent

TOKEN_HEADER = "X-Flowpins-Token"


def click(client: Client, token: str, flow_ids: list[int], pinned: bool) -> Any:
    """A click on the page, through the in-process app (the session's worker takes the task)."""
    return client.post(
        "/flows/api/pin",
        data=json.dumps({"flow_ids": flow_ids, "pinned": pinned}),
        content_type="application/json",
        HTTP_X_FLOWPINS_TOKEN=token,
    )


def click_http(
    base: str, token: str, flow_ids: list[int], pinned: bool, timeout: float = 5
) -> requests.Response:
    """A click through a separate web process over HTTP, with a bounded wait."""
    return requests.post(
        f"{base}/flows/api/pin",
        json={"flow_ids": flow_ids, "pinned": pinned},
        headers={TOKEN_HEADER: token},
        timeout=timeout,
    )


def wait_settled(seconds: float, *, expected: int | None = None) -> list[PinIntent]:
    """Wait until no intent is pending (and `expected` exist); returns them all."""
    deadline = time.monotonic() + seconds
    while True:
        intents = list(PinIntent.objects.order_by("user_id", "flow_id"))
        pending = [i for i in intents if i.status == PinIntent.Status.PENDING]
        if not pending and (expected is None or len(intents) == expected):
            return intents
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(pending)} intent(s) still pending after {seconds:.0f}s: {pending[:5]}"
            )
        time.sleep(0.2)


def desired_pins(intents: list[PinIntent], user_id: int) -> set[int]:
    return {i.flow_id for i in intents if i.user_id == user_id and i.desired}


def assert_all_done_and_true(intents: list[PinIntent]) -> None:
    """Every intent finished, and what the app believes is what the user asked for."""
    wrong = [i for i in intents if i.status != PinIntent.Status.DONE or i.observed != i.desired]
    assert not wrong, wrong
