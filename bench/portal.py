"""Helpers over the app's own database and the sandbox's portals, shared by the sections."""

from __future__ import annotations

import os
import time
from typing import Any

from bench.stack import Stack


def setup_django(stack: Stack) -> None:
    os.environ.update(
        {
            k: v
            for k, v in stack.env.items()
            if k not in os.environ
            or k
            in {
                "DJANGO_SETTINGS_MODULE",
                "DATABASE_URL",
                "REDIS_URL",
                "DEBUG",
                "SECRET_KEY",
                "B24_TOKEN_KEY",
                "B24_OAUTH_SERVERS",
                "B24_APP_BASE_URL",
                "ALLOWED_HOSTS",
                "B24_ALLOW_HTTP",
            }
        }
    )
    import django

    django.setup()


def portal_pk(stack: Stack, name: str) -> int:
    from b24app.models import Portal

    return int(Portal.objects.get(member_id=stack.portal_state(name)["member_id"]).pk)


def wait_all_settled(seconds: float) -> float:
    """Wait until no pin intent is pending; returns when that happened (monotonic)."""
    from django.db import connection

    from flows.models import PinIntent

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not PinIntent.objects.filter(status=PinIntent.Status.PENDING).exists():
            return time.monotonic()
        connection.close()
        time.sleep(0.05)
    raise RuntimeError("pins did not settle in time")


def set_limits(stack: Stack, names: list[str], rate: float, burst: int) -> None:
    """The same bucket on both sides: the sandbox's and the app's shared limiter."""
    import redis

    from b24app.models import Portal

    for name in names:
        stack.sb("config", {"portal": name, "rate": rate, "burst": burst})
    Portal.objects.update(rate_per_second=rate, rate_burst=burst)
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    keys = list(client.scan_iter(match="fp:rl:*"))
    if keys:
        client.delete(*keys)


def prepare(stack: Stack, names: list[str], flows: int, users: list[int]) -> dict[str, Any]:
    """Install, generate flows, open the app for each user — with a generous bucket, so the
    set-up does not eat the budget the measurement starts with."""
    stack.reset()
    for name in names:
        stack.sb("config", {"portal": name, "rate": 1000, "burst": 5000})
        stack.install(name)
        if flows:
            stack.sb(
                f"p/{name}/flows",
                {"count": flows, "visible_to_all": True, "name_prefix": "Bench flow"},
            )
    tokens: dict[str, Any] = {}
    for name in names:
        for user in users:
            tokens[(name, user)] = stack.open_app(name, user)[0]
    time.sleep(0.3)  # let the sandbox's bucket drain at the generous rate
    return tokens


def generated_flow_ids(stack: Stack, name: str) -> list[int]:
    return sorted(
        f["id"] for f in stack.portal_state(name)["flows"] if f["name"].startswith("Bench flow")
    )
