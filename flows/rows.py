"""The page's rows: each flow with the user's intent, in the page's order, as JSON.

A snapshot's rows are sorted and serialized once per snapshot version and process
(`SortedRows`); a render writes again only the rows the user has intents for.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from django.utils.translation import gettext as _

from b24app.models import Portal
from b24app.problems import words
from flows import snapshots
from flows.intents import IntentState
from flows.models import PinIntent
from flows.remote import FlowRow


def intent_json(intent: PinIntent | IntentState) -> dict[str, Any]:
    if intent.status == PinIntent.Status.PENDING:
        text = _("Pinning…") if intent.desired else _("Unpinning…")
        if intent.problem:
            text = words(intent.problem)
    elif intent.status == PinIntent.Status.DONE:
        text = _("Pinned.") if intent.observed else _("Unpinned.")
    else:
        text = words(intent.problem)
    return {
        "flow_id": intent.flow_id,
        "desired": intent.desired,
        "observed": intent.observed,
        "status": intent.status,
        "problem": intent.problem,
        "message": text,
        "pinned": bool(intent.observed) if intent.observed is not None else None,
    }


def by_name(flow: FlowRow) -> tuple[str, int]:
    """The page's order within pinned and unpinned rows (both row builders use it)."""
    return flow.name.casefold(), flow.flow_id


def rows_for(flows: list[FlowRow], intents: dict[int, IntentState]) -> list[dict[str, Any]]:
    """Every flow with the user's intent: pinned first, then by name."""
    pinned: list[tuple[bool, str, int, dict[str, Any]]] = []
    for f in flows:
        intent = intents.get(f.flow_id)
        row = {
            **f.as_json(),
            "pinned": bool(intent and intent.observed),
            "known": bool(intent and intent.observed is not None),
            "intent": intent_json(intent) if intent else None,
        }
        pinned.append((not row["pinned"], *by_name(f), row))
    pinned.sort(key=lambda entry: entry[:3])
    return [entry[3] for entry in pinned]


def json_for_script(value: Any) -> str:
    """JSON safe inside <script type="application/json">, like Django's json_script but without
    its per-character translate (a page of flows is tens of kilobytes)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003C").replace(">", "\\u003E")


@dataclass(frozen=True)
class SortedRows:
    """A snapshot's flows in the page's order (name, then id) with each row's JSON as it is
    when the user has no intent for it: built once per snapshot version and process, then
    only the rows with intents are written again for a render."""

    version: int
    fetched_at: float
    ids: tuple[int, ...]
    flows: tuple[dict[str, Any], ...]
    fragments: tuple[str, ...]

    @classmethod
    def build(cls, snap: snapshots.Snapshot) -> SortedRows:
        flows = sorted(snap.flows, key=by_name)
        return cls(
            version=snap.version,
            fetched_at=snap.fetched_at,
            ids=tuple(f.flow_id for f in flows),
            flows=tuple(f.as_json() for f in flows),
            fragments=tuple(
                json_for_script({**f.as_json(), "pinned": False, "known": False, "intent": None})
                for f in flows
            ),
        )

    def json(self, intents: dict[int, IntentState]) -> str:
        """The rows as `rows_for` orders them (pinned first), as JSON for the page."""
        if not intents:
            return "[" + ",".join(self.fragments) + "]"
        pinned: list[str] = []
        rest: list[str] = []
        for flow_id, flow, fragment in zip(self.ids, self.flows, self.fragments, strict=True):
            intent = intents.get(flow_id)
            if intent is None:
                rest.append(fragment)
                continue
            row = {
                **flow,
                "pinned": bool(intent.observed),
                "known": intent.observed is not None,
                "intent": intent_json(intent),
            }
            (pinned if intent.observed else rest).append(json_for_script(row))
        return "[" + ",".join(pinned + rest) + "]"


class _RowsCache:
    """A small per-process LRU of SortedRows, keyed by portal, user, snapshot version and fetch
    time: a new version (a refresh landing, a flow added) is a new key, so a stale entry is
    never read, only pushed out. Nothing per request (token, nonce, intents) is kept here."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int, int, float], SortedRows] = OrderedDict()

    def get(self, key: tuple[int, int, int, float]) -> SortedRows | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[int, int, int, float], rows: SortedRows) -> None:
        with self._lock:
            self._entries[key] = rows
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


# Each entry is a user's list (200 flows: ~60 KB); the users who open the app within a
# snapshot's life on one process are what it is for.
ROWS_CACHE = _RowsCache(128)


def sorted_rows(
    portal: Portal, user_id: int, meta: snapshots.SnapshotMeta | None
) -> SortedRows | None:
    """The user's rows from the latest snapshot: from the cache when its version is known and
    kept here, else read, sorted and kept. None when there is no snapshot."""
    if meta is not None:
        cached = ROWS_CACHE.get((portal.pk, user_id, meta.version, meta.fetched_at))
        if cached is not None:
            return cached
    snap = snapshots.get(portal, user_id)
    if snap is None:
        return None
    rows = SortedRows.build(snap)
    ROWS_CACHE.put((portal.pk, user_id, snap.version, snap.fetched_at), rows)
    return rows
