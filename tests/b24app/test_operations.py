"""What the engineer on call uses: the Django admin (never a token on screen) and
`manage.py portals`."""

from __future__ import annotations

import re
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from b24app.models import Portal, PortalUser, RestCall
from tests.helpers import install, launch, post_frame

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_admin_shows_portals_and_users_but_no_token(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200
    portal = Portal.objects.get()
    user = PortalUser.objects.get(user_id=2)
    User.objects.create_superuser("ops", "ops@example.invalid", "a-long-password-1")
    admin = Client()
    admin.force_login(User.objects.get(username="ops"))
    pages = [
        admin.get("/admin/b24app/portal/"),
        admin.get(f"/admin/b24app/portal/{portal.pk}/change/"),
        admin.get("/admin/b24app/portaluser/"),
        admin.get(f"/admin/b24app/portaluser/{user.pk}/change/"),
        admin.get("/admin/b24app/restcall/"),
    ]
    assert all(p.status_code == 200 for p in pages)
    html = "".join(p.content.decode() for p in pages)
    assert portal.domain in html and portal.member_id in html
    for secret in (user.access_token, user.refresh_token, portal.application_token):
        assert secret and secret not in html


def _portals_table(*args: str) -> dict[str, dict[str, str]]:
    """`manage.py portals` parsed into columns by its header, keyed by domain."""
    out = StringIO()
    call_command("portals", *args, stdout=out)
    header, rule, *rows = out.getvalue().splitlines()
    names = header.replace("last call", "last_call").split()
    assert names == [
        "domain", "member_id", "state", "users", "reopen", "calls", "errors", "503s", "last_call",
    ]  # fmt: skip
    assert set(rule) == {"-"}
    table: dict[str, dict[str, str]] = {}
    row = re.compile(
        r"^(\S+) +(\S+) +(\S+(?: !)?) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+)  "
        r"(never|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)$"
    )
    last = ""
    for line in rows:
        if line.startswith("    reason: "):
            table[last]["reason"] = line.removeprefix("    reason: ")
            continue
        match = row.match(line)
        assert match, f"not a row of the table: {line!r}"
        last = match.group(1)
        table[last] = dict(zip(names, match.groups(), strict=True))
    return table


def test_the_portals_command_reports_each_portals_state_users_and_rest_health() -> None:
    """Every column counts its own thing for its own portal, within the window asked for."""
    now = timezone.now()
    busy = Portal.objects.create(
        member_id="a" * 32,
        domain="busy.bitrix24.com",
        state=Portal.State.NEEDS_REINSTALL,
        state_reason="PAYMENT_REQUIRED: x",
    )
    quiet = Portal.objects.create(member_id="b" * 32, domain="quiet.bitrix24.com")
    for user_id in range(1, 5):  # 4 active users
        PortalUser.objects.create(portal=busy, user_id=user_id)
    for user_id in (10, 11):  # 2 who must open the app again
        PortalUser.objects.create(portal=busy, user_id=user_id, state=PortalUser.State.NEEDS_REOPEN)
    PortalUser.objects.create(portal=quiet, user_id=1)

    def calls(
        portal: Portal, count: int, hours_ago: float, error: str = "", status: int = 200
    ) -> None:
        for _ in range(count):
            RestCall.objects.create(
                member_id=portal.member_id,
                method="tasks.flow.Flow.pin",
                http_status=status,
                error=error,
                created_at=now - timedelta(hours=hours_ago),
            )

    # Within the last day on `busy`: 5 fine, 3 rate-limited (503), 2 other errors -> 10 calls.
    calls(busy, 5, hours_ago=2)
    calls(busy, 3, hours_ago=3, error="QUERY_LIMIT_EXCEEDED", status=503)
    calls(busy, 2, hours_ago=4, error="ACCESS_DENIED", status=403)
    newest = RestCall.objects.create(
        member_id=busy.member_id,
        method="batch",
        http_status=200,
        created_at=now - timedelta(hours=1),
    )
    # Two days ago on `busy` (outside the default window): 7 calls, 6 of them rate-limited.
    calls(busy, 1, hours_ago=48)
    calls(busy, 6, hours_ago=49, error="QUERY_LIMIT_EXCEEDED", status=503)
    # Another portal's calls are its own.
    calls(quiet, 1, hours_ago=30, error="QUERY_LIMIT_EXCEEDED", status=503)

    table = _portals_table()
    assert sorted(table) == ["busy.bitrix24.com", "quiet.bitrix24.com"]
    assert table["busy.bitrix24.com"] == {
        "domain": "busy.bitrix24.com",
        "member_id": "a" * 12,
        "state": "needs_reinstall !",
        "users": "4",
        "reopen": "2",
        "calls": "11",
        "errors": "5",
        "503s": "3",
        "last_call": newest.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        "reason": "PAYMENT_REQUIRED: x",
    }
    assert table["quiet.bitrix24.com"] == {
        "domain": "quiet.bitrix24.com",
        "member_id": "b" * 12,
        "state": "active",
        "users": "1",
        "reopen": "0",
        "calls": "0",
        "errors": "0",
        "503s": "0",
        "last_call": "never",
    }

    wider = _portals_table("--hours", "72")
    assert [wider["busy.bitrix24.com"][c] for c in ("calls", "errors", "503s")] == ["18", "11", "9"]
    assert [wider["quiet.bitrix24.com"][c] for c in ("calls", "errors", "503s")] == ["1", "1", "1"]


def test_the_portals_command_says_when_no_portal_is_installed() -> None:
    out = StringIO()
    call_command("portals", stdout=out)
    assert out.getvalue().splitlines()[2:] == ["(no portals installed yet)"]


@pytest.mark.services
def test_a_worker_yields_the_cpu_to_the_web(celery_worker_process: Any) -> None:
    """Web and workers on the same cores: a click is answered first, convergence takes what is
    left — the worker runs FLOWPINS_WORKER_NICE below the process that started it."""
    import os

    from django.conf import settings

    ours = os.getpriority(os.PRIO_PROCESS, 0)
    worker = os.getpriority(os.PRIO_PROCESS, celery_worker_process.pid)
    assert settings.FLOWPINS_WORKER_NICE == 10
    assert worker - ours == min(settings.FLOWPINS_WORKER_NICE, 19 - ours)


def test_a_portals_calls_since_midnight_are_found_by_one_index() -> None:
    """The admin's view and `manage.py portals` ask for one portal's calls since midnight:
    with a call log of days of many portals, that is one index's range, not a scan of the
    portal's calls of every day kept."""
    from django.db import connection, transaction

    from b24app.status import today_start

    midnight = today_start()
    RestCall.objects.bulk_create(
        RestCall(
            member_id=f"{n % 50:032d}", method="batch", created_at=midnight - timedelta(minutes=n)
        )
        for n in range(5000)
    )
    calls = RestCall.objects.filter(member_id="0" * 32, created_at__gte=midnight)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("ANALYZE b24app_restcall")
        cursor.execute("SET LOCAL enable_seqscan = off")  # a small table is cheaper to scan
        plan = calls.explain()
    assert "restcall_member_since" in plan, plan
    assert "BitmapAnd" not in plan, plan
