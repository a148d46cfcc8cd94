"""Values in and out of the few statements written by hand for the hot path (the pending window,
the user's row before each call, the call log, the recorded answers), as the ORM would convert
them — on PostgreSQL and on SQLite, `make run`'s default, whose driver hands back naive datetimes
and 0/1 for booleans and stores an aware datetime in another format than Django's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from django.db import connection

Converter = Callable[[Any, Any, Any], Any]


def converters(fields: Sequence[Any]) -> list[list[Converter]]:
    """For each field, what the ORM runs on a value read from its column: the backend's
    converters, then the field's own (a decrypted token, say)."""
    found = []
    for field in fields:
        column = field.get_col(field.model._meta.db_table)
        backend = connection.ops.get_db_converters(column)
        found.append([*backend, *field.get_db_converters(connection)])
    return found


def to_python(found: list[list[Converter]], row: Sequence[Any]) -> list[Any]:
    values = []
    for convert_all, value in zip(found, row, strict=True):
        for convert in convert_all:
            value = convert(value, None, connection)
        values.append(value)
    return values


def db_datetime(value: datetime | None) -> Any:
    """A datetime as a parameter, in the form the ORM stores it."""
    return connection.ops.adapt_datetimefield_value(value)
