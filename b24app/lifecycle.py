"""The app's lifecycle on a portal: install, bind its handlers, update, uninstall — and
whether Bitrix24 confirms an uninstall someone claims.

Views validate and tasks retry; the decisions and the writes are here.
"""

from __future__ import annotations

import enum
import logging
import re

from django.conf import settings
from django.db import models, transaction
from django.dispatch import Signal
from django.utils import timezone
from redis.exceptions import RedisError

from b24app import placements
from b24app.bitrix import oauth
from b24app.bitrix.client import BatchResult
from b24app.bitrix.errors import (
    AuthRevoked,
    BitrixError,
    InvalidClient,
    InvalidToken,
    PortalGone,
    ReinstallRequired,
    ReopenRequired,
    TokenExpired,
)
from b24app.models import Portal, PortalUser, RestCall
from b24app.redisconn import redis_client
from b24app.tokens import (
    admin_user,
    call_with_user,
    refresh_user_token,
)

log = logging.getLogger(__name__)

# Sent after a portal's tokens were deleted (uninstall); flows cancels its pending work.
portal_uninstalled = Signal()  # kwargs: portal, clean

EVENT_HANDLERS = ("ONAPPUNINSTALL", "ONAPPUPDATE")


def handler_url(name: str) -> str:
    return f"{settings.B24_APP_BASE_URL}/b24/{name}/"


def portal_install(
    *, info: oauth.AppInfo, server_endpoint: str, application_token: str, scope: str
) -> Portal:
    """Create or refresh the portal from a verified install (key: member_id, never DOMAIN)."""
    with transaction.atomic():
        portal = Portal.objects.select_for_update().filter(member_id=info.member_id).first()
        fresh = portal is None or portal.state == Portal.State.UNINSTALLED
        if portal is None:
            portal = Portal(member_id=info.member_id)
        portal.domain = info.domain[:255]
        portal.client_endpoint = oauth.check_portal_endpoint(info.client_endpoint)
        portal.server_endpoint = oauth.trusted_server_base(server_endpoint) + "rest/"
        portal.scope = (scope or info.scope)[:500]
        portal.status = info.status[:2]
        if application_token:
            portal.application_token = application_token
        portal.state = Portal.State.ACTIVE
        portal.state_reason = ""
        portal.installer_user_id = info.user_id
        if fresh:
            portal.installed_at = timezone.now()
        portal.save()
    return portal


def portal_bind_handlers(portal: Portal) -> BatchResult:
    """Bind every registered placement (`b24app.placements`) and our lifecycle events — one
    batch, idempotent on reinstall: each binding is removed first, so it exists exactly once
    afterwards."""
    events_url = handler_url("events")
    commands = placements.bind_commands(handler_url("app"))
    for event in EVENT_HANDLERS:
        key = event.lower()
        commands[f"unbind_{key}"] = ("event.unbind", {"event": event, "handler": events_url})
        commands[f"bind_{key}"] = ("event.bind", {"event": event, "handler": events_url})
    result = call_with_user(
        admin_user(portal), lambda client, token: client.batch(commands, token=token)
    )
    failed = {k: e for k, e in result.errors.items() if k.startswith("bind_")}
    if failed:
        key, err = next(iter(failed.items()))
        raise err
    return result


def portal_update(portal: Portal, *, application_token: str) -> Portal:
    with transaction.atomic():
        portal = Portal.objects.select_for_update().get(pk=portal.pk)
        if application_token:
            portal.application_token = application_token
        portal.state = Portal.State.ACTIVE
        portal.state_reason = ""
        portal.save()
    return portal


def portal_uninstall(portal: Portal, *, clean: bool) -> None:
    """Delete every stored token of the portal at once; with CLEAN=1 delete all its data."""
    with transaction.atomic():
        PortalUser.objects.filter(portal=portal).update(
            access_token="",
            refresh_token="",
            token_digest="",
            expires_at=None,
            state=PortalUser.State.NEEDS_REOPEN,
            state_reason="the app was uninstalled",
        )
        Portal.objects.filter(pk=portal.pk).update(
            application_token="",
            state=Portal.State.UNINSTALLED,
            state_reason="uninstalled" + (" with data" if clean else ""),
        )
        portal_uninstalled.send(sender=Portal, portal=portal, clean=clean)
        if clean:
            Portal.objects.filter(pk=portal.pk).delete()
            # The call log is keyed by member_id, not by a foreign key (a call is logged
            # whether or not a portal row exists), so the cascade above does not reach it.
            RestCall.objects.filter(member_id=portal.member_id).delete()
            pk, member_id = portal.pk, portal.member_id
            transaction.on_commit(lambda: forget_portal_keys(pk, member_id))


