"""The pending window a convergence run reads every round, read cheaply.

A run reads the user's pending intents afresh every round (a click that lands mid-run must be
seen), and at scale that read was a large share of a worker's CPU per REST request: the ORM
compiled the same query every round and built a model instance, timestamps and all, per row.
Here the query is compiled once per run and each round reads just the columns a round needs
into small records.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import connection

from b24app.rawsql import converters, to_python
from flows.models import PinIntent

COLUMNS = ("id", "flow_id", "desired", "observed", "toggles", "not_before")


@dataclass(frozen=True, slots=True)
class PendingIntent:
    """What a round needs to know of one pending intent."""

    pk: int
    flow_id: int
    desired: bool
    observed: bool | None
    toggles: int
    not_before: datetime | None

    @property
    def converged(self) -> bool:
        return self.observed is not None and self.observed == self.desired


class PendingWindow:
    """The first `size` pending intents of one user, oldest change first (as `read()` finds
    them each time it is called)."""

    def __init__(self, portal_id: int, user_id: int, size: int) -> None:
        rows = (
            PinIntent.objects.filter(
                portal_id=portal_id, user_id=user_id, status=PinIntent.Status.PENDING
            )
            .order_by("updated_at", "pk")
            .values_list(*COLUMNS)
        )[:size]
        self.size = size
        self._sql, self._params = rows.query.sql_with_params()
        self._converters = converters([PinIntent._meta.get_field(name) for name in COLUMNS])

    def read(self) -> list[PendingIntent]:
        with connection.cursor() as cursor:
            cursor.execute(self._sql, self._params)
            found = cursor.fetchall()
        return [PendingIntent(*to_python(self._converters, row)) for row in found]
