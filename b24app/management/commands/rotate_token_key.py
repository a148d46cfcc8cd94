"""`manage.py rotate_token_key`: re-encrypt every stored token with the newest key.

The rotation, with B24_TOKEN_KEY=new,old on every process: this command rewrites each stored
secret that the new key alone cannot open; afterwards the old key opens nothing still needed and
can be dropped (B24_TOKEN_KEY=new). Each row is rewritten under its row lock in a transaction of
its own: the token refresh path locks the same rows, so a refresh waits for one row's rewrite, not
for the whole run, and never saves over a value this command has just rewritten (or the other way
round). Running it again rewrites nothing.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Model, TextField
from django.db.models.functions import Cast

from b24app import crypto
from b24app.models import Portal, PortalUser


def rotate_rows(
    model: type[Model], fields: list[str], *, if_unreadable: dict[str, str] | None = None
) -> tuple[int, int]:
    """Re-encrypt `fields` of every row of `model` with the newest key.

    Returns (rows rewritten, values no key opens). A value no key opens is left as it is, and
    the row gets `if_unreadable` (what must no longer vouch for that value)."""
    # Cast to plain text: the stored ciphertext, which the encrypted field would decrypt.
    casts = {name: Cast(name, output_field=TextField()) for name in fields}
    rewritten = unreadable = 0
    pks = list(model._default_manager.order_by("pk").values_list("pk", flat=True))
    for pk in pks:
        with transaction.atomic():
            row = (
                model._default_manager.select_for_update()
                .filter(pk=pk)
                .values_list(*casts.values())
                .first()
            )
            if row is None:
                continue  # deleted since the list was read
            changes: dict[str, str] = {}
            for name, stored in zip(fields, row, strict=True):
                if crypto.sealed_with_newest_key(stored or ""):
                    continue  # empty, or sealed with the newest key already
                if not crypto.readable(stored):
                    unreadable += 1
                    changes.update(if_unreadable or {})
                    continue
                # The plain value: saving it through the field seals it with the newest key.
                changes[name] = crypto.decrypt(stored)
            if changes:
                model._default_manager.filter(pk=pk).update(**changes)
                rewritten += 1
    return rewritten, unreadable


class Command(BaseCommand):
    help = "Re-encrypt every stored token with the first key of B24_TOKEN_KEY (key rotation)."

    def handle(self, *args: Any, **options: Any) -> None:
        portals, lost_portals = rotate_rows(Portal, ["application_token"])
        # A user whose tokens no key opens must reopen the app, and that reopen must store the
        # frame's pair even if it is the very pair stored (the digest would say "unchanged").
        users, lost_users = rotate_rows(
            PortalUser, ["access_token", "refresh_token"], if_unreadable={"token_digest": ""}
        )
        if lost_portals or lost_users:
            raise CommandError(
                f"re-encrypted {portals} portals, {users} users; {lost_portals + lost_users} "
                "stored values open with no key of B24_TOKEN_KEY and were left as they are: add "
                "the key they were written with at the end of B24_TOKEN_KEY and run this again "
                "(without it, those users must reopen the app). Keep the old keys until then."
            )
        self.stdout.write(
            f"re-encrypted {portals} portals, {users} users; the old key can now be removed"
        )
