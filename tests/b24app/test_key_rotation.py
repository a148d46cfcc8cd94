"""B24_TOKEN_KEY rotation: `manage.py rotate_token_key` moves every stored secret to the newest
key (without losing a refresh that happens meanwhile), and a key set that cannot read the stored
tokens stops `check`, gunicorn and the Celery worker with words that say how to fix it."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import TextField
from django.db.models.functions import Cast
from django.utils import timezone

from b24app import crypto, tokens
from b24app.bitrix import oauth
from b24app.models import Portal, PortalUser
from devtools.procs import free_port, worker_command

ROOT = Path(__file__).resolve().parents[2]
OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()
SECRETS = {
    "portals": {"m-one": "app-token-one", "m-two": "app-token-two"},
    "users": {
        ("m-one", 1): ("access-one-1", "refresh-one-1"),
        ("m-one", 2): ("access-one-2", "refresh-one-2"),
        ("m-two", 7): ("access-two-7", "refresh-two-7"),
    },
}


def _store_secrets() -> None:
    for member_id, app_token in SECRETS["portals"].items():
        Portal.objects.create(
            member_id=member_id,
            domain=f"{member_id}.example",
            client_endpoint=f"https://{member_id}.example/rest/",
            server_endpoint="https://oauth.bitrix.info/rest/",
            application_token=app_token,
        )
    for (member_id, user_id), (access, refresh) in SECRETS["users"].items():
        PortalUser.objects.create(
            portal=Portal.objects.get(member_id=member_id),
            user_id=user_id,
            access_token=access,
            refresh_token=refresh,
        )
    # A user without tokens (asked to reopen the app): nothing to rewrite.
    PortalUser.objects.create(portal=Portal.objects.get(member_id="m-two"), user_id=8)


def _raw() -> list[str]:
    """Every stored secret as it is in the database (still encrypted)."""
    raw = Cast("application_token", output_field=TextField())
    values = list(Portal.objects.order_by("pk").values_list(raw, flat=True))
    for access, refresh in PortalUser.objects.order_by("pk").values_list(
        Cast("access_token", output_field=TextField()),
        Cast("refresh_token", output_field=TextField()),
    ):
        values += [access, refresh]
    return [v for v in values if v]


def _plain_portals() -> dict[str, str]:
    """Every portal's application token, decrypted with the configured keys."""
    return dict(Portal.objects.values_list("member_id", "application_token"))


def _plain() -> dict[str, Any]:
    """Every stored secret, decrypted with the configured keys."""
    return {
        "portals": _plain_portals(),
        "users": {
            (u.portal.member_id, u.user_id): (u.access_token, u.refresh_token)
            for u in PortalUser.objects.select_related("portal").exclude(access_token="")
        },
    }


