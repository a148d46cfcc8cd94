"""Users' tokens: stored as a frame or event brings them, refreshed lazily and at most once
for many callers (under the row lock, saved before use), and kept alive when idle for months.

`call_with_user` is how everything else calls a portal as one of its users.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.crypto import salted_hmac

from b24app import metrics
from b24app.bitrix import oauth
from b24app.bitrix.client import PortalClient
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
from b24app.latest import latest_user
from b24app.models import Portal, PortalUser
from b24app.portal_client import client_for, portal_follow_endpoint

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds before the stored expiry at which a token counts as expired (clock skew, slow calls).
EXPIRY_MARGIN = 30


# A reopen with an unchanged pair writes nothing, except last_seen_at once this much has passed
# (it only tells which chains sit idle for months: see keep_idle_tokens_alive).
LAST_SEEN_EVERY = timedelta(hours=1)


def token_pair_digest(access_token: str, refresh_token: str) -> str:
    """A keyed digest of a token pair, to tell "the same pair again" without storing or
    comparing secrets in the clear; "" unless both tokens are known."""
    if not access_token or not refresh_token:
        return ""
    pair = f"{access_token}\x00{refresh_token}"
    return salted_hmac("flowpins.token-pair", pair, algorithm="sha256").hexdigest()


def _expiry(seconds: float) -> datetime:
    return timezone.now() + timedelta(seconds=max(0.0, seconds))


def user_tokens_store(
    portal: Portal,
    user_id: int,
    *,
    access_token: str,
    refresh_token: str,
    expires_in: float,
    language: str = "",
    is_admin: bool | None = None,
    stored: PortalUser | None = None,
) -> PortalUser:
    """Keep the tokens a frame or event brought for this (portal, user).

    `stored`: the user's row as just read (tokens deferred), when the caller has it. If it
    already holds this very pair (its digest), is active and needs no other change, nothing
    is written: that is every reopen within an access token's hour. Otherwise one UPDATE for
    a known user (a new user is created first). The refresh path holds the row lock while it
    saves; this UPDATE simply waits for it, and whichever pair is written last is a live one
    (a user may hold several token chains).
    """
    digest = token_pair_digest(access_token, refresh_token)
    now = timezone.now()
    if (
        stored is not None
        and digest
        and stored.portal_id == portal.pk
        and stored.user_id == user_id
        and stored.state == PortalUser.State.ACTIVE
        and hmac.compare_digest(stored.token_digest, digest)
        and (not language or language == stored.language)
        and (is_admin is None or is_admin == stored.is_admin)
        and stored.last_seen_at > now - LAST_SEEN_EVERY
    ):
        return stored
    changes: dict[str, Any] = {"last_seen_at": now}
    if access_token:
        changes.update(
            access_token=access_token,
            expires_at=_expiry(expires_in),
            token_version=F("token_version") + 1,
            state=PortalUser.State.ACTIVE,
            state_reason="",
            # Without a refresh token the stored one stays: the pair is then not known whole.
            token_digest=digest,
        )
        if refresh_token:
            changes["refresh_token"] = refresh_token
    if language:
        changes["language"] = language
    if is_admin is not None:
        changes["is_admin"] = is_admin
    users = PortalUser.objects.filter(portal=portal, user_id=user_id)
    if not users.update(**changes):
        PortalUser.objects.get_or_create(portal=portal, user_id=user_id)
        users.update(**changes)
    return users.defer("access_token", "refresh_token").get()


def _expired(user: PortalUser) -> bool:
    return user.expires_at is None or user.expires_at <= timezone.now() + timedelta(
        seconds=EXPIRY_MARGIN
    )


def mark_user_needs_reopen(user_pk: int, reason: str) -> None:
    PortalUser.objects.filter(pk=user_pk).update(
        state=PortalUser.State.NEEDS_REOPEN,
        state_reason=reason[:300],
        access_token="",
        refresh_token="",
        token_digest="",
        expires_at=None,
    )


def mark_portal_needs_reinstall(portal_pk: int, reason: str) -> None:
    Portal.objects.filter(pk=portal_pk).update(
        state=Portal.State.NEEDS_REINSTALL, state_reason=reason[:300]
    )


def _answer_mismatch(tokens: oauth.TokenSet, portal: Portal, user: PortalUser) -> str:
    """Why a refresh answer does not belong to this row, or "" when it does.

    A user can post a REFRESH_ID from a portal of their own: its answer names another portal
    (or user), and saving it would hand them our row — and, through its client_endpoint, the
    address every later call of this portal goes to.
    """
    if not tokens.member_id or not hmac.compare_digest(tokens.member_id, portal.member_id):
        return "the refresh answer is for another portal"
    if tokens.user_id is not None and tokens.user_id != user.user_id:
        return "the refresh answer is for another user"
    return ""


def _refresh(server_endpoint: str, refresh_token: str) -> oauth.TokenSet:
    with metrics.counted_refresh():
        return oauth.refresh(server_endpoint, refresh_token)


def refresh_user_token(
    user_pk: int, failed_version: int, *, require_active: bool = True
) -> tuple[str, int]:
    """Refresh one user's tokens, at most once for many concurrent callers.

    Refresh tokens rotate and are single-use, so: lock the row, read it again, refresh only if it
    still holds the pair that failed (another worker may have refreshed already), check that the
    answer is for this portal and user, save both tokens before anyone uses them.
    Returns (access_token, token_version).
    """
    failure: BitrixError | None = None
    mismatch = ""
    with transaction.atomic():
        user = PortalUser.objects.select_for_update().select_related("portal").get(pk=user_pk)
        portal = user.portal
        if require_active and not portal.is_active:
            raise ReinstallRequired(portal.state_reason or "the app is not installed")
        if user.state != PortalUser.State.ACTIVE or not user.has_tokens:
            raise ReopenRequired(user.state_reason or "no stored tokens")
        if user.token_version != failed_version and not _expired(user):
            return user.access_token, user.token_version
        try:
            tokens = _refresh(portal.server_endpoint, user.refresh_token)
        except (AuthRevoked, InvalidToken, PortalGone, InvalidClient) as exc:
            failure = exc
        else:
            mismatch = _answer_mismatch(tokens, portal, user)
            if not mismatch:
                user.access_token = tokens.access_token
                user.refresh_token = tokens.refresh_token
                user.token_digest = token_pair_digest(tokens.access_token, tokens.refresh_token)
                user.expires_at = datetime.fromtimestamp(tokens.expires_at, tz=UTC)
                user.token_version += 1
                user.refreshed_at = timezone.now()
                user.save(
                    update_fields=[
                        "access_token",
                        "refresh_token",
                        "token_digest",
                        "expires_at",
                        "token_version",
                        "refreshed_at",
                    ]
                )
    if mismatch:  # the old pair is spent and the new one is not ours: nothing usable is left
        log.warning("portal %s: refused a refresh answer: %s", portal.member_id, mismatch)
        mark_user_needs_reopen(user_pk, mismatch)
        raise ReopenRequired(mismatch)
    if failure is None:
        # Compared as stored: a refresh answer that differs only in form costs no app.info call.
        moved = oauth.normalize_endpoint(tokens.client_endpoint) != portal.client_endpoint
        if tokens.client_endpoint and moved:
            _reverify_endpoint(portal, user.access_token)
        return user.access_token, user.token_version
    # The refresh chain is dead: record it (outside the rolled-back block) and stop.
    if isinstance(failure, PortalGone | InvalidClient):
        mark_portal_needs_reinstall(portal.pk, f"{failure.code}: {failure.description}")
        raise ReinstallRequired(failure.code) from None
    mark_user_needs_reopen(user_pk, f"{failure.code}: {failure.description}")
    raise ReopenRequired(failure.code) from None


def _reverify_endpoint(portal: Portal, access_token: str) -> None:
    """A refresh answer names another client_endpoint: believe it only from app.info."""
    try:
        info = oauth.app_info(portal.server_endpoint, access_token)
    except BitrixError as exc:
        log.info("portal %s: could not re-verify its address: %s", portal.member_id, exc.code)
        return
    if info.member_id == portal.member_id and info.client_id == settings.B24_CLIENT_ID:
        try:
            portal_follow_endpoint(portal, info)
        except oauth.UntrustedServer as exc:
            log.warning("portal %s: app.info names an unusable address: %s", portal.member_id, exc)


def call_with_user(
    user: PortalUser,
    action: Callable[[PortalClient, str], T],
    *,
    max_wait: float = 2.0,
    bulk: bool = False,
    timeout: tuple[float, float] | None = None,
) -> T:
    """Run `action(client, access_token)` with this user's token: refresh lazily (on a passed
    expiry or on expired_token), under the lock, and retry the action once."""
    user = latest_user(user.pk)  # the latest tokens (and the portal's state and address)
    portal = user.portal
    if not portal.is_active:
        raise ReinstallRequired(portal.state_reason or "the app is not installed")
    if user.state != PortalUser.State.ACTIVE or not user.has_tokens:
        raise ReopenRequired(user.state_reason or "no stored tokens")
    client = client_for(portal, max_wait=max_wait, bulk=bulk, timeout=timeout)
    token, version = user.access_token, user.token_version
    if _expired(user):
        token, version = refresh_user_token(user.pk, version)
    try:
        return action(client, token)
    except (TokenExpired, InvalidToken):
        token, version = refresh_user_token(user.pk, version)
    try:
        return action(client, token)
    except InvalidToken as exc:  # a fresh token refused: this chain is not usable
        mark_user_needs_reopen(user.pk, f"{exc.code}: {exc.description}")
        raise ReopenRequired(exc.code) from None
    except PortalGone as exc:
        mark_portal_needs_reinstall(portal.pk, f"{exc.code}: {exc.description}")
        raise ReinstallRequired(exc.code) from None


# Refresh tokens live 180 days; a chain unused this long is refreshed before it dies.
KEEP_ALIVE_AFTER = timedelta(days=150)


def keep_idle_tokens_alive(*, limit: int = 500) -> int:
    """Refresh the tokens of users whose chain has not moved for KEEP_ALIVE_AFTER."""
    cutoff = timezone.now() - KEEP_ALIVE_AFTER
    idle = (
        PortalUser.objects.filter(state=PortalUser.State.ACTIVE, portal__state=Portal.State.ACTIVE)
        .exclude(refresh_token="")
        .filter(last_seen_at__lt=cutoff)
        .filter(models.Q(refreshed_at__isnull=True) | models.Q(refreshed_at__lt=cutoff))
        .defer("access_token", "refresh_token")[:limit]
    )
    refreshed = 0
    for user in idle:
        try:
            refresh_user_token(user.pk, user.token_version)
            refreshed += 1
        except BitrixError as exc:
            log.info("keep-alive refresh for a user of %s failed: %s", user.portal_id, exc)
    return refreshed


def admin_user(portal: Portal) -> PortalUser:
    """The user whose token does portal-level work (bindings): the installer, else an admin."""
    users = PortalUser.objects.filter(portal=portal, state=PortalUser.State.ACTIVE)
    installer = None
    if portal.installer_user_id is not None:
        installer = users.filter(user_id=portal.installer_user_id).first()
    user = installer or users.filter(is_admin=True).order_by("-last_seen_at").first()
    if user is None or not user.has_tokens:
        raise ReopenRequired("no administrator token: an admin must open the app once")
    return user
