"""A page of the app may be framed by the portal it was opened for and by nobody else — not even
another portal that installed the app. Each sandbox portal has its own origin (its own loopback
host), so the policy can be told apart portal by portal."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.helpers import install, launch, post_frame
from tests.security.framing import frame_ancestors, portal_origin

pytestmark = pytest.mark.django_db(transaction=True)


def test_each_portals_pages_may_be_framed_by_that_portal_only(sandbox: Any) -> None:
    client = Client()
    installed = {name: install(client, sandbox, name) for name in ("alpha", "beta")}
    origins = {name: portal_origin(sandbox, name) for name in ("alpha", "beta")}
    assert origins["alpha"] != origins["beta"]  # two installed portals the policy can tell apart

    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        page = post_frame(client, launch(sandbox, name, 2))
        assert page.status_code == 200, page.content[:300]
        for answer in (installed[name], page):
            assert frame_ancestors(answer) == ["'self'", origins[name]]
            assert origins[other] not in answer["Content-Security-Policy"]
