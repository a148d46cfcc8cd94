"""The token/refresh service's rules, one at a time, in the test process (so `make mutate` can
run them against each mutant): what a reopen writes, when a token counts as expired, when a
refresh happens and what it keeps or refuses. Real PostgreSQL, Redis and the sandbox's OAuth
server over HTTP."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from b24app import tokens
from b24app.bitrix.errors import ReinstallRequired, ReopenRequired
from b24app.models import Portal, PortalUser
from tests.helpers import install, launch, post_frame, sb, state

pytestmark = [pytest.mark.mutation, pytest.mark.django_db]


def _profile(user: PortalUser) -> Any:
    return tokens.call_with_user(user, lambda c, t: c.call("profile", token=t).result)


def _refreshes(sandbox: Any) -> int:
    return int(state(sandbox)["counters"]["refresh_ok"])


def _installed(sandbox: Any) -> tuple[Portal, PortalUser]:
    install(Client(), sandbox)
    return Portal.objects.get(), PortalUser.objects.get(user_id=1)


def _pair(sandbox: Any, user_id: int, portal: str = "alpha") -> dict[str, Any]:
    """A fresh token-endpoint answer for this user, as Bitrix24 would hand one out."""
    return sb(sandbox, f"p/{portal}/tokens", {"user_id": user_id})


# --- the digest of a pair -------------------------------------------------------------------


def test_a_pair_digest_needs_both_tokens_and_tells_pairs_apart() -> None:
    assert tokens.token_pair_digest("a" * 20, "") == ""
    assert tokens.token_pair_digest("", "r" * 20) == ""
    one = tokens.token_pair_digest("a" * 20, "r" * 20)
    assert len(one) == 64 and one == tokens.token_pair_digest("a" * 20, "r" * 20)
    assert one != tokens.token_pair_digest("a" * 20, "s" * 20)
    # The two halves are kept apart: ("ab", "c") is not ("a", "bc").
    assert tokens.token_pair_digest("ab", "c") != tokens.token_pair_digest("a", "bc")


# --- storing what a frame brings -------------------------------------------------------------


def _store(portal: Portal, user_id: int, pair: dict[str, Any], **kw: Any) -> PortalUser:
    return tokens.user_tokens_store(
        portal,
        user_id,
        access_token=pair["access_token"],
        refresh_token=pair["refresh_token"],
        expires_in=kw.pop("expires_in", 3600),
        **kw,
    )


def test_storing_a_new_user_keeps_both_tokens_and_the_expiry(sandbox: Any) -> None:
    portal, _ = _installed(sandbox)
    pair = _pair(sandbox, 3)
    before = timezone.now()
    stored = _store(portal, 3, pair, expires_in=600, language="ru", is_admin=False)
    row = PortalUser.objects.get(pk=stored.pk)
    assert (row.access_token, row.refresh_token) == (pair["access_token"], pair["refresh_token"])
    assert row.token_digest == tokens.token_pair_digest(row.access_token, row.refresh_token)
    assert (
        before + timedelta(seconds=590) < row.expires_at < timezone.now() + timedelta(seconds=610)
    )
    assert row.state == PortalUser.State.ACTIVE and row.state_reason == ""
    assert row.language == "ru" and row.is_admin is False
    assert row.last_seen_at >= before


def test_a_negative_lifetime_is_stored_as_already_expired(sandbox: Any) -> None:
    portal, _ = _installed(sandbox)
    now = timezone.now()
    row = PortalUser.objects.get(pk=_store(portal, 3, _pair(sandbox, 3), expires_in=-500).pk)
    assert now - timedelta(seconds=5) < row.expires_at <= timezone.now()


def test_a_reopen_with_the_same_pair_writes_nothing(sandbox: Any) -> None:
    portal, _ = _installed(sandbox)
    pair = _pair(sandbox, 3)
    first = _store(portal, 3, pair, language="ru", is_admin=False)
    version = PortalUser.objects.get(pk=first.pk).token_version
    again = _store(portal, 3, pair, stored=first, language="ru", is_admin=False)
    assert again is first  # the row as read: no UPDATE, no read back
    assert PortalUser.objects.get(pk=first.pk).token_version == version
    # Without a language or an admin flag to compare, still nothing to write.
    assert _store(portal, 3, pair, stored=first) is first


@pytest.mark.parametrize(
    "change",
    ["new pair", "language", "admin flag", "needs reopen", "stale last_seen", "other user"],
)
def test_a_reopen_that_changes_anything_is_written(sandbox: Any, change: str) -> None:
    portal, _ = _installed(sandbox)
    pair = _pair(sandbox, 3)
    first = _store(portal, 3, pair, language="ru", is_admin=False)
    version = PortalUser.objects.get(pk=first.pk).token_version
    kw: dict[str, Any] = {"language": "ru", "is_admin": False}
    user_id = 3
    if change == "new pair":
        pair = _pair(sandbox, 3)
    elif change == "language":
        kw["language"] = "en"
    elif change == "admin flag":
        kw["is_admin"] = True
    elif change == "needs reopen":
        first.state = PortalUser.State.NEEDS_REOPEN
        PortalUser.objects.filter(pk=first.pk).update(
            state=PortalUser.State.NEEDS_REOPEN, state_reason="invalid_grant: gone"
        )
    elif change == "stale last_seen":
        first.last_seen_at = timezone.now() - tokens.LAST_SEEN_EVERY - timedelta(seconds=5)
    else:  # the stored row handed in is another user's: the pair is stored for user_id
        user_id = 2
    again = _store(portal, user_id, pair, stored=first, **kw)
    assert again is not first
    row = PortalUser.objects.get(portal=portal, user_id=user_id)
    assert row.access_token == pair["access_token"]
    assert (row.state, row.state_reason) == (PortalUser.State.ACTIVE, "")
    assert row.language == kw["language"] and row.is_admin == kw["is_admin"]
    if user_id == 3:
        assert row.token_version == version + 1


def test_a_reopen_exactly_an_hour_after_the_last_is_written(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    portal, _ = _installed(sandbox)
    pair = _pair(sandbox, 3)
    first = _store(portal, 3, pair)
    now = timezone.now()
    monkeypatch.setattr(timezone, "now", lambda: now)
    first.last_seen_at = now - tokens.LAST_SEEN_EVERY
    assert _store(portal, 3, pair, stored=first) is not first
    assert PortalUser.objects.get(pk=first.pk).last_seen_at == now


def test_a_token_at_the_margin_of_its_expiry_counts_as_expired(
    sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, admin = _installed(sandbox)
    now = timezone.now()
    monkeypatch.setattr(timezone, "now", lambda: now)
    admin.expires_at = now + timedelta(seconds=tokens.EXPIRY_MARGIN)
    assert tokens._expired(admin) is True
    admin.expires_at = now + timedelta(seconds=tokens.EXPIRY_MARGIN, microseconds=1)
    assert tokens._expired(admin) is False
    admin.expires_at = None
    assert tokens._expired(admin) is True


def test_a_reopen_within_the_hour_does_not_touch_last_seen(sandbox: Any) -> None:
    portal, _ = _installed(sandbox)
    pair = _pair(sandbox, 3)
    first = _store(portal, 3, pair)
    first.last_seen_at = timezone.now() - tokens.LAST_SEEN_EVERY + timedelta(minutes=5)
    assert _store(portal, 3, pair, stored=first) is first


def test_a_stored_row_of_another_portal_is_not_taken_for_this_one(sandbox: Any) -> None:
    portal, _ = _installed(sandbox)
    pair = _pair(sandbox, 3)
    first = _store(portal, 3, pair)
    other = Portal.objects.create(member_id="other-portal", server_endpoint=portal.server_endpoint)
    stored = _store(other, 3, pair, stored=first)
    assert stored is not first and stored.portal_id == other.pk
    assert PortalUser.objects.filter(portal=other, user_id=3).exists()


def test_a_frame_without_a_refresh_token_keeps_the_stored_one(sandbox: Any) -> None:
    portal, _ = _installed(sandbox)
    pair = _pair(sandbox, 3)
    first = _store(portal, 3, pair)
    newer = _pair(sandbox, 3)
    tokens.user_tokens_store(
        portal, 3, access_token=newer["access_token"], refresh_token="", expires_in=3600
    )
    row = PortalUser.objects.get(pk=first.pk)
    assert row.access_token == newer["access_token"]
    assert row.refresh_token == pair["refresh_token"]
    assert row.token_digest == ""  # the pair is not known whole


def test_a_frame_without_any_token_only_updates_what_it_brings(sandbox: Any) -> None:
    portal, _ = _installed(sandbox)
    pair = _pair(sandbox, 3)
    first = _store(portal, 3, pair, language="ru")
    version = PortalUser.objects.get(pk=first.pk).token_version
    tokens.user_tokens_store(
        portal, 3, access_token="", refresh_token="", expires_in=0, language="en"
    )
    row = PortalUser.objects.get(pk=first.pk)
    assert row.access_token == pair["access_token"] and row.token_version == version
    assert row.language == "en"


# --- expiry and the locked refresh -------------------------------------------------------------


def test_a_token_within_the_margin_of_its_expiry_is_refreshed_first(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    soon = timezone.now() + timedelta(seconds=tokens.EXPIRY_MARGIN - 10)
    PortalUser.objects.filter(pk=admin.pk).update(expires_at=soon)
    assert _profile(admin)["ID"] == "1"
    assert _refreshes(sandbox) == 1
    row = PortalUser.objects.get(pk=admin.pk)
    assert row.expires_at > timezone.now() + timedelta(minutes=30)
    assert row.refreshed_at is not None and row.token_version == admin.token_version + 1
    assert row.token_digest == tokens.token_pair_digest(row.access_token, row.refresh_token)


def test_a_token_beyond_the_margin_is_used_as_it_is(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    later = timezone.now() + timedelta(seconds=tokens.EXPIRY_MARGIN + 60)
    PortalUser.objects.filter(pk=admin.pk).update(expires_at=later)
    assert _profile(admin)["ID"] == "1"
    assert _refreshes(sandbox) == 0


def test_a_token_the_portal_calls_expired_is_refreshed_and_the_call_retried(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    sb(sandbox, "p/alpha/expire", {"user_id": 1})  # our stored expiry still says "valid"
    assert _profile(admin)["ID"] == "1"
    assert _refreshes(sandbox) == 1
    assert PortalUser.objects.get(pk=admin.pk).token_version == admin.token_version + 1


def test_each_call_uses_the_row_as_stored_then_not_as_handed(sandbox: Any) -> None:
    _, admin = _installed(sandbox)  # `admin` holds a working token from here on
    PortalUser.objects.filter(pk=admin.pk).update(access_token="not-a-token-any-more")
    assert _profile(admin)["ID"] == "1"  # the stored token was refused: refreshed, then used
    assert _refreshes(sandbox) == 1
    row = PortalUser.objects.get(pk=admin.pk)
    assert row.access_token != "not-a-token-any-more"
    assert row.token_version == admin.token_version + 1


def test_a_portal_uninstalled_since_its_user_was_read_gets_no_call(sandbox: Any) -> None:
    portal, admin = _installed(sandbox)
    before = state(sandbox)["counters"]
    Portal.objects.filter(pk=portal.pk).update(state=Portal.State.UNINSTALLED)
    with pytest.raises(ReinstallRequired):
        _profile(admin)
    assert state(sandbox)["counters"] == before
    PortalUser.objects.filter(pk=admin.pk).delete()
    with pytest.raises(PortalUser.DoesNotExist):
        _profile(admin)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a naive datetime saved
def test_a_refresh_someone_else_already_did_is_not_repeated(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    access, version = tokens.refresh_user_token(admin.pk, admin.token_version)
    assert version == admin.token_version + 1 and _refreshes(sandbox) == 1
    # A caller that failed with the old version finds the new pair and uses it.
    assert tokens.refresh_user_token(admin.pk, admin.token_version) == (access, version)
    assert _refreshes(sandbox) == 1
    # One that failed with the current version refreshes.
    assert tokens.refresh_user_token(admin.pk, version)[1] == version + 1
    assert _refreshes(sandbox) == 2


def test_an_expired_row_is_refreshed_whatever_version_failed(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    PortalUser.objects.filter(pk=admin.pk).update(expires_at=timezone.now())
    assert tokens.refresh_user_token(admin.pk, -1)[1] == admin.token_version + 1
    assert _refreshes(sandbox) == 1


def test_a_refresh_for_an_uninstalled_portal_is_refused_without_a_call(sandbox: Any) -> None:
    portal, admin = _installed(sandbox)
    Portal.objects.filter(pk=portal.pk).update(state=Portal.State.NEEDS_REINSTALL, state_reason="")
    for attempt in (
        lambda: tokens.refresh_user_token(admin.pk, admin.token_version),
        lambda: _profile(admin),
    ):
        with pytest.raises(ReinstallRequired) as raised:
            attempt()
        assert raised.value.description == "the app is not installed"
    Portal.objects.filter(pk=portal.pk).update(state_reason="PAYMENT_REQUIRED: pay")
    with pytest.raises(ReinstallRequired, match="PAYMENT_REQUIRED"):
        tokens.refresh_user_token(admin.pk, admin.token_version)
    assert _refreshes(sandbox) == 0
    # Without require_active (the uninstall's own check) the refresh goes ahead.
    tokens.refresh_user_token(admin.pk, admin.token_version, require_active=False)
    assert _refreshes(sandbox) == 1


@pytest.mark.parametrize("why", ["needs reopen", "no refresh token", "no access token"])
def test_a_user_without_a_usable_pair_must_reopen(sandbox: Any, why: str) -> None:
    _, admin = _installed(sandbox)
    rows = PortalUser.objects.filter(pk=admin.pk)
    if why == "needs reopen":
        rows.update(state=PortalUser.State.NEEDS_REOPEN, state_reason="invalid_grant: gone")
        reason = "invalid_grant: gone"
    elif why == "no refresh token":
        rows.update(refresh_token="")
        reason = "no stored tokens"
    else:
        rows.update(access_token="")
        reason = "no stored tokens"
    for attempt in (
        lambda: tokens.refresh_user_token(admin.pk, admin.token_version),
        lambda: _profile(admin),
    ):
        with pytest.raises(ReopenRequired) as raised:
            attempt()
        assert raised.value.description == reason
    assert _refreshes(sandbox) == 0


def test_a_refresh_answer_for_another_portal_is_refused_and_the_row_cleared(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    beta = _pair(sandbox, 1, "beta")  # a REFRESH_ID the user got from a portal of their own
    PortalUser.objects.filter(pk=admin.pk).update(refresh_token=beta["refresh_token"])
    with pytest.raises(ReopenRequired, match="another portal"):
        tokens.refresh_user_token(admin.pk, admin.token_version)
    row = PortalUser.objects.get(pk=admin.pk)
    assert row.state == PortalUser.State.NEEDS_REOPEN
    assert row.state_reason == "the refresh answer is for another portal"
    assert row.access_token == "" and row.refresh_token == "" and row.token_digest == ""
    assert row.expires_at is None


def test_a_refresh_answer_for_another_user_is_refused(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    other = _pair(sandbox, 3)  # same portal, another user
    PortalUser.objects.filter(pk=admin.pk).update(refresh_token=other["refresh_token"])
    with pytest.raises(ReopenRequired, match="another user"):
        tokens.refresh_user_token(admin.pk, admin.token_version)
    row = PortalUser.objects.get(pk=admin.pk)
    assert row.state == PortalUser.State.NEEDS_REOPEN
    assert row.state_reason == "the refresh answer is for another user"


def test_a_dead_refresh_token_clears_the_pair_and_names_the_error(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    PortalUser.objects.filter(pk=admin.pk).update(refresh_token="x" * 32)
    with pytest.raises(ReopenRequired, match="invalid_grant"):
        tokens.refresh_user_token(admin.pk, admin.token_version)
    row = PortalUser.objects.get(pk=admin.pk)
    assert row.state == PortalUser.State.NEEDS_REOPEN and not row.has_tokens
    assert row.state_reason == "invalid_grant: Invalid refresh token"
    assert Portal.objects.get().state == Portal.State.ACTIVE


def test_a_deleted_portal_is_marked_for_reinstall_not_the_user(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    sb(sandbox, "config", {"portal": "alpha", "portal_deleted": True})
    with pytest.raises(ReinstallRequired, match="PORTAL_DELETED"):
        tokens.refresh_user_token(admin.pk, admin.token_version)
    portal = Portal.objects.get()
    assert portal.state == Portal.State.NEEDS_REINSTALL
    assert portal.state_reason.startswith("PORTAL_DELETED: ")
    assert PortalUser.objects.get(pk=admin.pk).state == PortalUser.State.ACTIVE


def test_a_long_reason_is_cut_to_the_column(sandbox: Any) -> None:
    portal, admin = _installed(sandbox)
    tokens.mark_user_needs_reopen(admin.pk, "r" * 500)
    tokens.mark_portal_needs_reinstall(portal.pk, "p" * 500)
    assert PortalUser.objects.get(pk=admin.pk).state_reason == "r" * 300
    assert Portal.objects.get().state_reason == "p" * 300


# --- the retried call ---------------------------------------------------------------------------


def test_a_fresh_token_the_portal_still_refuses_asks_for_a_reopen(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    calls: list[str] = []

    def refused_then_refused(client: Any, token: str) -> Any:
        calls.append(token)
        return client.call("profile", token="not-a-token-of-anyone").result

    with pytest.raises(ReopenRequired):
        tokens.call_with_user(admin, refused_then_refused)
    assert len(calls) == 2 and calls[0] != calls[1]  # retried once, with the refreshed token
    row = PortalUser.objects.get(pk=admin.pk)
    assert row.state == PortalUser.State.NEEDS_REOPEN and not row.has_tokens
    assert row.state_reason.split(":")[0] in {"NO_AUTH_FOUND", "invalid_token"}


def test_a_portal_gone_on_the_retry_is_marked_for_reinstall(sandbox: Any) -> None:
    _, admin = _installed(sandbox)
    sb(sandbox, "p/alpha/expire", {"user_id": 1})

    def profile_then_deleted(client: Any, token: str) -> Any:
        if _refreshes(sandbox):  # after the refresh, the portal is deleted
            sb(sandbox, "config", {"portal": "alpha", "portal_deleted": True})
        return client.call("profile", token=token).result

    with pytest.raises(ReinstallRequired, match="PORTAL_DELETED"):
        tokens.call_with_user(admin, profile_then_deleted)
    assert Portal.objects.get().state == Portal.State.NEEDS_REINSTALL


def test_a_refresh_answer_naming_a_new_address_is_checked_then_followed(sandbox: Any) -> None:
    portal, admin = _installed(sandbox)
    sb(sandbox, "p/alpha/rename", {"new_name": "alpha2"})
    moved_to = state(sandbox, "alpha2")["client_endpoint"]
    tokens.refresh_user_token(admin.pk, admin.token_version)
    assert Portal.objects.get().client_endpoint == moved_to != portal.client_endpoint


# --- idle chains and the admin's token ---------------------------------------------------------


def test_only_chains_idle_past_the_cutoff_are_kept_alive(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    for user_id in (2, 3):
        assert post_frame(client, launch(sandbox, "alpha", user_id)).status_code == 200
    idle = timezone.now() - tokens.KEEP_ALIVE_AFTER - timedelta(days=1)
    recent = timezone.now() - tokens.KEEP_ALIVE_AFTER + timedelta(days=1)
    PortalUser.objects.filter(user_id=2).update(last_seen_at=idle, refreshed_at=idle)
    PortalUser.objects.filter(user_id=3).update(last_seen_at=idle, refreshed_at=recent)
    PortalUser.objects.filter(user_id=1).update(last_seen_at=recent, refreshed_at=None)
    assert tokens.keep_idle_tokens_alive() == 1
    assert PortalUser.objects.get(user_id=2).refreshed_at > recent
    assert tokens.keep_idle_tokens_alive(limit=0) == 0
    PortalUser.objects.update(last_seen_at=idle, refreshed_at=None)
    assert tokens.keep_idle_tokens_alive() == 3  # every one counted


def test_a_failed_keep_alive_is_not_counted_and_does_not_stop_the_rest(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200
    idle = timezone.now() - tokens.KEEP_ALIVE_AFTER - timedelta(days=1)
    PortalUser.objects.update(last_seen_at=idle, refreshed_at=None)
    PortalUser.objects.filter(user_id=1).update(refresh_token="x" * 32)  # a dead chain
    assert tokens.keep_idle_tokens_alive() == 1
    assert PortalUser.objects.get(user_id=2).refreshed_at is not None


def test_portal_work_uses_the_installer_else_the_latest_admin(sandbox: Any) -> None:
    client = Client()
    portal, installer = _installed(sandbox)
    assert tokens.admin_user(portal).pk == installer.pk
    for user_id in (2, 3):
        assert post_frame(client, launch(sandbox, "alpha", user_id)).status_code == 200
    PortalUser.objects.filter(user_id__in=(2, 3)).update(is_admin=True)
    PortalUser.objects.filter(user_id=3).update(last_seen_at=timezone.now() + timedelta(minutes=1))
    assert tokens.admin_user(portal).pk == installer.pk  # the installer, though not the latest
    # Another portal's user of the same id is never this portal's installer.
    install(client, sandbox, "beta")
    assert tokens.admin_user(portal).pk == installer.pk
    PortalUser.objects.filter(portal=portal, user_id=1).update(state=PortalUser.State.NEEDS_REOPEN)
    assert tokens.admin_user(portal).user_id == 3  # not beta's user 1, who is active
    Portal.objects.filter(pk=portal.pk).update(installer_user_id=None)
    portal.refresh_from_db()
    PortalUser.objects.filter(portal=portal, user_id=1).update(state=PortalUser.State.ACTIVE)
    assert tokens.admin_user(portal).user_id == 3  # no installer: the latest admin
    PortalUser.objects.filter(user_id=3).update(access_token="")
    PortalUser.objects.filter(portal=portal, user_id=1).update(is_admin=False)
    with pytest.raises(ReopenRequired) as raised:
        tokens.admin_user(portal)
    assert raised.value.description == "no administrator token: an admin must open the app once"
