"""The Prometheus endpoint: who may scrape it, what a pin, a refresh and the limiter move, that
every web and worker process shows in one scrape, that no label carries a secret, and that the
dashboard and the compose profile match what the app exports."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from b24app import tokens
from b24app.bitrix.client import PortalClient
from b24app.bitrix.errors import BitrixError, RateLimited, ReopenRequired
from b24app.bitrix.ratelimit import PortalRateLimiter
from b24app.calllog import record_call
from b24app.models import Portal, PortalUser, RestCall
from b24app.queues import FLOWPINS_QUEUES
from devtools.run import _metrics_dir
from devtools.supervisor import Process
from flows import intents
from flows.models import PinIntent
from tests.faults.drive import click_http, wait_settled
from tests.faults.stack import RedisServer, start_web, start_worker, wait_until
from tests.helpers import install, launch, open_app, post_frame, sb, visible_to, worker_paused

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "metrics-test-token-0123456789abcdefghij"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[set[str], Samples]:
    """(family names, {(sample name, labels): value}) of a scrape."""
    families, samples = set(), {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def scrape_local(client: Client) -> Samples:
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200, response.content[:300]
    return parse(response.content.decode())[1]


@pytest.fixture
def metrics_on(settings: Any) -> None:
    settings.METRICS_TOKEN = TOKEN


# --- the door -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_are_off_without_a_token(settings: Any) -> None:
    settings.METRICS_TOKEN = ""
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 404
    assert b"flowpins_" not in response.content


@pytest.mark.django_db
def test_a_scrape_without_the_bearer_token_is_refused_with_no_data(metrics_on: None) -> None:
    client = Client()
    refused = [
        client.get("/metrics"),
        client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong-token"),
        client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN[:-1]}"),
        client.get("/metrics", HTTP_AUTHORIZATION=f"Basic {TOKEN}"),
        client.get(f"/metrics?token={TOKEN}"),
    ]
    for response in refused:
        assert response.status_code == 401
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"flowpins_" not in response.content
    allowed = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert allowed.status_code == 200 and b"flowpins_rest_calls" in allowed.content


def test_a_short_metrics_token_stops_start_up() -> None:
    env = {**os.environ, "METRICS_TOKEN": "short", "DJANGO_SETTINGS_MODULE": "tests.settings"}
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "METRICS_TOKEN must be 32 characters or more" in done.stderr


def _check(tmp_path: Path, **env: str) -> str:
    """What `manage.py check` says, in a fresh process with this environment."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in {"METRICS_TOKEN", "PROMETHEUS_MULTIPROC_DIR"}
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "check"],
        env={**base, "DJANGO_SETTINGS_MODULE": "tests.settings", **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]  # a warning, not a refusal
    return done.stdout + done.stderr


