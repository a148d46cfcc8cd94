"""`python -m b24app.probe`: the container health check (Dockerfile HEALTHCHECK, compose.yaml).

It asks http://127.0.0.1:$PORT/healthz, as the container sees itself, and is healthy only on a
200. Django answers 400 to a Host it does not serve (ALLOWED_HOSTS), and 127.0.0.1 is not one of
them in production, so the probe names a host that is; /healthz is exempt from the https
redirect (settings.SECURE_REDIRECT_EXEMPT), and a redirect would count as unhealthy here.
"""

from __future__ import annotations

import os
import sys
from http.client import HTTPConnection


def probe_host(allowed_hosts: list[str]) -> str:
    """A Host header the app accepts: the first allowed name ("*" or ".example.com" patterns
    accept "localhost" and "example.com")."""
    for pattern in allowed_hosts:
        name = pattern.strip().lstrip(".")
        if name and name != "*":
            return name
    return "localhost"


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")
    from django.conf import settings  # the same .env and environment the server reads

    connection = HTTPConnection("127.0.0.1", settings.PORT, timeout=4)
    try:
        connection.request("GET", "/healthz", headers={"Host": probe_host(settings.ALLOWED_HOSTS)})
        status = connection.getresponse().status
    except OSError as exc:
        print(f"health probe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"health probe: /healthz answered {status}", file=sys.stderr)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
