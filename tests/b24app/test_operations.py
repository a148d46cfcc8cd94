"""What the engineer on call uses: the Django admin (never a token on screen) and
`manage.py portals`."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client

from b24app.models import Portal, PortalUser
from tests.helpers import install, launch, post_frame, state

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


def test_the_portals_command_reports_state_and_rest_health(sandbox: Any) -> None:
    install(Client(), sandbox)
    Portal.objects.update(state=Portal.State.NEEDS_REINSTALL, state_reason="PAYMENT_REQUIRED: x")
    out = StringIO()
    call_command("portals", stdout=out)
    text = out.getvalue()
    assert state(sandbox)["domain"] in text
    assert "needs_reinstall" in text and "PAYMENT_REQUIRED" in text
    line = next(row for row in text.splitlines() if state(sandbox)["domain"] in row)
    assert " 1 " in line  # the installer's batch call is counted


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