def _rotate() -> str:
    out = io.StringIO()
    call_command("rotate_token_key", stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_rotation_moves_every_secret_to_the_new_key_so_the_old_one_can_go(settings: Any) -> None:
    settings.B24_TOKEN_KEY = OLD
    _store_secrets()
    settings.B24_TOKEN_KEY = f"{NEW},{OLD}"

    assert _rotate().strip() == ("re-encrypted 2 portals, 3 users; the old key can now be removed")

    rotated = _raw()
    assert len(rotated) == 8
    settings.B24_TOKEN_KEY = OLD  # the old key alone opens nothing any more...
    assert not any(crypto.readable(value) for value in rotated)
    settings.B24_TOKEN_KEY = NEW  # ...and the new key alone opens everything, unchanged
    assert _plain() == SECRETS
    # Idempotent: a second run finds nothing to do and changes no stored byte.
    settings.B24_TOKEN_KEY = f"{NEW},{OLD}"
    assert _rotate().startswith("re-encrypted 0 portals, 0 users;")
    assert _raw() == rotated


@pytest.mark.django_db
def test_rotation_leaves_a_value_no_key_opens_and_says_so(settings: Any) -> None:
    lost_key = Fernet.generate_key().decode()
    settings.B24_TOKEN_KEY = OLD
    _store_secrets()
    settings.B24_TOKEN_KEY = lost_key
    PortalUser.objects.filter(user_id=7).update(
        access_token="written-with-a-lost-key", token_digest="digest-of-the-stored-pair"
    )
    lost = PortalUser.objects.filter(user_id=7).values_list(
        Cast("access_token", output_field=TextField()), flat=True
    )[0]
    settings.B24_TOKEN_KEY = f"{NEW},{OLD}"

    with pytest.raises(CommandError) as refused:
        _rotate()

    assert "1 stored values open with no key" in str(refused.value)
    assert "can now be removed" not in str(refused.value)
    assert lost in _raw()  # left exactly as it was, not destroyed
    # ... and no longer vouched for: the user's next open stores the frame's pair, even if it
    # is the very pair that was stored.
    assert PortalUser.objects.filter(user_id=7).values_list("token_digest", flat=True)[0] == ""
    settings.B24_TOKEN_KEY = NEW  # everything else did move to the new key
    assert _plain_portals() == SECRETS["portals"]


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_rotation_waits_for_a_refresh_holding_the_row_and_keeps_its_new_tokens(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refresh tokens are single-use: if the rotation wrote back the pair it read before a refresh
    saved a new one, the user's token chain would be dead."""
    settings.B24_TOKEN_KEY = OLD
    _store_secrets()
    Portal.objects.update(application_token="")  # only the user row needs rewriting
    settings.B24_TOKEN_KEY = f"{NEW},{OLD}"
    user = PortalUser.objects.select_related("portal").get(user_id=7)
    refreshing, go_on = threading.Event(), threading.Event()

    def slow_refresh(server_endpoint: str, refresh_token: str) -> oauth.TokenSet:
        refreshing.set()  # the row is locked now
        assert go_on.wait(10)
        return oauth.TokenSet(
            access_token="access-after-refresh",
            refresh_token="refresh-after-refresh",
            expires_at=time.time() + 3600,
            member_id="m-two",
            user_id=7,
            client_endpoint=user.portal.client_endpoint,
            server_endpoint=user.portal.server_endpoint,
            domain="oauth.bitrix.info",
        )

    monkeypatch.setattr(oauth, "refresh", slow_refresh)
    results: dict[str, Any] = {}

    def in_thread(name: str, work: Any) -> threading.Thread:
        def run() -> None:
            try:
                results[name] = work()
            finally:
                connection.close()

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    refresh = in_thread("refresh", lambda: tokens.refresh_user_token(user.pk, user.token_version))
    assert refreshing.wait(10)
    rotation = in_thread("rotation", _rotate)
    time.sleep(0.5)  # time enough for a rotation that does not wait to read the old pair
    assert "rotation" not in results  # it waits for the refresh's row lock
    go_on.set()
    refresh.join(10)
    rotation.join(10)

    settings.B24_TOKEN_KEY = NEW
    stored = PortalUser.objects.get(user_id=7)
    assert (stored.access_token, stored.refresh_token) == (
        "access-after-refresh",
        "refresh-after-refresh",
    )
    assert results["refresh"][0] == "access-after-refresh"
    assert all(crypto.sealed_with_newest_key(value) for value in _raw())


# --- the start-up check -----------------------------------------------------------------------


def _store_with_an_old_key_long_ago(settings: Any) -> None:
    """Most rows written lately with NEW, one user untouched since OLD was the key: the sample
    must find that one."""
    settings.B24_TOKEN_KEY = NEW
    _store_secrets()
    for extra in range(20):
        PortalUser.objects.create(
            portal=Portal.objects.get(member_id="m-one"),
            user_id=100 + extra,
            access_token=f"recent-access-{extra}",
            refresh_token=f"recent-refresh-{extra}",
        )
    settings.B24_TOKEN_KEY = OLD
    PortalUser.objects.filter(user_id=2).update(
        access_token="access-one-2",
        refresh_token="refresh-one-2",
        last_seen_at=timezone.now() - timedelta(days=90),
    )


def _run(command: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout + proc.stderr


def _assert_refusal(output: str) -> None:
    assert "B24_TOKEN_KEY cannot decrypt tokens stored with an earlier key" in output, output[
        -2000:
    ]
    assert "rotate_token_key" in output
    for secret in (OLD, NEW, "access-one-2", "refresh-one-2"):  # words, never a key or a token
        assert secret not in output


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_check_refuses_a_key_set_that_cannot_read_stored_tokens(
    settings: Any, worker_env: dict[str, str]
) -> None:
    _store_with_an_old_key_long_ago(settings)
    check = [sys.executable, "manage.py", "check", "--database", "default"]

    code, output = _run(check, {**worker_env, "B24_TOKEN_KEY": NEW})
    assert code != 0
    _assert_refusal(output)

    code, output = _run(check, {**worker_env, "B24_TOKEN_KEY": f"{NEW},{OLD}"})
    assert code == 0, output[-2000:]


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_gunicorn_and_the_worker_refuse_to_start_with_it(
    settings: Any, worker_env: dict[str, str], tmp_path: Path
) -> None:
    _store_with_an_old_key_long_ago(settings)
    wrong = {**worker_env, "B24_TOKEN_KEY": NEW}
    gunicorn = [
        str(Path(sys.executable).parent / "gunicorn"),
        "b24app.wsgi",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--workers",
        "1",
    ]
    code, output = _run(gunicorn, wrong)
    assert code != 0
    _assert_refusal(output)

    worker = [*worker_command(concurrency=1, queue="rotation-test-nothing", quiet=True)]
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            worker,
            cwd=ROOT,
            env=wrong,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # it started after all: stop it, the assertion below fails
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
    assert code != 0
    _assert_refusal(log.read_text())

    # With the old key kept after the new one, the web application loads.
    code, output = _run(
        [sys.executable, "-c", "import b24app.wsgi"],
        {**worker_env, "B24_TOKEN_KEY": f"{NEW},{OLD}"},
    )
    assert code == 0, output[-2000:]


def test_a_database_outage_at_start_up_is_logged_and_does_not_stop_the_web_server() -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:{free_port()}/nothing",
    }
    code, output = _run([sys.executable, "-c", "import b24app.wsgi"], env)
    assert code == 0, output[-2000:]
    assert "could not read stored tokens to check B24_TOKEN_KEY" in output
