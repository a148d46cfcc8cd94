"""Queues by urgency (settings.CELERY_TASK_ROUTES), on the private stack's own broker: every task
lands on its queue, a retry comes back on the queue it left, and a storm of list refreshes
against a slow portal does not stand in front of a click."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import yaml
from django.test import Client

from b24app.celery import app as celery_app
from b24app.models import Portal
from b24app.queues import (
    BULK_QUEUE,
    CLICKS_QUEUE,
    FLOWPINS_QUEUES,
    HOUSEKEEPING_QUEUE,
    REFRESH_QUEUE,
)
from flows.models import PinIntent
from tests.faults.conftest import PrivateStack
from tests.faults.drive import click_http
from tests.faults.stack import wait_until
from tests.helpers import install, open_app, portal_pins, sb, state, visible_to

ROOT = Path(__file__).resolve().parents[2]

# Where each task must land: a click's work, the reads that come in storms, the sweeps.
EXPECTED = {
    "flows.converge": CLICKS_QUEUE,
    "flows.add_flow": CLICKS_QUEUE,
    "flows.refresh_snapshot": REFRESH_QUEUE,
    "flows.admin_check": REFRESH_QUEUE,
    "flows.admin_bindings": REFRESH_QUEUE,
    "flows.prune_intents": HOUSEKEEPING_QUEUE,
    "b24app.prune_call_log": HOUSEKEEPING_QUEUE,
    "b24app.keep_tokens_alive": HOUSEKEEPING_QUEUE,
    "b24app.bind_handlers": HOUSEKEEPING_QUEUE,
    "b24app.confirm_uninstall": HOUSEKEEPING_QUEUE,
}

# The storm: list refreshes of a portal that takes STORM_LATENCY_MS over every call, on a
# background worker with two threads — at least STORM_JOBS * latency / 2 = 60 s of work.
STORM_JOBS = 300
STORM_LATENCY_MS = 400
# A click on an idle clicks worker settles in well under a second; this leaves room for a
# loaded machine and is still a small fraction of the storm.
CLICK_SECONDS = 5.0


def _broker(stack: PrivateStack) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(stack.redis.url(0))


def _tasks_in(broker: redis_lib.Redis, queue: str) -> list[str]:
    return [json.loads(raw)["headers"]["task"] for raw in broker.lrange(queue, 0, -1)]


def test_the_app_routes_every_task_it_has_and_compose_runs_a_worker_for_every_queue() -> None:
    """A new task must be given a queue on purpose (an unrouted one would land on the clicks
    queue); compose's workers between them take every queue, its pin worker clicks first."""
    celery_app.loader.import_default_modules()
    ours = {name for name in celery_app.tasks if not name.startswith("celery.")}
    assert ours == set(EXPECTED)

    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]

    def queues(service: str) -> list[str]:
        command = services[service]["command"]
        return str(command[command.index("--queues") + 1]).split(",")

    assert queues("worker") == [CLICKS_QUEUE, BULK_QUEUE]  # in that order: clicks first
    assert sorted(queues("worker") + queues("worker-background")) == sorted(FLOWPINS_QUEUES)


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_each_task_is_published_to_its_queue(private_stack: PrivateStack) -> None:
    broker = _broker(private_stack)
    with celery_app.connection_for_write(private_stack.redis.url(0)) as conn:
        for name in EXPECTED:  # nothing consumes the private broker yet
            celery_app.send_task(name, kwargs={"portal_id": 0}, connection=conn)

    landed = {name: queue for queue in FLOWPINS_QUEUES for name in _tasks_in(broker, queue)}
    assert landed == EXPECTED


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_convergence_retry_comes_back_on_the_clicks_queue(
    sandbox: Any, private_stack: PrivateStack
) -> None:
    """The portal fails the first runs (5xx): each retry is published with its message's own
    routing, so a worker that takes only the clicks queue holds it, and finishes the pin."""
    client = Client()
    install(client, sandbox, "beta")
    token = open_app(client, sandbox, 2, "beta")
    flow = visible_to(sandbox, 2, "beta")[0]
    private_stack.worker(name="clicks", queues=[CLICKS_QUEUE])
    sb(sandbox, "config", {"portal": "beta", "error_5xx_ratio": 1.0})
    assert click_http(private_stack.web_url, token, [flow], True).status_code == 202

    broker = _broker(private_stack)

    def a_retry_held() -> list[Any]:
        """Retried convergence messages the worker holds for their countdown, as kombu keeps
        them: [message, exchange, routing key]."""
        held = [json.loads(raw) for raw in broker.hvals("unacked")]
        return [
            entry
            for entry in held
            if entry[0]["headers"]["task"] == "flows.converge"
            and entry[0]["headers"]["retries"] >= 1
        ]

    retried = wait_until(a_retry_held, 30, "a retried convergence run", step=0.02)
    # Published to the default exchange (""), which delivers to the queue the key names.
    assert {(exchange, key) for _, exchange, key in retried} == {("", CLICKS_QUEUE)}
    sb(sandbox, "config", {"portal": "beta", "error_5xx_ratio": None})

    wait_until(
        lambda: PinIntent.objects.filter(status=PinIntent.Status.DONE).exists(), 40, "the pin"
    )
    assert portal_pins(sandbox, 2, "beta") == {flow}


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_refresh_storm_against_a_slow_portal_does_not_delay_a_click(
    sandbox: Any, private_stack: PrivateStack
) -> None:
    """Production's shape: a worker for the clicks queue, one for the background queues. A storm
    of list refreshes for alpha's users (alpha answers slowly) is queued, then a user of beta
    clicks: the click settles at once, while most of the storm still waits."""
    client = Client()
    install(client, sandbox, "alpha")
    install(client, sandbox, "beta")
    users = (1, 2, 3)
    for user in users:
        open_app(client, sandbox, user, "alpha")
    token = open_app(client, sandbox, 2, "beta")
    flow = visible_to(sandbox, 2, "beta")[0]
    alpha = Portal.objects.get(member_id=state(sandbox, "alpha")["member_id"])
    # Room in every bucket (ours and the sandbox's): the storm is slow because the portal is.
    roomy = {"B24_RATE_PER_SECOND": "1000", "B24_RATE_BURST": "1000"}
    slow = {"latency_ms": STORM_LATENCY_MS, "rate": 1000, "burst": 1000}
    sb(sandbox, "config", {"portal": "alpha", **slow})
    private_stack.worker(name="background", queues=[REFRESH_QUEUE, HOUSEKEEPING_QUEUE], **roomy)
    private_stack.worker(name="clicks", queues=[CLICKS_QUEUE], **roomy)

    with celery_app.connection_for_write(private_stack.redis.url(0)) as conn:
        for n in range(STORM_JOBS):
            kwargs = {"portal_id": alpha.pk, "user_id": users[n % len(users)], "force": True}
            celery_app.send_task("flows.refresh_snapshot", kwargs=kwargs, connection=conn)
    broker = _broker(private_stack)
    wait_until(lambda: broker.llen(REFRESH_QUEUE) < STORM_JOBS, 10, "the storm to start")

    clicked = time.monotonic()
    assert click_http(private_stack.web_url, token, [flow], True).status_code == 202
    wait_until(
        lambda: PinIntent.objects.filter(status=PinIntent.Status.DONE).exists(),
        CLICK_SECONDS,
        "the click to settle during the storm",
        step=0.02,
    )
    settled = time.monotonic() - clicked
    waiting = broker.llen(REFRESH_QUEUE)

    assert portal_pins(sandbox, 2, "beta") == {flow}
    # The storm had hardly begun: what still waits needs the background worker far longer.
    storm_left = waiting * STORM_LATENCY_MS / 1000 / 2
    assert storm_left > 10 * CLICK_SECONDS > 10 * settled, (waiting, settled)


