"""The verification module's rules, one at a time, in the test process (so `make mutate` can run
them against each mutant): what an install or app POST and a lifecycle event must carry, what
the OAuth server must vouch for, and what each refusal says. The requests are built as
Bitrix24 sends them (the sandbox mints real tokens); the OAuth server and the portal answer
over HTTP; the stored portal is in PostgreSQL and the vouched answers in Redis."""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client, RequestFactory

from b24app import frame
from b24app.bitrix import oauth
from b24app.eventauth import event_name, verify_event
from b24app.models import Portal, PortalUser
from b24app.problems import Refused
from b24app.stored import AlsoRead
from tests.helpers import install, launch, sb, state

pytestmark = [pytest.mark.mutation, pytest.mark.django_db]


def _frame_request(form: dict[str, str], query: str = "", **headers: str) -> Any:
    return RequestFactory().post(f"/b24/app/{query}", data=form, **headers)


def _verify(form: dict[str, str], *, installing: bool = False, **kw: Any) -> frame.VerifiedFrame:
    return frame.verify_frame_post(_frame_request(form, **kw), installing=installing)


def _refused(form: dict[str, str], *, installing: bool = False, **kw: Any) -> tuple[int, str]:
    with pytest.raises(Refused) as raised:
        _verify(form, installing=installing, **kw)
    return raised.value.status, raised.value.message


@pytest.fixture
def installed(sandbox: Any) -> Portal:
    install(Client(), sandbox)
    return Portal.objects.get()


def _form(sandbox: Any, user_id: int = 2, portal: str = "alpha", **extra: Any) -> dict[str, str]:
    return dict(launch(sandbox, portal, user_id, **extra)["form"])


# --- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("0", 0), ("9999999999", 9999999999), ("12345678901", None), ("", None)]
    + [("²", None), ("-5", None), ("1.5", None), ("36 00", None)],
)
def test_seconds_are_ascii_digits_only(text: str, seconds: int | None) -> None:
    assert frame.parse_seconds(text) == seconds


def test_tokens_are_equal_only_when_both_are_given_and_the_same() -> None:
    assert frame.tokens_equal("abc", "abc") is True
    assert frame.tokens_equal("abc", "abd") is False
    assert frame.tokens_equal("", "") is False
    assert frame.tokens_equal("abc", "") is False
    assert frame.tokens_equal("", "abc") is False


def test_a_verified_frame_keeps_its_secrets_out_of_repr(installed: Portal, sandbox: Any) -> None:
    form = _form(sandbox, 2)
    verified = _verify(form)
    text = repr(verified)
    for secret in (form["AUTH_ID"], form["REFRESH_ID"], form["APPLICATION_TOKEN"]):
        assert secret not in text
    assert "scope=" in text and "lang=" in text


# --- the fields of a frame POST ------------------------------------------------------------------


def test_an_app_post_yields_what_bitrix24_sent_and_vouched_for(
    installed: Portal, sandbox: Any
) -> None:
    form = _form(sandbox, 2, placement_options={"any": "thing"})
    form["AUTH_EXPIRES"] = " 1800 "
    form["APPLICATION_SCOPE"] = "task,placement"
    verified = _verify(form, query="?LANG=RU")
    assert verified.info.member_id == installed.member_id and verified.user_id == 2
    assert verified.info.client_endpoint == state(sandbox)["client_endpoint"]
    assert verified.server_endpoint == form["SERVER_ENDPOINT"]
    assert verified.access_token == form["AUTH_ID"]
    assert verified.refresh_token == form["REFRESH_ID"]
    assert verified.expires_in == 1800
    assert verified.application_token == form["APPLICATION_TOKEN"]
    assert verified.scope == "task,placement"
    assert verified.lang == "ru"
    assert verified.placement == "DEFAULT"
    assert verified.placement_options == {"any": "thing"}
    assert verified.portal is not None and verified.portal.pk == installed.pk
    assert verified.user is None  # user 2 never opened the app
    assert verified.also is None


def _user_language(vendor: str) -> str:
    return "u.language"


USER_LANGUAGE = AlsoRead("user_language", _user_language)


def test_a_frame_reads_what_its_caller_asks_for_with_the_user(
    installed: Portal, sandbox: Any
) -> None:
    PortalUser.objects.filter(user_id=1).update(language="ru")
    request = _frame_request(_form(sandbox, 1))
    verified = frame.verify_frame_post(request, installing=False, also=USER_LANGUAGE)
    assert verified.user is not None and verified.also == "ru"


