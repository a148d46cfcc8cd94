"""The control API's view of the state: ``GET /_sandbox/state`` (call with the lock held)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .model import Portal

if TYPE_CHECKING:
    from .state import SandboxState


def snapshot(state: SandboxState, portal_name: str | None = None) -> dict[str, Any]:
    """Everything, or only the portal ``portal_name``."""
    portals = (
        [state.portals[portal_name]] if portal_name is not None else list(state.portals.values())
    )
    return {
        "base_url": state.base_url,
        "distinct_hosts": state.distinct_hosts,
        "server_endpoint": state.server_endpoint,
        "app_url": state.app_url,
        "client_id": state.client_id,
        "knobs": asdict(state.knobs),
        "aliases": dict(state.aliases),
        "oauth": {"unknown_refresh_failures": state.oauth_unknown_failures},
        "portals": {p.name: portal_snapshot(state, p) for p in portals},
    }


def portal_snapshot(state: SandboxState, portal: Portal) -> dict[str, Any]:
    knobs = state.knobs_for(portal)
    return {
        "name": portal.name,
        "seed_name": portal.seed_name,
        "member_id": portal.member_id,
        **_address_view(state, portal),
        "language": portal.language,
        "installed": portal.installed,
        "application_token": portal.application_token,
        "app_version": portal.app_version,
        "scope": knobs.scope,
        "placements": _placements_view(portal),
        "events": _events_view(portal),
        "users": _users_view(portal),
        "flows": _flows_view(portal),
        "task_count": len(portal.tasks),
        "pins": {str(uid): portal.pinned(uid) for uid in sorted(portal.users)},
        "pin_log": list(portal.pin_log)[-200:],
        "tokens": {"live_access_tokens": state.live_token_count(portal)},
        "knob_overrides": dict(state.portal_knobs.get(portal.member_id, {})),
        "counters": portal.counters.to_json(),
    }


def _address_view(state: SandboxState, portal: Portal) -> dict[str, Any]:
    return {
        "domain": state.domain(portal),
        "display_domain": portal.domain,
        "origin": state.origin(portal),
        "old_origins": [f"http://{host}:{state.portal_port}" for host in portal.old_hosts],
        "client_endpoint": state.client_endpoint(portal),
        "page_url": state.page_url(portal),
    }


def _placements_view(portal: Portal) -> list[dict[str, Any]]:
    return [
        {
            "id": p.id,
            "placement": p.placement,
            "handler": p.handler,
            "title": p.title,
            "lang_all": p.lang_all,
            "user_id": p.user_id,
            "options": p.options,
        }
        for p in portal.placements
    ]


def _events_view(portal: Portal) -> list[dict[str, Any]]:
    return [
        {
            "id": e.id,
            "event": e.event,
            "handler": e.handler,
            "auth_type": e.user_id,
            "offline": e.offline,
        }
        for e in portal.events
    ]


def _users_view(portal: Portal) -> list[dict[str, Any]]:
    return [
        {
            "id": u.id,
            "name": u.name,
            "last_name": u.last_name,
            "admin": u.admin,
            "departments": u.departments,
            "extranet": u.extranet,
        }
        for u in sorted(portal.users.values(), key=lambda u: u.id)
    ]


def _flows_view(portal: Portal) -> list[dict[str, Any]]:
    return [
        {
            "id": f.id,
            "name": f.name,
            "active": f.active,
            "access": f.access,
            "visible_to": portal.flow_visible_to(f),
            "task_count": sum(1 for t in portal.tasks.values() if t.flow_id == f.id),
        }
        for f in sorted(portal.flows.values(), key=lambda f: f.id)
    ]
