"""Secrets stay secret: no access token, refresh token, client secret or application_token in a
log line, a URL, a page or a broker message; and the database holds them only encrypted."""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import redis as redis_lib
from django.conf import settings as django_settings
from django.db import connection
from django.test import Client

from b24app import crypto
from b24app.models import Portal, PortalUser
from tests.faults.drive import click, wait_settled
from tests.faults.stack import wait_until
from tests.helpers import (
    install,
    launch,
    open_app,
    page_token,
    post_frame,
    sb,
    state,
    visible_to,
    wait_for_flow_list,
)

pytestmark = pytest.mark.django_db(transaction=True)


class BrokerTap:
    """Every command the Redis server executes on this run's database while the tap is open
    (MONITOR sees every database of the server: another run's traffic is left out), with the
    base64 bodies of Celery messages decoded, so a token inside a task's arguments shows."""

    def __init__(self, url: str) -> None:
        self.client = redis_lib.Redis.from_url(url)
        self.db = int(self.client.connection_pool.connection_kwargs.get("db", 0))
        self.monitor = self.client.monitor()
        self.monitor.__enter__()
        self.commands: list[str] = []
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        try:
            for command in self.monitor.listen():
                if command["db"] == self.db:
                    self.commands.append(command["command"])
        except Exception:  # the connection was closed by stop()
            return

    def stop(self) -> None:
        time.sleep(0.3)  # let the last commands arrive
        self.monitor.connection.disconnect()
        self.thread.join(timeout=5)
        self.client.close()

    def text(self) -> str:
        decoded = []
        for command in self.commands:
            for body in re.findall(r'"body": "([A-Za-z0-9+/=]{8,})"', command):
                decoded.append(base64.b64decode(body).decode(errors="replace"))
        return "\n".join(self.commands + decoded)