def test_missing_optional_fields_take_their_defaults(installed: Portal, sandbox: Any) -> None:
    form = _form(sandbox, 1)
    for name in (
        "AUTH_EXPIRES",
        "PLACEMENT",
        "PLACEMENT_OPTIONS",
        "REFRESH_ID",
        "APPLICATION_SCOPE",
    ):
        form.pop(name)
    verified = _verify(form, query="?LANG=fr")  # a Bitrix24 language with no catalog here
    assert verified.expires_in == 3600
    assert verified.placement == "DEFAULT"
    assert verified.placement_options == {}
    assert verified.refresh_token == "" and verified.scope == ""
    assert verified.lang == "en"
    assert verified.user is not None and verified.user.user_id == 1
    assert _verify(_form(sandbox, 1)).lang == "en"  # no LANG at all


@pytest.mark.parametrize(
    ("name", "limit"),
    [("member_id", 64), ("AUTH_ID", 512), ("SERVER_ENDPOINT", 500)],
)
def test_a_required_field_must_be_there(
    installed: Portal, sandbox: Any, name: str, limit: int
) -> None:
    form = _form(sandbox)
    form[name] = "   "
    assert _refused(form) == (400, f"The request is missing {name}: open the app from Bitrix24.")
    form.pop(name)
    assert _refused(form) == (400, f"The request is missing {name}: open the app from Bitrix24.")
    form[name] = "a" * (limit + 1)
    assert _refused(form) == (400, f"{name} is too long.")


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("REFRESH_ID", 512),
        ("APPLICATION_TOKEN", 200),
        ("AUTH_EXPIRES", 10),
        ("PLACEMENT", 100),
        ("PLACEMENT_OPTIONS", 10000),
        ("APPLICATION_SCOPE", 500),
    ],
)
def test_an_optional_field_has_a_length_limit(
    installed: Portal, sandbox: Any, name: str, limit: int
) -> None:
    form = _form(sandbox)
    form[name] = "1" * (limit + 1)
    assert _refused(form) == (400, f"{name} is too long.")


def test_a_field_at_its_limit_is_taken(installed: Portal, sandbox: Any) -> None:
    form = _form(sandbox)
    form["APPLICATION_SCOPE"] = "s" * 500
    form["AUTH_EXPIRES"] = "1" * 10
    verified = _verify(form)
    assert verified.scope == "s" * 500 and verified.expires_in == 1111111111


@pytest.mark.parametrize("name", ["member_id", "AUTH_ID", "PLACEMENT", "APPLICATION_SCOPE"])
def test_a_nul_character_is_refused(installed: Portal, sandbox: Any, name: str) -> None:
    form = _form(sandbox)
    form[name] = form[name] + "\x00" if form[name] else "x\x00"
    assert _refused(form) == (400, f"{name} is malformed.")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("member_id", "not a member id", "member_id is malformed."),
        ("member_id", "a" * 64 + "", None),
        ("AUTH_ID", "short", "The authorization fields are malformed."),
        ("AUTH_ID", "spaces are not token characters", "The authorization fields are malformed."),
        ("REFRESH_ID", "short", "The authorization fields are malformed."),
        ("AUTH_EXPIRES", "soon", "AUTH_EXPIRES must be a number of seconds."),
        ("AUTH_EXPIRES", "²", "AUTH_EXPIRES must be a number of seconds."),
        ("PLACEMENT_OPTIONS", "{not json", "PLACEMENT_OPTIONS is not valid JSON."),
        ("PLACEMENT_OPTIONS", "[" * 3000 + "]" * 3000, "PLACEMENT_OPTIONS is not valid JSON."),
        ("PLACEMENT_OPTIONS", "[1, 2]", "PLACEMENT_OPTIONS must be a JSON object."),
        ("PLACEMENT_OPTIONS", '"text"', "PLACEMENT_OPTIONS must be a JSON object."),
    ],
)
def test_malformed_fields_are_refused_before_bitrix24_is_asked(
    installed: Portal, sandbox: Any, name: str, value: str, message: str | None
) -> None:
    form = _form(sandbox)
    form[name] = value
    if message is None:  # well-formed: refused later, by the OAuth server's answer
        assert _refused(form) == (
            403,
            "Refused: the portal id does not match Bitrix24's answer.",
        )
        return
    assert _refused(form) == (400, message)


