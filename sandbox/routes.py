"""URL routing: which part of the sandbox answers a request (see :mod:`sandbox.server`).

The portal is chosen by the connection's local address (``req.local_host``), never by the
``Host`` header.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from .control import handle_control
from .oauth import handle_server_rest, handle_token
from .pages import render_index, render_portal_page
from .rest import handle_portal_rest, wrong_host
from .state import SandboxState
from .wire import Reply, Request


def route(state: SandboxState, req: Request) -> Reply:
    path = req.path
    if path.startswith("/_sandbox/"):  # on every host: the portal page calls it same-origin
        return handle_control(state, path[len("/_sandbox/") :], req)
    if path.startswith("/p/"):
        return _portal_path(state, req)
    if not state.serves_base(req.local_host):
        return _portal_host_other(state, req)
    if path in ("/oauth/token", "/oauth/token/"):
        return handle_token(state, req)
    if path.startswith("/rest/"):
        return handle_server_rest(state, path[len("/rest/") :], req)
    if path == "/":
        with state.lock:
            return Reply.html(200, render_index(state))
    return Reply.error(404, "NOT_FOUND", f"Nothing at {path}")


def _portal_host_other(state: SandboxState, req: Request) -> Reply:
    """A portal host serves only its portal: ``/`` leads to the page, the rest is 404."""
    with state.lock:
        portal = state.portal_on_host(req.local_host)
        if req.path == "/" and portal is not None:
            return Reply.redirect(state.page_url(portal))
        return Reply.error(
            404,
            "NOT_FOUND",
            f"Nothing at {req.path} on a portal host; the OAuth server is {state.base_url}",
        )


def _portal_path(state: SandboxState, req: Request) -> Reply:
    name, _, rest = req.path[len("/p/") :].partition("/")
    if rest.startswith("rest/"):
        return handle_portal_rest(state, name, rest[len("rest/") :], req)
    with state.lock:
        found, portal = state.locate(req.local_host, name)
        if found == "moved" and portal is not None:
            return Reply.redirect(state.location(portal, rest, req.query))
        if found == "wrong_host" and portal is not None and state.serves_base(req.local_host):
            # A person who types the base address gets the page on the portal's own host;
            # REST on a wrong host stays a 404, so the app must use the address it was given.
            return Reply.redirect(state.location(portal, rest, req.query))
        if found == "wrong_host":
            return wrong_host(state, name, req.local_host, portal)
        if portal is None:
            return Reply.html(404, "<!doctype html><title>404</title><h1>No such portal</h1>")
        if rest != "":
            return Reply.html(404, "<!doctype html><title>404</title><h1>Not found</h1>")
        if not req.path.endswith("/"):
            return Reply.redirect(state.location(portal, "", req.query))
        query = parse_qs(req.query)

        def first(key: str, default: str = "") -> str:
            return query.get(key, [default])[0]

        user_text = first("user", "1")
        return Reply.html(
            200,
            render_portal_page(
                state,
                portal,
                user_id=int(user_text) if user_text.isdigit() else 1,
                lang=first("lang"),
                auto_open=first("open") in ("1", "true", "yes"),
                installer=first("installer") in ("1", "true", "yes"),
                placement=first("placement", "DEFAULT").upper() or "DEFAULT",
            ),
        )