def forget_portal_keys(portal_id: int, member_id: str) -> int:
    """Delete every Redis key the app keeps for a portal: each names it, either as
    fp:<kind…>:<portal id>[:<user id>] (lists, markers, locks, buckets) or as
    fp:<kind>:<member_id>[:…] (rate limits). A rare event, so one SCAN of the app's keys."""
    own = re.compile(rf"^fp:(?:[A-Za-z_]+:)+{portal_id}(?::\d+)?$")
    client = redis_client()
    try:
        keys = [
            key
            for key in client.scan_iter(match="fp:*", count=1000)
            if own.match(text := key.decode()) or f":{member_id}" in text
        ]
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    except RedisError:
        # The rows are gone already; the keys left expire on their own (lists in minutes).
        log.warning("portal %s: its Redis keys could not be deleted", member_id)
        return 0
    return len(keys)


class UninstallVerdict(enum.Enum):
    CONFIRMED = "confirmed"  # the portal refuses the app's own tokens: the app is gone
    DENIED = "denied"  # the portal still accepts them (or nothing can tell): not Bitrix24's word
    UNKNOWN = "unknown"  # Bitrix24 could not be asked just now


# An uninstall is believed only when the app's stored tokens stop working. At most this many
# users' chains are asked: the installer and admins first (an ordinary user can spend their own
# chain, so their refusal alone does not count unless two chains agree).
UNINSTALL_WITNESSES = 3


def _uninstall_witnesses(portal: Portal) -> list[PortalUser]:
    """The installer, then admins, then the most recently seen users — three at most, chosen
    in the database (a portal may have thousands of users, and anyone can send the event)."""
    installer_first = models.Case(
        models.When(user_id=portal.installer_user_id, then=0),
        default=1,
        output_field=models.IntegerField(),
    )
    users = (
        PortalUser.objects.filter(portal=portal, state=PortalUser.State.ACTIVE)
        .exclude(refresh_token="")
        .order_by(installer_first, "-is_admin", "-last_seen_at")
    )
    return list(users[:UNINSTALL_WITNESSES])


def _app_accepts(portal: Portal, user: PortalUser) -> bool | None:
    """Does Bitrix24 still accept this user's token of our app? None: it could not be asked."""
    refused = (InvalidToken, AuthRevoked, PortalGone, InvalidClient)
    token = user.access_token
    for attempt in range(2):
        try:
            oauth.app_info(portal.server_endpoint, token, timeout=settings.B24_WEB_TIMEOUT)
            return True
        except TokenExpired:
            if attempt:
                return None
        except refused:
            return False
        except BitrixError:  # transient, or an answer we cannot read: ask again later
            return None
        try:
            token, _ = refresh_user_token(user.pk, user.token_version, require_active=False)
        except (ReopenRequired, ReinstallRequired):
            return False
        except BitrixError:
            return None
    return None


def uninstall_verdict(portal: Portal) -> UninstallVerdict:
    """Anyone who ever opened the app holds the application_token, so an ONAPPUNINSTALL that
    matches it is only a claim: ask Bitrix24 with the app's own tokens whether it is true."""
    witnesses = _uninstall_witnesses(portal)
    refusals, trusted = 0, False
    for user in witnesses:
        accepted = _app_accepts(portal, user)
        if accepted is None:
            return UninstallVerdict.UNKNOWN
        if accepted:
            return UninstallVerdict.DENIED
        refusals += 1
        trusted = trusted or user.is_admin or user.user_id == portal.installer_user_id
    if trusted or refusals >= 2:
        return UninstallVerdict.CONFIRMED
    return UninstallVerdict.DENIED