def test_php_s_empty_array_means_no_placement_options(installed: Portal, sandbox: Any) -> None:
    form = _form(sandbox)
    form["PLACEMENT_OPTIONS"] = "[]"
    assert _verify(form).placement_options == {}


# --- what the OAuth server vouches for -------------------------------------------------------


def test_an_oauth_server_off_the_allow_list_is_refused(installed: Portal, sandbox: Any) -> None:
    form = _form(sandbox)
    form["SERVER_ENDPOINT"] = "http://127.0.0.1:9/rest/"
    assert _refused(form) == (
        403,
        "Refused: the OAuth server is not in B24_OAUTH_SERVERS.",
    )


def test_a_token_bitrix24_does_not_know_is_refused(installed: Portal, sandbox: Any) -> None:
    form = _form(sandbox)
    form["AUTH_ID"] = "z" * 40
    assert _refused(form) == (
        403,
        "Refused: Bitrix24 did not confirm this request (invalid_token).",
    )


def test_an_unreachable_oauth_server_is_a_503(
    installed: Portal, sandbox: Any, settings: Any
) -> None:
    dead = "http://127.0.0.1:9/rest/"
    settings.B24_OAUTH_SERVERS = [*settings.B24_OAUTH_SERVERS, dead.removesuffix("rest/")]
    form = _form(sandbox)
    form["SERVER_ENDPOINT"] = dead
    assert _refused(form) == (
        503,
        "Bitrix24's authorization server did not answer; try again in a minute.",
    )


def test_a_token_of_another_application_is_refused(
    installed: Portal, sandbox: Any, settings: Any
) -> None:
    form = _form(sandbox)
    settings.B24_CLIENT_ID = "local.another0000000002"
    assert _refused(form) == (403, "Refused: this token was issued to another application.")


def test_a_token_of_another_portal_is_refused(installed: Portal, sandbox: Any) -> None:
    form = _form(sandbox)
    form["member_id"] = state(sandbox, "beta")["member_id"]
    assert _refused(form) == (403, "Refused: the portal id does not match Bitrix24's answer.")


def test_a_portal_address_that_is_not_allowed_is_refused(
    installed: Portal, sandbox: Any, settings: Any
) -> None:
    form = _form(sandbox)
    # The OAuth server stays allowed (it is on the list); the portal's http address is not.
    settings.B24_ALLOW_HTTP = False
    settings.B24_OAUTH_SERVERS = [sandbox.url.replace("http://", "http://") + "/"]
    status, message = _refused(form)
    assert status == 403 and message.startswith("Refused: the ")


def test_a_vouched_token_is_trusted_from_the_cache_until_it_lapses(
    installed: Portal, sandbox: Any, settings: Any
) -> None:
    settings.B24_VERIFY_CACHE_SECONDS = 60
    form = _form(sandbox, 2)
    assert _verify(form).user_id == 2
    sb(sandbox, "p/alpha/expire", {"user_id": 2})  # Bitrix24 would now refuse the token
    assert _verify(form).user_id == 2  # the cached answer, in this process's memory
    frame.VOUCHED._local.clear()
    assert _verify(form).user_id == 2  # the cached answer, in Redis
    clock = frame.VOUCHED.clock
    try:
        frame.VOUCHED.clock = lambda: clock() + 61
        status, message = _refused(form)  # both lapsed: asked again
    finally:
        frame.VOUCHED.clock = clock
    assert (status, message) == (
        403,
        "Refused: Bitrix24 did not confirm this request (expired_token).",
    )


def test_nothing_is_cached_when_the_cache_is_off(
    installed: Portal, sandbox: Any, settings: Any
) -> None:
    settings.B24_VERIFY_CACHE_SECONDS = 0
    form = _form(sandbox, 2)
    assert _verify(form).user_id == 2
    sb(sandbox, "p/alpha/expire", {"user_id": 2})
    assert _refused(form)[0] == 403