# Other people's Pin all on a slow portal: BULK_USERS runs of BULK_FLOWS flows, each several
# requests of BULK_LATENCY_MS, one after another on a worker with one thread.
BULK_USERS = 4
BULK_FLOWS = 100
BULK_LATENCY_MS = 300
CLICKERS = 3


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_clicks_are_taken_before_other_peoples_pin_all_waiting_on_the_same_worker(
    sandbox: Any, private_stack: PrivateStack
) -> None:
    """One worker takes every queue with one thread, as a small deployment may. Four people on
    alpha click Pin all (their runs wait on the bulk queue); then three people on beta click one
    flow each. The worker takes the clicks as soon as its thread is free — all three before any
    Pin all still waiting — instead of after all of them (one queue), or taking turns with
    them (kombu's default round robin over a worker's queues)."""
    client = Client()
    install(client, sandbox, "alpha")
    install(client, sandbox, "beta")
    users = sb(sandbox, "p/alpha/users", {"count": BULK_USERS})["users"]
    sb(sandbox, "p/alpha/flows", {"count": BULK_FLOWS, "visible_to_all": True})
    clickers = [2, *sb(sandbox, "p/beta/users", {"count": CLICKERS - 1})["users"]]
    sb(sandbox, "p/beta/flows", {"count": 2, "visible_to_all": True})
    tokens = {("alpha", u): open_app(client, sandbox, u, "alpha") for u in users}
    tokens |= {("beta", u): open_app(client, sandbox, u, "beta") for u in clickers}
    private_stack.worker(
        name="single", concurrency=1, B24_RATE_PER_SECOND="1000", B24_RATE_BURST="1000"
    )

    def click(key: tuple[str, int], flows: list[int], pinned: bool) -> int:
        return click_http(private_stack.web_url, tokens[key], flows, pinned).status_code

    def first_flow(key: tuple[str, int]) -> list[int]:
        return visible_to(sandbox, key[1], key[0])[:1]

    # A click is refused until the worker has loaded that person's list.
    wait_until(lambda: all(click(k, first_flow(k), False) == 202 for k in tokens), 60, "lists")
    wait_until(lambda: not PinIntent.objects.filter(status="pending").exists(), 30, "a quiet start")
    slow = {"portal": "alpha", "latency_ms": BULK_LATENCY_MS, "rate": 1000, "burst": 1000}
    sb(sandbox, "config", slow)
    for user in users:
        assert click(("alpha", user), visible_to(sandbox, user, "alpha"), True) == 202
    alpha = Portal.objects.get(member_id=state(sandbox, "alpha")["member_id"])
    beta = Portal.objects.get(member_id=state(sandbox, "beta")["member_id"])

    def alpha_users_pending() -> set[int]:
        pending = PinIntent.objects.filter(portal=alpha, status=PinIntent.Status.PENDING)
        return set(pending.values_list("user_id", flat=True))

    wait_until(lambda: len(alpha_users_pending()) < BULK_USERS, 30, "the first Pin all to run")
    for user in clickers:
        assert click(("beta", user), first_flow(("beta", user)), True) == 202
    wait_until(
        lambda: (
            PinIntent.objects.filter(
                portal=beta, status=PinIntent.Status.DONE, desired=True
            ).count()
            == CLICKERS
        ),
        60,
        "the clicks to settle",
        step=0.02,
    )
    still_waiting = alpha_users_pending()
    assert all(portal_pins(sandbox, u, "beta") == set(first_flow(("beta", u))) for u in clickers)
    # Taken after at most the Pin all that had the thread: at least two still wait.
    assert len(still_waiting) >= BULK_USERS - 2, still_waiting
