"""A reopen of the app: the same token pair again writes nothing; a refused chain, or any other
pair, is replaced by the frame's at once."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from b24app import tokens
from b24app.models import PortalUser
from tests.helpers import install, launch, post_frame

pytestmark = [pytest.mark.django_db(transaction=True)]


def _writes(queries: CaptureQueriesContext) -> list[str]:
    return [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE"))
    ]


def _stored_pair(user_id: int) -> tuple[str, str, str]:
    user = PortalUser.objects.get(user_id=user_id)
    return user.access_token, user.refresh_token, user.state


def test_a_reopen_with_the_same_pair_writes_nothing_and_costs_one_query(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    launched = launch(sandbox, "alpha", 2)
    assert post_frame(client, launched).status_code == 200
    with CaptureQueriesContext(connection) as queries:
        response = post_frame(client, launched)
    assert response.status_code == 200
    assert _writes(queries) == []
    # The portal with the user's row and the user's intents, in one statement: nothing else
    # reaches the database.
    assert len(queries.captured_queries) == 1, [q["sql"] for q in queries.captured_queries]
    form = launched["form"]
    assert _stored_pair(2) == (form["AUTH_ID"], form["REFRESH_ID"], PortalUser.State.ACTIVE)


def test_a_reopen_after_a_refused_chain_stores_the_frames_pair_and_reactivates(
    sandbox: Any,
) -> None:
    client = Client()
    install(client, sandbox)
    launched = launch(sandbox, "alpha", 2)
    assert post_frame(client, launched).status_code == 200
    user = PortalUser.objects.get(user_id=2)
    tokens.mark_user_needs_reopen(user.pk, "invalid_grant: refused")
    assert post_frame(client, launched).status_code == 200  # the very same pair, reopened
    form = launched["form"]
    assert _stored_pair(2) == (form["AUTH_ID"], form["REFRESH_ID"], PortalUser.State.ACTIVE)
    # A user marked for a reopen whose digest somehow survived is still written and reactivated.
    PortalUser.objects.filter(pk=user.pk).update(state=PortalUser.State.NEEDS_REOPEN)
    with CaptureQueriesContext(connection) as queries:
        assert post_frame(client, launched).status_code == 200
    assert len(_writes(queries)) == 1
    assert PortalUser.objects.get(pk=user.pk).state == PortalUser.State.ACTIVE


def test_a_reopen_with_another_pair_stores_it(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200
    version = PortalUser.objects.get(user_id=2).token_version
    fresh = launch(sandbox, "alpha", 2)
    assert post_frame(client, fresh).status_code == 200
    form = fresh["form"]
    assert _stored_pair(2) == (form["AUTH_ID"], form["REFRESH_ID"], PortalUser.State.ACTIVE)
    assert PortalUser.objects.get(user_id=2).token_version == version + 1


def test_the_stored_digest_is_keyed_and_never_a_token(sandbox: Any) -> None:
    client = Client()
    install(client, sandbox)
    launched = launch(sandbox, "alpha", 2)
    post_frame(client, launched)
    digest = PortalUser.objects.get(user_id=2).token_digest
    form = launched["form"]
    assert len(digest) == 64 and form["AUTH_ID"] not in digest
    assert digest == tokens.token_pair_digest(form["AUTH_ID"], form["REFRESH_ID"])
    with connection.cursor() as cursor:
        cursor.execute("SELECT token_digest FROM b24app_portaluser")
        assert all(form["AUTH_ID"] not in row[0] for row in cursor.fetchall())