@pytest.mark.services
def test_no_secret_in_any_log_line_url_page_or_broker_message(
    sandbox: Any,
    celery_worker_process: Any,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The simulated portal writes the request line of every call it gets to stderr: the URLs
    # this app (web and worker) calls, as the portal's and the OAuth server's logs would hold.
    monkeypatch.setattr(sandbox._httpd.RequestHandlerClass, "verbose", True)
    caplog.set_level(logging.DEBUG)
    worker_log = Path(celery_worker_process.log_path)
    offset = worker_log.stat().st_size
    client = Client()
    tap = BrokerTap(django_settings.REDIS_URL)
    try:
        installer = launch(sandbox, "alpha", 1, installer=True)
        pages = [post_frame(client, installer)]
        sb(sandbox, "p/alpha/install_finish", {})
        launches = [launch(sandbox, "alpha", user, lang="en") for user in (1, 2)]
        pages += [post_frame(client, launched) for launched in launches]
        tokens = {user: page_token(page) for user, page in zip((1, 2), pages[1:], strict=True)}
        # A first open renders at once and the worker fetches the list: until it has, the
        # app knows no flow of the portal, and a click on one is refused (400, not recorded).
        for user in (1, 2):
            wait_for_flow_list(installer["form"]["member_id"], user)
        # An update event brings a token pair of its own, and queues work for the worker.
        update = sb(sandbox, "p/alpha/event", {"event": "ONAPPUPDATE", "deliver": False})
        event = dict(update["deliveries"][0]["payload"])
        pages.append(
            client.post(
                "/b24/events/",
                data=urlencode(event),
                content_type="application/x-www-form-urlencoded",
            )
        )
        # Every access token expires: the worker refreshes (both tokens rotate) to pin.
        sb(sandbox, "p/alpha/expire", {})
        clicks = [click(client, tokens[u], visible_to(sandbox, u)[:2], True) for u in (1, 2)]
        assert [c.status_code for c in clicks] == [202, 202], [c.content for c in clicks]
        pages += clicks
        wait_settled(30, expected=4)
        pages += [
            client.get("/flows/api/status", HTTP_X_FLOWPINS_TOKEN=tokens[user]) for user in (1, 2)
        ]
        # The update dropped the event bindings; the worker binds them again.
        wait_until(lambda: len(state(sandbox)["events"]) == 2, 20, "the handlers bound again")
    finally:
        tap.stop()

    users = list(PortalUser.objects.filter(user_id__in=(1, 2)))
    truth = state(sandbox)
    secrets = {
        "installer AUTH_ID": installer["form"]["AUTH_ID"],
        "installer REFRESH_ID": installer["form"]["REFRESH_ID"],
        **{f"user {la['user_id']} AUTH_ID": la["form"]["AUTH_ID"] for la in launches},
        **{f"user {la['user_id']} REFRESH_ID": la["form"]["REFRESH_ID"] for la in launches},
        "event access_token": event["auth[access_token]"],
        "event refresh_token": event["auth[refresh_token]"],
        **{f"stored access token {u.user_id}": u.access_token for u in users},
        **{f"stored refresh token {u.user_id}": u.refresh_token for u in users},
        "application_token": Portal.objects.get().application_token,
        "client secret": django_settings.B24_CLIENT_SECRET,
        "token key": django_settings.B24_TOKEN_KEY,
        "secret key": django_settings.SECRET_KEY,
    }
    # The run did what it had to: refreshed tokens, queued tasks, called the portal, logged.
    assert truth["counters"]["refresh_ok"] >= 2
    assert {u.refresh_token for u in users}.isdisjoint(
        {la["form"]["REFRESH_ID"] for la in launches} | {event["auth[refresh_token]"]}
    )
    broker = tap.text()
    assert "flows.converge" in broker and "b24app.bind_handlers" in broker
    assert '"portal_id"' in broker  # a decoded task body: ids only
    requested = capsys.readouterr().err
    assert "/p/alpha/rest/" in requested and "/oauth/token/" in requested
    worker = worker_log.read_bytes()[offset:].decode(errors="replace")
    assert "flows.converge" in worker
    handlers = [p["handler"] for p in truth["placements"]] + [e["handler"] for e in truth["events"]]

    haystacks = {
        "broker": broker,
        "worker log": worker,
        "web log": caplog.text + "\n".join(str(r.args) + str(r.msg) for r in caplog.records),
        "URLs called": requested,
        "pages and answers": "\n".join(p.content.decode(errors="replace") for p in pages),
        "URLs of the pages": "\n".join(
            u
            for p in pages
            for u in re.findall(r'(?:src|href|action)="([^"]*)"', p.content.decode())
        ),
        "handler URLs": "\n".join(handlers),
    }
    leaks = [
        (what, where)
        for what, secret in secrets.items()
        for where, text in haystacks.items()
        if secret and secret in text
    ]
    assert all(secrets.values()), [k for k, v in secrets.items() if not v]
    assert leaks == []


def test_tokens_in_the_database_are_unreadable_without_the_key(sandbox: Any, settings: Any) -> None:
    client = Client()
    install(client, sandbox)
    open_app(client, sandbox, 2)
    users = list(PortalUser.objects.all())
    portal = Portal.objects.get()
    plain = [u.access_token for u in users] + [u.refresh_token for u in users]
    plain.append(portal.application_token)
    assert all(plain) and len(plain) == 5

    # The whole database, every table and column, as text: no token in the clear anywhere.
    dump = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            dump.extend(repr(row) for row in cursor.fetchall())
    everything = "\n".join(dump)
    assert [p for p in plain if p in everything] == []

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT access_token, refresh_token FROM b24app_portaluser WHERE id = %s",
            [users[0].pk],
        )
        raw_access, raw_refresh = cursor.fetchone()
    assert crypto.decrypt(raw_access) == users[0].access_token  # the key opens it...
    key = settings.B24_TOKEN_KEY
    settings.B24_TOKEN_KEY = "a-key-that-is-not-the-one"
    for raw in (raw_access, raw_refresh):
        with pytest.raises(crypto.UndecryptableToken):  # ...nothing else does
            crypto.decrypt(raw)
    with pytest.raises(crypto.UndecryptableToken):
        PortalUser.objects.get(pk=users[0].pk)  # the app fails loudly, never reads garbage
    # The same plaintext is never the same ciphertext (no dictionary of known tokens works).
    settings.B24_TOKEN_KEY = key
    assert crypto.encrypt("same") != crypto.encrypt("same")
