"""Rules about a request's shape, each shown on a request that is otherwise genuine (the right
tokens, as the sandbox's Bitrix24 sends them), so that the rule is the only thing refusing it:
events must be form-encoded, and no body may exceed DATA_UPLOAD_MAX_MEMORY_SIZE."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client

from b24app.models import Portal
from tests.helpers import frame_path, install, launch, sb, state
from tests.security.conftest import stored_state

pytestmark = pytest.mark.django_db(transaction=True)

FORM = "application/x-www-form-urlencoded"


def genuine_uninstall(sandbox: Any) -> dict[str, str]:
    """The ONAPPUNINSTALL Bitrix24 sends after an admin removed the app (the sandbox has
    revoked the app's tokens, so the app can confirm it): accepted when posted as it is."""
    sent = sb(sandbox, "p/alpha/event", {"event": "ONAPPUNINSTALL", "deliver": False})
    return dict(sent["deliveries"][0]["payload"])


def portal_calls(sandbox: Any) -> list[int]:
    return [state(sandbox, name)["counters"]["requests"] for name in ("alpha", "beta")]


def refused(response: Any, status: int, words: str) -> None:
    body = response.content.decode()
    assert response.status_code == status, body[:300]
    assert words in body, body[:300]


def test_a_genuine_event_sent_as_multipart_is_refused_and_uninstalls_nothing(
    sandbox: Any,
) -> None:
    """Django parses multipart into request.POST just as it parses a form, so only the
    content-type rule stands between this event and an uninstall."""
    client = Client()
    install(client, sandbox)
    payload = genuine_uninstall(sandbox)
    before, calls = stored_state(), portal_calls(sandbox)

    multipart = client.post("/b24/events/", data=payload)  # the test client's multipart

    refused(multipart, 400, "Events must be form-encoded")
    assert stored_state() == before and Portal.objects.get().state == Portal.State.ACTIVE
    assert portal_calls(sandbox) == calls  # not even asked whether the uninstall is real
    # The same event, form-encoded as Bitrix24 sends it, is genuine: it uninstalls.
    genuine = client.post("/b24/events/", data=urlencode(payload), content_type=FORM)
    assert genuine.status_code == 200, genuine.content[:300]
    assert Portal.objects.get().state == Portal.State.UNINSTALLED


# --- the body cap ----------------------------------------------------------------------------

# One field nobody reads, past the 256 KiB cap: the request is otherwise what Bitrix24 sends.
PADDING = {"padding": "A" * (300 * 1024)}


def _install_post(client: Client, sandbox: Any) -> tuple[str, dict[str, str]]:
    launched = launch(sandbox, "alpha", 1, installer=True)  # not installed yet: it would be
    return frame_path(launched), dict(launched["form"])


def _app_post(client: Client, sandbox: Any) -> tuple[str, dict[str, str]]:
    install(client, sandbox)
    launched = launch(sandbox, "alpha", 2)  # user 2 never opened it: their tokens would be kept
    return frame_path(launched), dict(launched["form"])


def _event_post(client: Client, sandbox: Any) -> tuple[str, dict[str, str]]:
    install(client, sandbox)
    return "/b24/events/", genuine_uninstall(sandbox)


@pytest.mark.parametrize(
    "genuine",
    [
        pytest.param(_install_post, id="install"),
        pytest.param(_app_post, id="app"),
        pytest.param(_event_post, id="event"),
    ],
)
def test_a_genuine_request_over_the_body_cap_is_refused_and_changes_nothing(
    sandbox: Any, genuine: Any
) -> None:
    client = Client()
    path, form = genuine(client, sandbox)
    before, calls = stored_state(), portal_calls(sandbox)

    oversized = client.post(path, data=urlencode({**form, **PADDING}), content_type=FORM)

    refused(oversized, 413, "The request is too large")
    assert stored_state() == before
    assert portal_calls(sandbox) == calls
    # Without the padding the very same request is accepted: the size alone refused it.
    accepted = client.post(path, data=urlencode(form), content_type=FORM)
    assert accepted.status_code == 200, accepted.content[:300]
    assert stored_state() != before