def test_a_frame_opened_from_another_origin_is_asked_again(
    installed: Portal, sandbox: Any, settings: Any
) -> None:
    settings.B24_VERIFY_CACHE_SECONDS = 60
    form = _form(sandbox, 2)
    origin = oauth.origin_of(state(sandbox)["client_endpoint"])
    assert _verify(form, HTTP_ORIGIN=origin).user_id == 2
    sb(sandbox, "p/alpha/expire", {"user_id": 2})
    assert _verify(form, HTTP_ORIGIN=origin).user_id == 2  # the same parent: the cache
    assert _verify(form, HTTP_ORIGIN="null").user_id == 2  # a sandboxed parent: no origin
    assert _refused(form, HTTP_ORIGIN="http://127.9.9.9:1") == (  # elsewhere: asked again
        403,
        "Refused: Bitrix24 did not confirm this request (expired_token).",
    )
    # With a live token, asking again (the portal was renamed, say) answers as before.
    live = _form(sandbox, 2)
    assert _verify(live, HTTP_ORIGIN="http://127.9.9.9:1").user_id == 2


def test_the_cache_holds_no_token_in_clear(
    installed: Portal, sandbox: Any, settings: Any, redis_client: Any
) -> None:
    settings.B24_VERIFY_CACHE_SECONDS = 60
    form = _form(sandbox, 2)
    _verify(form)
    digest = hashlib.sha256(f"{form['SERVER_ENDPOINT']}|{form['AUTH_ID']}".encode()).hexdigest()
    key = f"fp:verify:{digest}"
    keys = list(redis_client.scan_iter(match="fp:verify:*"))  # the installer's, and this one
    assert key.encode() in keys and len(keys) == 2
    assert form["AUTH_ID"].encode() not in redis_client.get(key)
    assert json.loads(redis_client.get(key))["info"]["user_id"] == 2


def test_a_cache_of_one_second_still_caches(sandbox: Any, settings: Any) -> None:
    settings.B24_VERIFY_CACHE_SECONDS = 1
    cache = frame._Vouched()
    info = oauth.AppInfo("c", "m", "d", "http://e/", 1, "L", "task", True)
    cache.put("fp:verify:one", info)
    assert list(cache._local) == ["fp:verify:one"]


def test_the_cache_keeps_its_newest_entries_in_memory(sandbox: Any, settings: Any) -> None:
    settings.B24_VERIFY_CACHE_SECONDS = 60
    cache = frame._Vouched()
    cache.SIZE = 2
    info = oauth.AppInfo("c", "m", "d", "http://e/", 1, "L", "task", True)
    for key in ("fp:verify:a", "fp:verify:b", "fp:verify:c"):
        cache.put(key, info)
    assert list(cache._local) == ["fp:verify:b", "fp:verify:c"]
    cache.get("fp:verify:b")  # read back from memory: stays, and a put moves it last
    cache.put("fp:verify:b", info)
    assert list(cache._local) == ["fp:verify:c", "fp:verify:b"]
    assert cache.get("fp:verify:a") == info  # evicted from memory, still in Redis
    assert list(cache._local) == ["fp:verify:b", "fp:verify:a"]


def test_the_cache_ignores_what_it_cannot_read_or_what_lapsed(
    sandbox: Any, settings: Any, redis_client: Any
) -> None:
    settings.B24_VERIFY_CACHE_SECONDS = 60
    cache = frame._Vouched()
    info = oauth.AppInfo("c", "m", "d", "http://e/", 1, "L", "task", True)
    redis_client.set("fp:verify:x", "not json")
    assert cache.get("fp:verify:x") is None
    redis_client.set("fp:verify:x", json.dumps({"until": "soon", "info": {}}))
    assert cache.get("fp:verify:x") is None
    redis_client.set("fp:verify:x", json.dumps({"info": {}}))
    assert cache.get("fp:verify:x") is None
    now = cache.clock()
    lapsed = {"until": now - 1, "info": info.__dict__}
    redis_client.set("fp:verify:x", json.dumps(lapsed))
    assert cache.get("fp:verify:x") is None
    lapsed["until"] = now
    cache.clock = lambda: now
    redis_client.set("fp:verify:x", json.dumps(lapsed))
    assert cache.get("fp:verify:x") is None  # "until" is the first moment it is not trusted
    cache.put("fp:verify:y", info)
    assert redis_client.ttl("fp:verify:y") == 60
    cache.clock = lambda: now + 60
    assert cache.get("fp:verify:y") is None  # memory lapses at the same moment as Redis
    cache.clock = lambda: now + 59
    assert cache.get("fp:verify:y") == info


