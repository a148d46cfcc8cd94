"""Fixtures shared by the flows tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from b24app.models import Portal
from tests.helpers import install, open_app

USER = 2  # an ordinary user of the sandbox's portal "alpha"

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # screenshots of the browser tests
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium, driven by Playwright (a browser download would fail here)."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    # Playwright's sync API keeps an event loop on this thread; Django's ORM calls made by the
    # test itself are still synchronous, so let them through.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def opened(sandbox: Any) -> dict[str, Any]:
    """The app installed on "alpha" and opened by USER: the client, the page token, the portal."""
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, USER)
    return {"client": client, "token": token, "portal": Portal.objects.get()}
