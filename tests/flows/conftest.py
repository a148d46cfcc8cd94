"""Fixtures shared by the flows tests."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from b24app.models import Portal
from tests.helpers import install, open_app

USER = 2  # an ordinary user of the sandbox's portal "alpha"


@pytest.fixture
def opened(sandbox: Any) -> dict[str, Any]:
    """The app installed on "alpha" and opened by USER: the client, the page token, the portal."""
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, USER)
    return {"client": client, "token": token, "portal": Portal.objects.get()}
