"""Where Bitrix24 shows the app, declared once: each placement's code, the view that renders it,
its title and options. Features register theirs when Django starts (their AppConfig.ready);
install binds every one that has a title, and the app's handler URL dispatches by the
`PLACEMENT` Bitrix24 posts. The portal layer never imports a feature.

A new placement (a task-card tab, say): write its view (it gets `request.portal`,
`request.b24user` and `request.frame`, verified), then `register(Placement("TASK_VIEW_TAB",
view, title=...))` in the feature's `ready()`; `b24app.views.app` dispatches to it.
Reinstalling, or the rebind on ONAPPUPDATE, binds it on portals that have the app already.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.http import HttpRequest, HttpResponse

from b24app import langs
from b24app.frame import VerifiedFrame
from b24app.models import Portal, PortalUser
from b24app.stored import AlsoRead

DEFAULT = "DEFAULT"  # the app's own page (opened from the Applications list); never bound


class FrameRequest(HttpRequest):
    """A frame POST that `b24app.views.frame_entry` verified: who opened the app, and what
    Bitrix24 said (the verified fields, PLACEMENT_OPTIONS among them)."""

    portal: Portal
    b24user: PortalUser
    frame: VerifiedFrame


@dataclass(frozen=True)
class Placement:
    code: str  # what Bitrix24 posts as PLACEMENT (and what placement.bind takes)
    view: Callable[[FrameRequest], HttpResponse]
    # The title Bitrix24 shows: an English msgid, shown in each Bitrix24 language from the
    # catalogs, or given per Bitrix24 language ("en" is the fallback). None: not bound (DEFAULT).
    title: str | dict[str, str] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # placement.bind's OPTIONS
    # One more value read with the portal and the user when this placement opens (one query).
    also: AlsoRead | None = None


_REGISTRY: dict[str, Placement] = {}


def register(placement: Placement) -> None:
    if placement.code in _REGISTRY and _REGISTRY[placement.code] != placement:
        raise ValueError(f"placement {placement.code} is registered twice")
    _REGISTRY[placement.code] = placement


def find(code: str) -> Placement:
    """The placement Bitrix24 opened; the app's own page for any code not registered (the page
    every placement of this app showed before there was more than one)."""
    found = _REGISTRY.get(code) or _REGISTRY.get(DEFAULT)
    if found is None:
        raise LookupError("no feature registered the app's page")
    return found


def bound() -> list[Placement]:
    """The placements install binds."""
    return [p for p in _REGISTRY.values() if p.code != DEFAULT and p.title is not None]


def bind_commands(handler: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """placement.unbind then placement.bind for each bound placement: one batch's commands,
    idempotent on reinstall (each binding exists exactly once afterwards)."""
    commands: dict[str, tuple[str, dict[str, Any]]] = {}
    for placement in bound():
        assert placement.title is not None
        titles = placement.title
        if isinstance(titles, str):
            titles = langs.in_every_language(titles)
        key = placement.code.lower()
        commands[f"unbind_{key}"] = (
            "placement.unbind",
            {"PLACEMENT": placement.code, "HANDLER": handler},
        )
        bind: dict[str, Any] = {
            "PLACEMENT": placement.code,
            "HANDLER": handler,
            "TITLE": titles.get("en", next(iter(titles.values()))),
            "LANG_ALL": {lang: {"TITLE": title} for lang, title in titles.items()},
        }
        if placement.options:
            bind["OPTIONS"] = placement.options
        commands[f"bind_{key}"] = ("placement.bind", bind)
    return commands
