"""Settings for the test suite: production-like (DEBUG off), with throwaway secrets.

When REDIS_URL is unset (a fresh machine) a private Redis is started for the run, so the suite
needs nothing installed; PostgreSQL is used when DATABASE_URL points at it (CI always does).
"""

import atexit
import os
import secrets
import tempfile
from pathlib import Path

os.environ.setdefault("DEBUG", "0")
# Random per run (and inherited by the worker and web processes the tests start): a fixed value
# in the repository would be a published placeholder, which start-up refuses outside DEBUG.
os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
os.environ.setdefault("B24_TOKEN_KEY", "dGVzdC10b2tlbi1rZXktdGhpcnR5LXR3by1ieXRlcyE=")
os.environ.setdefault("B24_CLIENT_ID", "local.sandbox0000000001")
os.environ.setdefault("B24_CLIENT_SECRET", "sandbox-client-secret")
os.environ.setdefault("ALLOWED_HOSTS", "*")
os.environ.setdefault("B24_ALLOW_HTTP", "1")
os.environ.setdefault("B24_APP_BASE_URL", "http://127.0.0.1:8000")
os.environ.setdefault("B24_JS_SDK_URL", "")
# Reading pin states toggles pins in the sandbox: only the tests about it turn it on
# (tests/flows/test_pinread.py), so every other count of toggles stays exact.
os.environ.setdefault("FLOWPINS_READ_PINS", "0")
# The admin's view asks the portal `user.admin` on a user's open: only its tests turn it on
# (tests/flows/test_admin_view.py, test_admin_browser.py, the languages' browser test).
os.environ.setdefault("FLOWPINS_ADMIN_VIEW", "0")
os.environ.setdefault("FLOWPINS_ENV_FILE", os.devnull)
# The tests (and the web and worker processes they start) speak plain http on 127.0.0.1, with no
# TLS proxy in front: the production https redirect would answer every request with a 301.
os.environ.setdefault("SECURE_SSL_REDIRECT", "0")


def _private_redis() -> str:
    from devtools.procs import free_port, redis_command
    from devtools.supervisor import start

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="flowpins-redis-"))
    proc = start("private redis", redis_command(port, workdir), quiet=True)
    atexit.register(proc.stop)
    proc.wait_for_port(port, 5)
    return f"redis://127.0.0.1:{port}/0"


if not os.environ.get("REDIS_URL"):
    os.environ["REDIS_URL"] = _private_redis()

from b24app.settings import *  # noqa: E402,F403

STORAGES["staticfiles"]["BACKEND"] = "django.contrib.staticfiles.storage.StaticFilesStorage"  # noqa: F405
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STATIC_ROOT.mkdir(exist_ok=True)  # noqa: F405  (whitenoise warns when it is missing)
