"""XSS: flow names are the portal's data, typed by anyone who may create a flow. They must
render as text everywhere, and the page runs only the scripts the server put there."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import Any

import pytest
from django.test import Client

from tests.helpers import install, launch, open_page, post_frame, sb, state
from tests.security.framing import portal_origin

pytestmark = pytest.mark.django_db(transaction=True)

NASTY = [
    '"><img src=x onerror=alert(1)>',
    "</script><script>alert(2)</script>",
    "<svg/onload=alert(3)>",
    "' onmouseover='alert(4)' x='",
    "{{ 7|add:7 }}{% now 'Y' %}",
    "javascript:alert(5)//",
    "</td></tr></table><iframe src=//evil.example>",
]


class Page(HTMLParser):
    """What a browser builds from the page: its elements, its text, and its JSON data blocks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.json_blocks: list[str] = []
        self._script: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None

    def handle_data(self, data: str) -> None:
        if self._script is None:
            self.text.append(data)
        elif self._script.get("type") == "application/json":
            self.json_blocks.append(data)

    def data_strings(self) -> list[str]:
        """Every string the page hands to its script as data (names go in with textContent)."""
        found: list[str] = []

        def walk(value: Any) -> None:
            if isinstance(value, str):
                found.append(value)
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, list):
                for v in value:
                    walk(v)

        for block in self.json_blocks:
            walk(json.loads(block))
        return found


def test_flow_names_with_markup_render_as_text_and_only_our_scripts_run(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    for name in NASTY:
        sb(sandbox, "p/alpha/flows", {"count": 1, "visible_to_all": True, "name_prefix": name})
    response = open_page(client, sandbox, 2)
    page = Page()
    page.feed(response.content.decode())

    # Each name reaches the page whole (not evaluated), as text or as a JSON string.
    delivered = page.text + page.data_strings()
    for nasty in NASTY:
        assert any(nasty in piece for piece in delivered), nasty
    # No element and no event handler came from a flow name.
    assert not {t for t, _ in page.tags} & {"img", "svg", "iframe", "object", "embed"}
    assert [(t, k) for t, a in page.tags for k in a if k.startswith("on")] == []
    # The only script that runs is ours, with the nonce the CSP names; data blocks are inert.
    nonce = re.search(r"'nonce-([^']+)'", response["Content-Security-Policy"])
    assert nonce
    scripts = [a for t, a in page.tags if t == "script"]
    runnable = [a for a in scripts if a.get("type") != "application/json"]
    assert len(runnable) == 1 and runnable[0].get("nonce") == nonce.group(1)


def test_every_page_carries_a_strict_csp_and_nosniff(sandbox: Any) -> None:
    client = Client()
    installer = install(client, sandbox)
    page = post_frame(client, launch(sandbox, "alpha", 2, lang="en"))
    origin = portal_origin(sandbox, "alpha")  # where the portal's page is, not what we stored
    for response in (installer, page):
        csp = response["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";") if d.strip())
        assert directives["default-src"] == "'self'"
        assert "'unsafe-inline'" not in directives["script-src"]
        assert "'unsafe-eval'" not in directives["script-src"]
        assert re.search(r"'nonce-[\w-]{16,}'", directives["script-src"])
        assert directives["frame-ancestors"] == f"'self' {origin}"  # the portal, nobody else
        # An injected <base>, <form> or plugin cannot move scripts, posts or code elsewhere.
        assert directives["base-uri"] == "'none'"
        assert directives["form-action"] == "'self'"
        assert directives["object-src"] == "'none'"
        assert response["X-Content-Type-Options"] == "nosniff"
    # A fresh nonce for every page: one leaked nonce does not open the next page.
    again = post_frame(client, launch(sandbox, "alpha", 2, lang="en"))
    assert again["Content-Security-Policy"] != page["Content-Security-Policy"]


def test_refusals_and_json_answers_never_render_input_as_html(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    reflected = client.post(
        "/b24/events/",
        data="event=<script>alert(1)</script>&auth[member_id]=x",
        content_type="application/x-www-form-urlencoded",
    )
    assert reflected.status_code == 400
    assert reflected["Content-Type"].startswith("text/plain")
    assert reflected["X-Content-Type-Options"] == "nosniff"

    nasty = NASTY[0]
    sb(sandbox, "p/alpha/flows", {"count": 1, "visible_to_all": True, "name_prefix": nasty})
    flow_id = max(f["id"] for f in state(sandbox)["flows"])
    html = post_frame(client, launch(sandbox, "alpha", 2, lang="en")).content.decode()
    token = re.search(r'data-token="([^"]+)"', html)
    assert token
    added = client.post(
        "/flows/api/add",
        data=json.dumps({"flow": str(flow_id)}),
        content_type="application/json",
        HTTP_X_FLOWPINS_TOKEN=token.group(1),
    )
    assert added.status_code == 200
    assert added["Content-Type"] == "application/json"
    assert added["X-Content-Type-Options"] == "nosniff"
    assert added.json()["flow"]["name"].startswith(nasty)  # data, for textContent on the page