def test_metrics_without_the_shared_directory_are_warned_of(tmp_path: Path) -> None:
    """The app always runs a web and a worker: without one directory for both, a scrape of
    the web never shows the worker's counts."""
    alone = _check(tmp_path, METRICS_TOKEN=TOKEN)
    assert "b24app.W001" in alone and "never shows the Celery worker's counts" in alone
    assert TOKEN not in alone
    shared = _check(tmp_path, METRICS_TOKEN=TOKEN, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    assert "W001" not in shared and "no issues" in shared
    assert "W001" not in _check(tmp_path)  # metrics off


def _in_a_process(directory: str, code: str, cwd: Path) -> None:
    """Run `code` in a fresh process of the app, with PROMETHEUS_MULTIPROC_DIR=`directory`."""
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": directory,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}; print('ran')"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "ran", done.stderr[-2000:]


def test_an_empty_multiprocess_directory_setting_counts_in_memory(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR= (set, empty: a copied .env.example line) is not a directory:
    prometheus-client alone would write its files into the working directory."""
    _in_a_process("", "from b24app import metrics; metrics.pin_toggles('pinned')", tmp_path)
    assert list(tmp_path.glob("*.db")) == []


def test_a_process_that_counts_nothing_leaves_no_files(tmp_path: Path) -> None:
    """compose's worker health check loads the app every 30 s: it must not leave files behind
    for every scrape to read."""
    directory = tmp_path / "metrics"
    _in_a_process(str(directory), "from b24app import metrics", tmp_path)
    assert list(directory.glob("*.db")) == []
    _in_a_process(
        str(directory), "from b24app import metrics; metrics.pin_toggles('lost')", tmp_path
    )
    assert len(list(directory.glob("counter_*.db"))) == 1  # the directory is in use


# --- what moves them, in one process --------------------------------------------------------


def _profile(user: PortalUser) -> Any:
    return tokens.call_with_user(user, lambda c, t: c.call("profile", token=t).result)


@pytest.mark.django_db(transaction=True)
def test_an_expired_token_counts_the_refused_call_and_the_refreshes(
    sandbox: Any, metrics_on: None
) -> None:
    client = Client()
    install(client, sandbox)
    before = scrape_local(client)
    sb(sandbox, "p/alpha/expire", {"user_id": 1})
    assert _profile(PortalUser.objects.get(user_id=1))["ID"] == "1"
    after = scrape_local(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    calls = "flowpins_rest_calls_total"
    assert moved(calls, method="profile", result="expired_token", status="401") == 1
    assert moved(calls, method="profile", result="ok", status="200") == 1
    assert moved("flowpins_token_refreshes_total", result="ok") == 1
    assert moved("flowpins_rest_call_seconds_count", method="profile") == 2

    # A refresh token someone else spent: the refresh fails, counted by its type.
    assert post_frame(client, launch(sandbox, "alpha", 2)).status_code == 200
    user = PortalUser.objects.get(user_id=2)
    spent = requests.post(
        f"{sandbox.url}/oauth/token/",
        data={
            "grant_type": "refresh_token",
            "client_id": django_settings.B24_CLIENT_ID,
            "client_secret": django_settings.B24_CLIENT_SECRET,
            "refresh_token": user.refresh_token,
        },
        timeout=5,
    )
    assert spent.status_code == 200
    with pytest.raises(ReopenRequired):
        _profile(user)
    final = scrape_local(client)
    refreshes = "flowpins_token_refreshes_total"
    revoked = {"result": "AuthRevoked"}
    assert value(final, refreshes, **revoked) - value(after, refreshes, **revoked) == 1


@pytest.mark.django_db
def test_the_limiter_counts_waits_and_deferrals_and_names_the_portals_that_wait(
    metrics_on: None,
) -> None:
    client = Client()
    before = scrape_local(client)
    busy = PortalRateLimiter("busy-portal-member", rate=10, burst=2)
    waited = sum(busy.acquire(max_wait=2.0) for _ in range(4))  # the last two wait their turn
    with pytest.raises(RateLimited):
        busy.acquire(max_wait=0.0)  # a job that may not wait steps aside
    PortalRateLimiter("quiet-portal-member", rate=10, burst=5).acquire()
    after = scrape_local(client)

    assert waited > 0
    wait_count = "flowpins_limiter_wait_seconds_count"
    assert value(after, wait_count) - value(before, wait_count) == 5
    deferred = "flowpins_limiter_deferred_total"
    assert value(after, deferred) - value(before, deferred) == 1
    per_portal = "flowpins_portal_limiter_wait_seconds"
    assert value(after, per_portal, member_id="busy-portal-member") >= waited
    assert not any(
        n == per_portal and ("member_id", "quiet-portal-member") in ls for n, ls in after
    )


@pytest.mark.django_db(transaction=True)
def test_the_wait_counts_from_the_latest_click(sandbox: Any, metrics_on: None) -> None:
    install(Client(), sandbox)
    portal = Portal.objects.get()
    intents.set_desired(portal, 2, [7], True)
    time.sleep(0.5)  # a second click, later: its wait must not include this
    second_click = timezone.now()
    intents.set_desired(portal, 2, [7], False)
    before = scrape_local(Client())
    scope = PinIntent.objects.filter(portal=portal)
    assert intents.settle(scope, PinIntent.Status.DONE, "") == 1
    settled = timezone.now()
    after = scrape_local(Client())

    latency = "flowpins_click_to_settled_seconds"
    assert value(after, f"{latency}_count") - value(before, f"{latency}_count") == 1
    waited = value(after, f"{latency}_sum") - value(before, f"{latency}_sum")
    assert 0 <= waited <= (settled - second_click).total_seconds()


def test_make_run_gives_the_processes_one_emptied_metrics_directory(tmp_path: Path) -> None:
    stale = tmp_path / "metrics" / "counter_old-1.db"
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier run")
    older = [stale.with_name(n) for n in ("gauge_livesum_2.db", "histogram_3.db", "summary_4.db")]
    for file in older:
        file.write_bytes(b"an earlier run")
    foreign = stale.with_name("notes.db")  # PROMETHEUS_MULTIPROC_DIR may be shared: not ours
    foreign.write_bytes(b"someone else's")
    off: dict[str, str] = {}
    _metrics_dir(off, tmp_path)
    assert "PROMETHEUS_MULTIPROC_DIR" not in off and stale.exists()  # metrics off: untouched
    on = {"METRICS_TOKEN": TOKEN}
    _metrics_dir(on, tmp_path)
    assert on["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics")
    assert not stale.exists() and not any(file.exists() for file in older)
    assert foreign.read_bytes() == b"someone else's"


# --- no secret in a label ---------------------------------------------------------------------


class _Liar(BaseHTTPRequestHandler):
    """A portal that answers every call with an error code of its own making: here, a secret."""

    code = ""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": self.code, "error_description": "made up"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def lying_portal() -> Iterator[tuple[str, type[_Liar]]]:
    handler = type("Liar", (_Liar,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/rest/", handler
    server.shutdown()
    server.server_close()


@pytest.mark.django_db(transaction=True)
def test_no_label_value_holds_a_secret(
    sandbox: Any, metrics_on: None, lying_portal: tuple[str, type[_Liar]]
) -> None:
    client = Client()
    install(client, sandbox)
    open_app(client, sandbox, 2)
    sb(sandbox, "p/alpha/expire", {"user_id": 2})
    _profile(PortalUser.objects.get(user_id=2))  # an expired token and its refresh
    user = PortalUser.objects.get(user_id=2)
    endpoint, liar = lying_portal
    liar.code = user.access_token  # a portal (or anything before it) echoing the token back
    lied_to = PortalClient(member_id="liar", endpoint=endpoint, on_call=record_call)
    with pytest.raises(BitrixError):
        lied_to.call("profile", token=user.access_token)
    text = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode()

    portal = Portal.objects.get()
    secrets = {
        TOKEN,
        django_settings.B24_CLIENT_SECRET,
        django_settings.SECRET_KEY,
        portal.application_token,
        portal.domain,
    }
    for stored in PortalUser.objects.all():
        secrets |= {stored.access_token, stored.refresh_token}
    secrets.discard("")
    labels = {v for (_, ls) in parse(text)[1] for _, v in ls}
    assert "other" in labels  # the made-up code was counted, as "other"
    assert len(labels) > 10  # REST methods, results, statuses, outcomes: there was traffic
    leaked = {v for v in labels for s in secrets if s in v}
    assert not leaked


@pytest.mark.django_db(transaction=True)
def test_an_error_of_just_http_is_logged_and_counted_as_other(
    metrics_on: None, lying_portal: tuple[str, type[_Liar]]
) -> None:
    endpoint, liar = lying_portal
    liar.code = "HTTP_"  # a portal may answer any string
    lied_to = PortalClient(member_id="liar", endpoint=endpoint, on_call=record_call)
    counted = {"method": "profile", "result": "other"}
    before = value(scrape_local(Client()), "flowpins_rest_calls_total", **counted)
    with pytest.raises(BitrixError):
        lied_to.call("profile", token="t" * 40)
    assert list(RestCall.objects.filter(member_id="liar").values_list("method", "error")) == [
        ("profile", "HTTP_")
    ]
    after = value(scrape_local(Client()), "flowpins_rest_calls_total", **counted)
    assert after - before == 1


@pytest.mark.django_db(transaction=True)
def test_a_metrics_failure_keeps_the_call_log_row_and_is_logged_once(
    metrics_on: None,
    lying_portal: tuple[str, type[_Liar]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The metrics' files cannot be written (a full disk): the Market's call log still gets
    every row, and the failure is logged once, without its text (it may echo the portal)."""
    from b24app import calllog, metrics

    def full_disk(*labels: str) -> None:
        raise OSError(28, "No space left on device", "counter_1.db")

    monkeypatch.setattr(metrics.REST_CALLS, "labels", full_disk)
    monkeypatch.setattr(calllog, "_metrics_failure_logged", False, raising=False)
    endpoint, liar = lying_portal
    liar.code = "SECRET_ECHO_0123456789"
    lied_to = PortalClient(member_id="liar", endpoint=endpoint, on_call=record_call)
    for _ in range(2):
        with pytest.raises(BitrixError):
            lied_to.call("profile", token="t" * 40)
    assert RestCall.objects.filter(member_id="liar", error=liar.code).count() == 2
    warned = [r for r in caplog.records if "not being counted" in r.getMessage()]
    assert [r.getMessage() for r in warned] == [
        "REST calls are not being counted in the metrics: OSError"
    ]
    assert "No space left" not in caplog.text and liar.code not in caplog.text


# --- every process in one scrape: gunicorn and a Celery worker, as deployed ---------------------


@pytest.fixture
def metrics_stack(
    worker_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[dict[str, str], str, Path]]:
    """A private Redis and a gunicorn web with metrics on, sharing a PROMETHEUS_MULTIPROC_DIR
    with the worker the test starts; the session's worker is paused meanwhile (it shares the
    database)."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    directory = tmp_path / "metrics"
    env = {
        **worker_env,
        "REDIS_URL": redis_server.url(0),
        "CELERY_BROKER_URL": redis_server.url(0),
        "METRICS_TOKEN": TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    web, base = start_web(env, tmp_path / "web.log")
    try:
        with worker_paused():
            yield env, base, directory
    finally:
        web.stop()
        redis_server.kill()


def scrape_http(base: str) -> Samples:
    response = requests.get(
        f"{base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert response.status_code == 200, response.text[:300]
    return parse(response.text)[1]


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_pin_moves_the_counters_and_the_workers_counts_show_in_the_webs_scrape(
    sandbox: Any, metrics_stack: tuple[dict[str, str], str, Path], tmp_path: Path
) -> None:
    env, base, directory = metrics_stack
    client = Client()
    install(client, sandbox)
    token = open_app(client, sandbox, 2)
    flow = visible_to(sandbox, 2)[0]
    before = scrape_http(base)

    assert click_http(base, token, [flow], True).status_code == 202
    waiting = scrape_http(base)  # no worker yet: the click waits in the database and the queue
    assert value(waiting, "flowpins_pin_intents_pending") == 1
    assert value(waiting, "flowpins_celery_queue_length", queue="flowpins") >= 1
    depth = "flowpins_celery_queue_length"
    reported = {dict(labels)["queue"] for (name, labels) in waiting if name == depth}
    assert reported == set(FLOWPINS_QUEUES)  # every queue
    assert value(waiting, "flowpins_scrape_source_up", source="database") == 1

    worker: Process = start_worker(env, tmp_path / "worker.log", name="metrics@%h")
    try:
        wait_settled(40, expected=1)
        # The counts follow the settling UPDATE by a moment, in the worker's own files.
        latency = "flowpins_click_to_settled_seconds_count"
        wait_until(
            lambda: value(scrape_http(base), latency) > value(before, latency), 10, "the latency"
        )
        after = scrape_http(base)
    finally:
        worker.stop()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("flowpins_pin_toggles_total", answer="pinned") == 1
    assert moved("flowpins_pin_toggles_total") == 1
    assert moved("flowpins_pins_settled_total", outcome="done", problem="none") == 1
    assert moved("flowpins_click_to_settled_seconds_count", outcome="done") == 1
    pin = {"method": "tasks.flow.Flow.pin"}
    assert moved("flowpins_rest_calls_total", **pin, result="ok", status="200") == 1
    assert moved("flowpins_rest_calls_total", **pin) == 1
    assert value(after, "flowpins_pin_intents_pending") == 0
    # Counted by the worker process, in its own file; served by gunicorn's.
    assert (directory / f"counter_{socket.gethostname()}-{worker.pid}.db").is_file()


# --- the dashboard and the compose profile ----------------------------------------------------


_SUFFIXES = re.compile(r"_(total|bucket|count|sum|created)$")


@pytest.mark.django_db
def test_every_dashboard_panel_queries_metrics_the_app_exports_and_every_metric_is_shown(
    metrics_on: None,
) -> None:
    text = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode()
    exported = {name for name in parse(text)[0] if name.startswith("flowpins_")}
    dashboard = json.loads((ROOT / "ops/grafana/flowpins.json").read_text())
    shown: set[str] = set()
    for panel in dashboard["panels"]:
        exprs = [target["expr"] for target in panel["targets"]]
        names = {_SUFFIXES.sub("", n) for e in exprs for n in re.findall(r"flowpins_\w+", e)}
        assert names, f"panel {panel['title']!r} queries no metric"
        assert names <= exported, f"panel {panel['title']!r}: {names - exported} not exported"
        assert panel["datasource"]["uid"] == "flowpins-prometheus"
        shown |= names
    assert exported - shown == set(), "metrics no panel shows"


def test_the_monitoring_profile_runs_prometheus_and_grafana_on_files_in_the_repo() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    monitoring = {name for name, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    for name in ("web", "worker", "worker-background"):  # every process writes to one directory
        directory = services[name]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
        assert f"metrics:{directory}" in services[name]["volumes"]
    for name in monitoring:
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
    assert compose["secrets"]["metrics_token"] == {"environment": "METRICS_TOKEN"}
    assert any(s["source"] == "metrics_token" for s in services["prometheus"]["secrets"])

    prometheus = yaml.safe_load((ROOT / "ops/prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_token"
    assert job["static_configs"][0]["targets"] == ["web:8000"]
    grafana = ROOT / "ops/grafana/provisioning"
    source = yaml.safe_load((grafana / "datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == "flowpins-prometheus"
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((grafana / "dashboards/flowpins.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounted = [v.split(":")[1] for v in services["grafana"]["volumes"]]
    assert f"{path}/flowpins.json" in mounted
