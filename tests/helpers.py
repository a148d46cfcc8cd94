"""Test helpers that drive the simulated portal the way Bitrix24 drives the app."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import requests
from django.test import Client


def sb(sandbox: Any, path: str, payload: dict[str, Any] | None = None) -> Any:
    """Call the sandbox's control API (POST with a payload, GET without)."""
    url = f"{sandbox.url}/_sandbox/{path.lstrip('/')}"
    if payload is None:
        response = requests.get(url, timeout=10)
    else:
        response = requests.post(url, json=payload, timeout=30)
    response.raise_for_status()
    return response.json()


def state(sandbox: Any, portal: str = "alpha") -> dict[str, Any]:
    data = sb(sandbox, f"state?portal={portal}")
    return data["portals"][portal] if "portals" in data else data


def launch(sandbox: Any, portal: str = "alpha", user_id: int = 1, **extra: Any) -> dict[str, Any]:
    """What Bitrix24 would POST into the frame for this user (fresh tokens each time)."""
    return sb(sandbox, f"p/{portal}/launch", {"user_id": user_id, **extra})


def frame_path(launched: dict[str, Any]) -> str:
    url = urlsplit(launched["url"])
    return f"{url.path}?{url.query}" if url.query else url.path


def post_frame(client: Client, launched: dict[str, Any], **overrides: str) -> Any:
    form = {**launched["form"], **overrides}
    return client.post(frame_path(launched), data=form)


def install(client: Client, sandbox: Any, portal: str = "alpha") -> Any:
    """Install the app on a sandbox portal as its admin, as the installer frame does."""
    launched = launch(sandbox, portal, 1, installer=True)
    response = post_frame(client, launched)
    assert response.status_code == 200, response.content[:500]
    sb(sandbox, f"p/{portal}/install_finish", {})
    return response


def page_token(response: Any) -> str:
    """The signed token a rendered app page carries for its own requests."""
    match = re.search(r'data-token="([^"]+)"', response.content.decode())
    assert match, "the page carries no token"
    return match.group(1)


def open_page(
    client: Client, sandbox: Any, user_id: int, portal: str = "alpha", lang: str = "en"
) -> Any:
    """Open the app as this user, as the portal's frame does; the page must render."""
    response = post_frame(client, launch(sandbox, portal, user_id, lang=lang))
    assert response.status_code == 200, response.content[:400]
    return response


def open_app(
    client: Client, sandbox: Any, user_id: int, portal: str = "alpha", lang: str = "en"
) -> str:
    """Open the app as this user; returns the page token."""
    return page_token(open_page(client, sandbox, user_id, portal, lang))


def visible_to(sandbox: Any, user_id: int, portal: str = "alpha") -> list[int]:
    """The flows Bitrix24 lets this user see, by the sandbox's own rules."""
    return sorted(f["id"] for f in state(sandbox, portal)["flows"] if user_id in f["visible_to"])


def portal_pins(sandbox: Any, user_id: int, portal: str = "alpha") -> set[int]:
    """What Bitrix24 itself records as pinned for this user."""
    return set(state(sandbox, portal)["pins"].get(str(user_id), []))
