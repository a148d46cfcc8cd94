"""The one settings module: every value comes from the environment (or a `.env` file).

Each variable is documented in README.md and `.env.example`. Outside DEBUG a missing secret stops
start-up with a message naming the variable, so a misconfigured deployment never half-works.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from b24app import queues as _queues
from b24app.logging import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("FLOWPINS_VAR_DIR", BASE_DIR / "var"))

env = environ.Env()
_env_file = os.environ.get("FLOWPINS_ENV_FILE", str(BASE_DIR / ".env"))
if Path(_env_file).is_file():
    environ.Env.read_env(_env_file, overwrite=False)

DEBUG: bool = env.bool("DEBUG", default=False)

# Development-only fallbacks. Outside DEBUG each of these must be set explicitly.
_DEV_FALLBACKS = {
    "SECRET_KEY": "dev-only-secret-key-not-for-production",
    # A Fernet key (urlsafe base64 of 32 bytes); dev only.
    "B24_TOKEN_KEY": "ZGV2LW9ubHktdG9rZW4ta2V5LW5vdC1mb3ItcHJvZCE=",
    "B24_CLIENT_ID": "local.sandbox0000000001",
    "B24_CLIENT_SECRET": "sandbox-client-secret",
}


def _secret(name: str) -> str:
    value: str = env.str(name, default="")
    if value:
        return value
    if DEBUG:
        return _DEV_FALLBACKS[name]
    raise ImproperlyConfigured(
        f"{name} is not set. Set it in the environment or in .env (see .env.example); "
        "only DEBUG=1 runs with development defaults."
    )


# Values that are public (.env.example, docs, the dev fallbacks above): outside DEBUG a secret
# equal to one of them is as good as none — anyone could forge page tokens with it.
_PLACEHOLDERS = frozenset(
    {"change-me", "changeme", "secret", "collectstatic", "test-secret-key", "bench-secret-key"}
    | set(_DEV_FALLBACKS.values())
)


def _check_secret_key(value: str) -> None:
    if value.lower() in _PLACEHOLDERS or value.startswith("django-insecure"):
        raise ImproperlyConfigured(
            "SECRET_KEY is a published placeholder: set a long random value "
            '(python -c "import secrets; print(secrets.token_urlsafe(50))").'
        )
    if len(value) < 50:
        raise ImproperlyConfigured(
            f"SECRET_KEY is too short ({len(value)} characters): use at least 50 random ones."
        )


def _check_token_keys(value: str) -> None:
    from base64 import urlsafe_b64decode
    from binascii import Error as Base64Error

    keys = [k.strip() for k in value.split(",") if k.strip()]
    for position, key in enumerate(keys, start=1):
        try:
            raw = urlsafe_b64decode(key.encode("ascii"))
        except (Base64Error, UnicodeEncodeError, ValueError):
            raw = b""
        if len(raw) != 32 or key in _PLACEHOLDERS:
            raise ImproperlyConfigured(
                f"B24_TOKEN_KEY key #{position} is not a Fernet key (urlsafe base64 of 32 "
                'random bytes): python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())"'
            )
    if not keys:
        raise ImproperlyConfigured("B24_TOKEN_KEY holds no key.")


SECRET_KEY = _secret("SECRET_KEY")
B24_TOKEN_KEY = _secret("B24_TOKEN_KEY")
B24_CLIENT_ID = _secret("B24_CLIENT_ID")
B24_CLIENT_SECRET = _secret("B24_CLIENT_SECRET")
if not DEBUG:
    _check_secret_key(SECRET_KEY)
    _check_token_keys(B24_TOKEN_KEY)

ALLOWED_HOSTS: list[str] = env.list(
    "ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"] if DEBUG else []
)
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS is not set (comma-separated host names).")

PORT: int = env.int("PORT", default=8000)
B24_ALLOW_HTTP: bool = env.bool("B24_ALLOW_HTTP", default=False)
B24_APP_BASE_URL: str = env.str(
    "B24_APP_BASE_URL", default=f"http://127.0.0.1:{PORT}" if DEBUG else ""
).rstrip("/")
B24_OAUTH_SERVERS: list[str] = [
    s.strip()
    for s in env.list(
        "B24_OAUTH_SERVERS", default=["https://oauth.bitrix.info/", "https://oauth.bitrix24.tech/"]
    )
    if s.strip()
]


def _check_app_base_url(value: str) -> None:
    """Bitrix24 accepts a loopback or http handler in placement.bind/event.bind and then never
    reaches it: outside DEBUG the address must be public https (http only for the sandbox)."""
    from urllib.parse import urlsplit

    if not value:
        raise ImproperlyConfigured(
            "B24_APP_BASE_URL is not set: the public https address where Bitrix24 reaches the "
            "app (e.g. https://flowpins.example.com)."
        )
    parts = urlsplit(value)
    if parts.scheme != "https" and not (B24_ALLOW_HTTP and parts.scheme == "http"):
        raise ImproperlyConfigured(
            "B24_APP_BASE_URL must start with https:// (Bitrix24 calls the handlers over the "
            "internet); http is accepted only with B24_ALLOW_HTTP=1, for the sandbox."
        )
    host = (parts.hostname or "").lower()
    local = host in {"localhost", "0.0.0.0", "::", "::1"} or host.startswith("127.")  # noqa: S104
    if not host or (local and not B24_ALLOW_HTTP):
        raise ImproperlyConfigured(
            "B24_APP_BASE_URL must name a public host: Bitrix24 cannot reach "
            f"{host or 'an empty host'}."
        )


if not DEBUG:
    _check_app_base_url(B24_APP_BASE_URL)

# Default per-portal leaky bucket (Bitrix24's non-Enterprise plans): 2 requests/s, burst 50.
B24_RATE_PER_SECOND: float = env.float("B24_RATE_PER_SECOND", default=2.0)
B24_RATE_BURST: int = env.int("B24_RATE_BURST", default=50)
# HTTP timeouts for every call to a portal or the OAuth server: (connect, read) seconds.
B24_HTTP_TIMEOUT: tuple[float, float] = (
    env.float("B24_HTTP_CONNECT_TIMEOUT", default=5.0),
    env.float("B24_HTTP_READ_TIMEOUT", default=30.0),
)
# The portal's own limit on one request (60 s in the cloud): after a read timeout a toggle may
# still land until then, so the same flow is not toggled again before it has passed.
B24_PORTAL_REQUEST_SECONDS: float = env.float("B24_PORTAL_REQUEST_SECONDS", default=60.0)
# A web request never waits on Bitrix24 longer than this (seconds to read an answer): the
# verifications a frame POST or an event needs. Portal work that may be slow runs in Celery.
B24_WEB_TIMEOUT: tuple[float, float] = (
    min(2.0, B24_HTTP_TIMEOUT[0]),
    env.float("B24_WEB_READ_TIMEOUT", default=5.0),
)
# How long a positive install/frame verification (an app.info answer) is trusted.
B24_VERIFY_CACHE_SECONDS: int = env.int("B24_VERIFY_CACHE_SECONDS", default=300)
# REST call metadata is kept at least 3 days (a Market rule); we keep 7 by default.
B24_CALL_LOG_DAYS: int = env.int("B24_CALL_LOG_DAYS", default=7)

# Settled pin intents (done or failed) are kept this many days; a known pin state stays.
FLOWPINS_INTENT_DAYS: int = env.int("FLOWPINS_INTENT_DAYS", default=30)
# Read each user's real pin states from Bitrix24 with toggle pairs (README, "The real pin state").
FLOWPINS_READ_PINS: bool = env.bool("FLOWPINS_READ_PINS", default=True)
# Celery workers lower their CPU priority by this much (nice; 0: leave it): where web and
# workers share cores, a click is answered first and convergence takes what is left.
FLOWPINS_WORKER_NICE: int = env.int("FLOWPINS_WORKER_NICE", default=10)
# How long the signed token in a rendered page stays valid for that page's own requests.
FLOWPINS_PAGE_TOKEN_SECONDS: int = env.int("FLOWPINS_PAGE_TOKEN_SECONDS", default=4 * 3600)
# The BX24 JS library (fitWindow, installFinish). Empty: do not load it (tests, offline demos).
B24_JS_SDK_URL: str = env.str("B24_JS_SDK_URL", default="//api.bitrix24.com/api/v1/")

# --- The admin's view (issue 13): a status section of the flows page for portal admins ---
# Whether portal admins see it (on by default; each user's open asks the portal `user.admin`
# once per the periods below at most — one REST request, in a worker; 0 turns it off).
FLOWPINS_ADMIN_VIEW: bool = env.bool("FLOWPINS_ADMIN_VIEW", default=True)
# How long the portal's "yes, an administrator" is trusted (a demoted admin loses the view then).
FLOWPINS_ADMIN_CHECK_SECONDS: int = env.int("FLOWPINS_ADMIN_CHECK_SECONDS", default=300)
# How long its "no" is trusted (a newly made admin sees the view after this at most).
FLOWPINS_NON_ADMIN_CHECK_SECONDS: int = env.int(
    "FLOWPINS_NON_ADMIN_CHECK_SECONDS", default=6 * 3600
)

VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'flowpins.sqlite3'}")
}
DATABASES["default"].setdefault("CONN_MAX_AGE", 60)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # SQLite is the zero-setup default: wait on a locked database instead of failing at once.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )

REDIS_URL: str = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "b24app",
    "flows",
]

MIDDLEWARE = [
    "b24app.logcontext.RequestContextMiddleware",  # first: a request id for every answer and line
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # The frame pages set their own frame-ancestors CSP; everything else stays unframeable.
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "b24app.urls"
WSGI_APPLICATION = "b24app.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en"
# The languages the app ships catalogs for (locale/); Bitrix24's own codes map onto these in
# b24app/langs.py, and a language not listed here is spoken as the nearest one that is.
LANGUAGES = [
    ("en", "English"),
    ("ru", "Русский"),
    ("uk", "Українська"),
    ("de", "Deutsch"),
    ("es", "Español"),
    ("pt-br", "Português (Brasil)"),
    ("pl", "Polski"),
]
LOCALE_PATHS = [BASE_DIR / "locale"]
USE_I18N = True
TIME_ZONE = "UTC"
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "flowpins",
        "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
    }
}

# --- https ---
# The scheme header of the TLS-terminating proxy in front (e.g. X-Forwarded-Proto), and only when
# one is there: whoever reaches the app directly could otherwise send the header and pass for https.
# The proxy must set (overwrite) it on every request.
SECURE_PROXY_SSL_HEADER_NAME: str = env.str("SECURE_PROXY_SSL_HEADER_NAME", default="")
if SECURE_PROXY_SSL_HEADER_NAME:
    if not re.fullmatch(r"[A-Za-z0-9-]+", SECURE_PROXY_SSL_HEADER_NAME):
        raise ImproperlyConfigured(
            "SECURE_PROXY_SSL_HEADER_NAME must be a header name such as X-Forwarded-Proto."
        )
    SECURE_PROXY_SSL_HEADER = (
        "HTTP_" + SECURE_PROXY_SSL_HEADER_NAME.upper().replace("-", "_"),
        "https",
    )
# Plain http is redirected to https, except the health probes: a container's probe asks
# http://127.0.0.1:$PORT/healthz, where no TLS proxy stands. (Off in DEBUG: `make run` is http.)
SECURE_SSL_REDIRECT: bool = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^ping$"]
SECURE_HSTS_SECONDS: int = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 365 * 24 * 3600)
# Off by default: both bind every name under the operator's domain (preload: for good, via the
# browsers' built-in lists), which this one app cannot know is all https. `check --deploy` warns
# about them (security.W005, security.W021); see SILENCED_SYSTEM_CHECKS.
SECURE_HSTS_INCLUDE_SUBDOMAINS: bool = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD: bool = env.bool("SECURE_HSTS_PRELOAD", default=False)
SILENCED_SYSTEM_CHECKS = ["security.W005", "security.W021"]
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
DATA_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024  # Bitrix24 POSTs are small; refuse anything huge.
DATA_UPLOAD_MAX_NUMBER_FIELDS = 200

# Celery: Redis broker; tasks are acknowledged after they ran (their bodies are idempotent).
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Threads, 32 a process (README, "Sizing"; measured by `make bench`'s scale section). A process
# runs on one core (the GIL) at ~18 ms of CPU a REST request, so it keeps ~8 calls in flight
# at 150 ms: 8 threads were the limit, 32 leave room for slower portals and for calls waiting on
# a bucket. gevent did worse on the same load (more CPU a request, and a database connection
# per greenlet). Each thread keeps one PostgreSQL connection: processes × 32 connections.
CELERY_WORKER_POOL = env.str("CELERY_WORKER_POOL", default="threads")
CELERY_WORKER_CONCURRENCY = env.int("CELERY_WORKER_CONCURRENCY", default=32)
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": 3600,
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
    "max_retries": 2,
    # A worker taking several queues always takes from the first listed (--queues) that has a
    # job, instead of kombu's default round robin: clicks, then bulk, refresh, housekeeping.
    "queue_order_strategy": "priority",
}
# Queues by urgency (b24app/queues.py): a refresh storm or a housekeeping sweep queues behind
# its own kind, never in front of a click, so a worker that takes only the clicks queue answers
# clicks at once. A retry is published with its message's own routing: it stays on its queue.
FLOWPINS_QUEUES = _queues.FLOWPINS_QUEUES
CELERY_TASK_DEFAULT_QUEUE = _queues.CLICKS_QUEUE  # also where a task with no route goes
CELERY_TASK_ROUTES = {
    # A run with many toggles goes to BULK_QUEUE instead (flows.tasks.enqueue_converge).
    "flows.converge": {"queue": _queues.CLICKS_QUEUE},
    "flows.add_flow": {"queue": _queues.CLICKS_QUEUE},
    "flows.refresh_snapshot": {"queue": _queues.REFRESH_QUEUE},
    "flows.admin_check": {"queue": _queues.REFRESH_QUEUE},
    "flows.admin_bindings": {"queue": _queues.REFRESH_QUEUE},
    "flows.prune_intents": {"queue": _queues.HOUSEKEEPING_QUEUE},
    "b24app.prune_call_log": {"queue": _queues.HOUSEKEEPING_QUEUE},
    "b24app.keep_tokens_alive": {"queue": _queues.HOUSEKEEPING_QUEUE},
    "b24app.bind_handlers": {"queue": _queues.HOUSEKEEPING_QUEUE},
    "b24app.confirm_uninstall": {"queue": _queues.HOUSEKEEPING_QUEUE},
}

# --- metrics (Prometheus) ---
# Off unless METRICS_TOKEN is set: /metrics answers 404. With it, a scrape must send
# "Authorization: Bearer <METRICS_TOKEN>" (README, "Metrics"). Several processes report through
# PROMETHEUS_MULTIPROC_DIR, which prometheus-client reads from the environment itself.
METRICS_TOKEN: str = env.str("METRICS_TOKEN", default="")
if METRICS_TOKEN and len(METRICS_TOKEN) < 32:
    raise ImproperlyConfigured(
        "METRICS_TOKEN must be 32 characters or more: "
        'python -c "import secrets; print(secrets.token_urlsafe(32))"'
    )
# Prometheus scrapes over plain http inside the host (compose's network), like the probes; the
# token was sent by then, so a redirect would protect nothing.
SECURE_REDIRECT_EXEMPT = [*SECURE_REDIRECT_EXEMPT, r"^metrics$"]

# --- Correlated logs (b24app/logcontext.py), error reports to Sentry (b24app/errorreports.py) ---
LOG_FORMAT: str = env.str("LOG_FORMAT", default="text").strip().lower()
if LOG_FORMAT not in {"text", "json"}:
    raise ImproperlyConfigured('LOG_FORMAT must be "text" (the default) or "json".')
SENTRY_DSN: str = env.str("SENTRY_DSN", default="")  # the SDK reads SENTRY_ENVIRONMENT itself
if SENTRY_DSN:
    from b24app.errorreports import init_sentry

    init_sentry(SENTRY_DSN)

LOG_LEVEL: str = env.str("LOG_LEVEL", default="INFO")
LOGGING = logging_config(LOG_FORMAT, LOG_LEVEL)