# --- install and app POSTs ---------------------------------------------------------------------


def test_an_install_post_needs_a_portal_admin(sandbox: Any) -> None:
    form = _form(sandbox, 2, installer=True)
    assert _refused(form, installing=True) == (
        403,
        "Only an administrator of this Bitrix24 can install, reinstall or update Flow Pins. "
        "Nothing was changed.",
    )
    admin = _form(sandbox, 1, installer=True)
    verified = _verify(admin, installing=True)
    assert verified.user_id == 1 and verified.portal is None  # not stored yet
    assert Portal.objects.count() == 0


def test_an_install_post_when_the_portal_cannot_say_who_is_admin(
    sandbox: Any, settings: Any
) -> None:
    form = _form(sandbox, 1, installer=True)
    sb(sandbox, "config", {"portal": "alpha", "error_5xx_ratio": 1.0})
    status, message = _refused(form, installing=True)
    assert (status, message) == (
        503,
        "Bitrix24 did not answer whether you are an administrator; try again shortly.",
    )
    sb(sandbox, "config", {"portal": "alpha", "error_5xx_ratio": 0, "portal_deleted": True})
    assert _refused(form, installing=True) == (
        403,
        "Refused: Bitrix24 did not confirm you are an administrator (PORTAL_DELETED).",
    )


def test_an_app_post_needs_the_app_installed(sandbox: Any) -> None:
    form = _form(sandbox, 2)
    message = (
        "This app is not installed on your portal yet: ask an administrator "
        "to install it from the Bitrix24 Market."
    )
    assert _refused(form) == (403, message)
    install(Client(), sandbox)
    Portal.objects.update(state=Portal.State.UNINSTALLED, application_token="")
    assert _refused(_form(sandbox, 2)) == (403, message)


def test_an_app_post_needs_the_portal_s_application_token(installed: Portal, sandbox: Any) -> None:
    message = (
        "Refused: the application token does not match this portal's. "
        "If the app was reinstalled, ask the admin to open it once."
    )
    form = _form(sandbox, 2)
    form["APPLICATION_TOKEN"] = "x" * 32
    assert _refused(form) == (403, message)
    form.pop("APPLICATION_TOKEN")
    assert _refused(form) == (403, message)
    # One with no token stored (an install never finished) is let in.
    Portal.objects.update(state=Portal.State.ACTIVE, application_token="")
    assert _verify(form).user_id == 2


def test_a_portal_needing_a_reinstall_still_lets_its_users_in(
    installed: Portal, sandbox: Any
) -> None:
    Portal.objects.update(state=Portal.State.NEEDS_REINSTALL)
    form = _form(sandbox, 2)
    form["APPLICATION_TOKEN"] = "x" * 32  # not compared: the stored one may be stale
    assert _verify(form).user_id == 2


# --- lifecycle events ----------------------------------------------------------------------------


def _event_request(payload: dict[str, str], content_type: str | None = None) -> Any:
    return RequestFactory().post(
        "/b24/events/",
        data=urlencode(payload),
        content_type=content_type or "application/x-www-form-urlencoded",
    )


def _event(sandbox: Any, name: str, user_id: int = 1, **extra: Any) -> dict[str, str]:
    """The body Bitrix24 would post for this event (built by the sandbox, not delivered)."""
    result = sb(
        sandbox,
        "p/alpha/event",
        {"event": name, "user_id": user_id, "forge": True, "deliver": False, **extra},
    )
    return dict(result["payload"])


def _event_refused(payload: dict[str, str], content_type: str | None = None) -> tuple[int, str]:
    with pytest.raises(Refused) as raised:
        verify_event(_event_request(payload, content_type))
    return raised.value.status, raised.value.message


def test_an_event_name_must_be_form_encoded_and_well_formed() -> None:
    assert event_name(_event_request({"event": " onAppInstall "})) == "ONAPPINSTALL"
    with pytest.raises(Refused) as raised:
        event_name(_event_request({"event": "ONAPPINSTALL"}, "multipart/form-data; boundary=x"))
    assert (raised.value.status, raised.value.message) == (
        400,
        "Events must be form-encoded, as Bitrix24 sends them.",
    )
    for body, message in [
        ({"other": "1"}, "The request has no event name."),
        ({"event": "  "}, "The request has no event name."),
        ({"event": "ON-APP"}, "The event name is malformed."),
        ({"event": "E" * 65}, "The event name is malformed."),
    ]:
        with pytest.raises(Refused) as raised:
            event_name(_event_request(body))
        assert (raised.value.status, raised.value.message) == (400, message)
    assert event_name(_event_request({"event": "E" * 64})) == "E" * 64


