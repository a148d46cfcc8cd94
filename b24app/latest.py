"""A user's tokens and their portal's state and address, read afresh for each REST call.

`call_with_user` reads them before every call (a token may have rotated since the last one, a
portal may have been uninstalled or moved). Through the ORM, building that same query and its
two model instances each time cost about a millisecond of a worker's CPU per REST request, for
a read of one row; here the ORM writes the query once per process and each call runs it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from django.db import connection, models

from b24app.models import Portal, PortalUser
from b24app.rawsql import converters, to_python

# Only what a call uses; the rest of each row stays deferred (read on access, like `.only()`).
USER_FIELDS = {
    "id",
    "portal_id",
    "user_id",
    "state",
    "state_reason",
    "access_token",
    "refresh_token",
    "expires_at",
    "token_version",
}
PORTAL_FIELDS = {
    "id",
    "member_id",
    "client_endpoint",
    "server_endpoint",
    "rate_per_second",
    "rate_burst",
    "state",
    "state_reason",
}


def _fields(model: type[models.Model], names: set[str]) -> list[Any]:
    """The model's own fields of `names`, in the order `Model.from_db` expects them."""
    return [f for f in model._meta.concrete_fields if f.attname in names]


@cache
def _query() -> tuple[str, list[Any], list[Any]]:
    user_fields, portal_fields = _fields(PortalUser, USER_FIELDS), _fields(Portal, PORTAL_FIELDS)
    columns = [f.attname for f in user_fields] + [f"portal__{f.attname}" for f in portal_fields]
    rows = PortalUser.objects.filter(pk=0).order_by().values_list(*columns)
    sql, params = rows.query.sql_with_params()
    if list(params) != [0]:
        raise RuntimeError("the user's row query takes more than its id")
    return sql, user_fields, portal_fields


def latest_user(pk: int) -> PortalUser:
    """The user's row as stored now, with its portal; PortalUser.DoesNotExist when gone."""
    sql, user_fields, portal_fields = _query()
    with connection.cursor() as cursor:
        cursor.execute(sql, [pk])
        row = cursor.fetchone()
    if row is None:
        raise PortalUser.DoesNotExist("PortalUser matching query does not exist.")
    split = len(user_fields)
    db = connection.alias
    user_values = to_python(converters(user_fields), row[:split])
    user = PortalUser.from_db(db, USER_FIELDS, user_values)
    portal_values = to_python(converters(portal_fields), row[split:])
    user.portal = Portal.from_db(db, PORTAL_FIELDS, portal_values)
    return user
