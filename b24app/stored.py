"""The stored portal and its user, read in one statement built once: every reopen of the app
runs it (the frame's check), with one more value the caller may ask for (AlsoRead)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connection
from django.db.models import Model

from b24app.models import Portal, PortalUser


class _Columns:
    """A model's columns in a hand-written SELECT, and its instances back from the rows, with
    the converters the ORM applies (decryption, SQLite's booleans and dates); the fields left
    out load on first use, as with `defer`."""

    def __init__(self, model: type[Model], alias: str, leave_out: tuple[str, ...] = ()) -> None:
        self.model = model
        self.alias = alias
        self.fields = [f for f in model._meta.concrete_fields if f.attname not in leave_out]
        self.names = [f.attname for f in self.fields]
        self._converters: dict[str, list[tuple[Any, list[Any]]]] = {}

    def select(self) -> str:
        qn = connection.ops.quote_name
        return ", ".join(f"{qn(self.alias)}.{qn(f.column)}" for f in self.fields)

    def converters(self) -> list[tuple[Any, list[Any]]]:
        found = self._converters.get(connection.vendor)
        if found is None:
            found = []
            for f in self.fields:
                col = f.get_col(self.alias)
                found.append(
                    (col, connection.ops.get_db_converters(col) + col.get_db_converters(connection))
                )
            self._converters[connection.vendor] = found
        return found

    def instance(self, values: Sequence[Any]) -> Any:
        converted = []
        for (col, converters), value in zip(self.converters(), values, strict=True):
            for convert in converters:
                value = convert(value, col, connection)
            converted.append(value)
        return self.model.from_db(connection.alias, self.names, converted)


_USER_COLUMNS = _Columns(PortalUser, "u", leave_out=("access_token", "refresh_token"))
_PORTAL_COLUMNS = _Columns(Portal, "p")


@dataclass(frozen=True)
class AlsoRead:
    """One more value a caller wants with the portal and the user, read in the same statement
    (a reopen then makes one round trip to the database): a scalar SQL expression over the
    aliases p (the portal) and u (the user), given the database vendor. Only our own names go
    into it; the value is what the database answers (None for a user never seen)."""

    name: str
    expression: Callable[[str], str]


@functools.cache
def _portal_and_user_sql(vendor: str, also: AlsoRead | None) -> str:
    """Built once: the ORM would build this text again on every reopen, at about the cost of
    running it."""
    qn = connection.ops.quote_name
    users, portals = qn(PortalUser._meta.db_table), qn(Portal._meta.db_table)
    extra = f", {also.expression(vendor)}" if also is not None else ""
    return (
        f"SELECT {_USER_COLUMNS.select()}, {_PORTAL_COLUMNS.select()}{extra} "  # noqa: S608
        f"FROM {users} u INNER JOIN {portals} p ON p.{qn('id')} = u.{qn('portal_id')} "
        f"WHERE p.{qn('member_id')} = %s AND u.{qn('user_id')} = %s"
    )


def stored_portal_and_user(
    member_id: str, user_id: int, also: AlsoRead | None = None
) -> tuple[Portal | None, PortalUser | None, Any]:
    """The stored portal and the row of its user (tokens not read), and `also`'s value, in one
    query for a user seen before (every reopen); a second one finds the portal of a user who
    has never opened the app."""
    with connection.cursor() as cursor:
        cursor.execute(_portal_and_user_sql(connection.vendor, also), [member_id, user_id])
        row = cursor.fetchone()
    if row is not None:
        split = len(_USER_COLUMNS.fields)
        end = split + len(_PORTAL_COLUMNS.fields)
        user: PortalUser = _USER_COLUMNS.instance(row[:split])
        portal: Portal = _PORTAL_COLUMNS.instance(row[split:end])
        PortalUser._meta.get_field("portal").set_cached_value(user, portal)
        return portal, user, row[end] if also is not None else None
    return Portal.objects.filter(member_id=member_id).first(), None, None