def test_an_event_the_app_does_not_handle_is_refused() -> None:
    assert _event_refused({"event": "ONTASKADD"}) == (
        400,
        "This app does not handle the event ONTASKADD.",
    )


def test_an_event_with_a_nul_character_is_refused(installed: Portal, sandbox: Any) -> None:
    payload = _event(sandbox, "ONAPPUPDATE")
    payload["data[VERSION]"] = "2\x00"
    assert _event_refused(payload) == (400, "The event holds a NUL character.")
    payload = _event(sandbox, "ONAPPUPDATE")
    payload["auth[scope]"] = "task\x00"
    assert _event_refused(payload) == (400, "The event holds a NUL character.")


@pytest.mark.parametrize("member_id", ["", "not valid!", None])
def test_an_event_needs_a_valid_member_id(
    installed: Portal, sandbox: Any, member_id: str | None
) -> None:
    payload = _event(sandbox, "ONAPPUNINSTALL")
    if member_id is None:
        del payload["auth[member_id]"]
    else:
        payload["auth[member_id]"] = member_id
    assert _event_refused(payload) == (400, "The event has no valid auth[member_id].")


def test_the_brackets_of_an_event_are_read_as_bitrix24_writes_them(
    installed: Portal, sandbox: Any
) -> None:
    payload = _event(sandbox, "ONAPPUNINSTALL", clean=1)
    payload["data[NOTE]"] = "n" * 2500
    payload["dataX[NOT]"] = "ignored"
    payload["data[OPEN"] = "ignored"
    verified = verify_event(_event_request(payload))
    assert verified.data["CLEAN"] == "1"
    assert verified.data["NOTE"] == "n" * 2000
    sent = {k[5:-1] for k in payload if k.startswith("data[") and k.endswith("]")}
    assert set(verified.data) == sent and "NOTE" in sent  # not "[NOT", not "OPE"
    assert verified.auth["member_id"] == installed.member_id
    assert verified.member_id == installed.member_id


def test_an_acknowledged_event_names_the_portal_only_with_its_token(
    installed: Portal, sandbox: Any
) -> None:
    payload = _event(sandbox, "ONAPPUNINSTALL")
    payload["event"] = "ONAPPUSERREADY"
    verified = verify_event(_event_request(payload))
    assert verified.name == "ONAPPUSERREADY" and verified.portal is not None
    assert verified.portal.pk == installed.pk and verified.info is None
    assert verified.member_id == installed.member_id
    assert verified.auth["application_token"] == installed.application_token
    assert verified.data == {k[5:-1]: v for k, v in payload.items() if k.startswith("data[")}
    payload["auth[application_token]"] = "x" * 32
    assert verify_event(_event_request(payload)).portal is None


def test_an_uninstall_needs_a_known_portal_and_its_token(installed: Portal, sandbox: Any) -> None:
    payload = _event(sandbox, "ONAPPUNINSTALL")
    verified = verify_event(_event_request(payload))
    assert verified.name == "ONAPPUNINSTALL" and verified.portal is not None
    assert verified.info is None and verified.admin is None
    assert verified.new_application_token is False
    payload["auth[application_token]"] = "x" * 32
    assert _event_refused(payload) == (403, "Refused: the application token does not match.")
    Portal.objects.update(state=Portal.State.UNINSTALLED)
    assert _event_refused(payload) == (403, "Refused: unknown portal.")
    payload["auth[member_id]"] = "unknownportal"
    assert _event_refused(payload) == (403, "Refused: unknown portal.")


def test_an_update_for_a_portal_that_never_installed_is_refused(sandbox: Any) -> None:
    payload = _event(sandbox, "ONAPPUPDATE")
    assert _event_refused(payload) == (
        403,
        "Refused: update for a portal that has not installed the app.",
    )


def test_an_update_with_the_stored_token_and_a_vouched_access_token(
    installed: Portal, sandbox: Any
) -> None:
    payload = _event(sandbox, "ONAPPUPDATE", user_id=2)  # a non-admin's token: fine here
    verified = verify_event(_event_request(payload))
    assert (verified.name, verified.member_id) == ("ONAPPUPDATE", installed.member_id)
    assert verified.auth["access_token"] == payload["auth[access_token]"]
    assert verified.info is not None and verified.info.user_id == 2
    assert verified.portal is not None and verified.portal.pk == installed.pk
    assert verified.new_application_token is False and verified.admin is None
    assert verified.data["VERSION"] == payload["data[VERSION]"]


def test_an_update_without_an_access_token_needs_the_stored_token(
    installed: Portal, sandbox: Any
) -> None:
    payload = {k: v for k, v in _event(sandbox, "ONAPPUPDATE").items() if "access_token" not in k}
    verified = verify_event(_event_request(payload))
    assert verified.info is None and verified.new_application_token is False
    payload["auth[application_token]"] = "x" * 32
    assert _event_refused(payload) == (
        403,
        "Refused: Bitrix24 sends this event with an access token.",
    )


def test_an_install_always_needs_an_access_token(sandbox: Any) -> None:
    payload = {k: v for k, v in _event(sandbox, "ONAPPINSTALL").items() if "access_token" not in k}
    assert _event_refused(payload) == (
        403,
        "Refused: Bitrix24 sends this event with an access token.",
    )


def test_an_event_needs_an_application_token(installed: Portal, sandbox: Any) -> None:
    payload = _event(sandbox, "ONAPPINSTALL")
    payload["auth[application_token]"] = ""
    assert _event_refused(payload) == (400, "The event has no auth[application_token].")
    update = _event(sandbox, "ONAPPUPDATE", user_id=2)
    del update["auth[application_token]"]
    assert _event_refused(update) == (400, "The event has no auth[application_token].")


def test_an_event_without_its_oauth_server_is_refused(installed: Portal, sandbox: Any) -> None:
    payload = _event(sandbox, "ONAPPUPDATE", user_id=1)
    del payload["auth[server_endpoint]"]
    assert _event_refused(payload) == (403, "Refused: the OAuth server must use https.")


def test_a_reinstall_without_an_access_token_is_refused(installed: Portal, sandbox: Any) -> None:
    payload = {k: v for k, v in _event(sandbox, "ONAPPINSTALL").items() if "access_token" not in k}
    assert payload["auth[application_token]"] == installed.application_token
    assert _event_refused(payload) == (
        403,
        "Refused: Bitrix24 sends this event with an access token.",
    )


def test_an_install_event_needs_an_admin_s_vouched_token(sandbox: Any) -> None:
    payload = _event(sandbox, "ONAPPINSTALL", user_id=2, application_token="a" * 32)
    status, message = _event_refused(payload)
    assert status == 403 and message.startswith("Only an administrator")
    admin = _event(sandbox, "ONAPPINSTALL", user_id=1, application_token="a" * 32)
    verified = verify_event(_event_request(admin))
    assert verified.portal is None and verified.admin is True
    assert verified.new_application_token is True
    assert verified.info is not None and verified.info.user_id == 1
    admin["auth[access_token]"] = "z" * 40
    assert _event_refused(admin)[0] == 403


def test_a_new_application_token_is_an_admin_s_to_set(installed: Portal, sandbox: Any) -> None:
    payload = _event(sandbox, "ONAPPUPDATE", user_id=2, application_token="b" * 32)
    status, message = _event_refused(payload)
    assert status == 403 and message.startswith("Only an administrator")
    admin = _event(sandbox, "ONAPPUPDATE", user_id=1, application_token="b" * 32)
    verified = verify_event(_event_request(admin))
    assert verified.admin is True and verified.new_application_token is True
    # A portal with no stored token (an install never finished) takes any, from anyone vouched.
    Portal.objects.update(application_token="")
    verified = verify_event(_event_request(payload))
    assert verified.admin is None and verified.new_application_token is True


def test_a_reinstall_event_is_an_admin_s_even_with_the_same_token(
    installed: Portal, sandbox: Any
) -> None:
    payload = _event(sandbox, "ONAPPINSTALL", user_id=2)
    assert _event_refused(payload)[0] == 403
    verified = verify_event(_event_request(_event(sandbox, "ONAPPINSTALL", user_id=1)))
    assert verified.admin is True and verified.new_application_token is False
    assert PortalUser.objects.filter(user_id=2).count() == 0  # nothing stored by verifying
