"""Command line: ``python -m sandbox [--host H] [--port P] [--app-url URL] ...``.

Environment defaults: ``SANDBOX_HOST``, ``SANDBOX_PORT``, ``SANDBOX_APP_URL``,
``B24_CLIENT_ID``, ``B24_CLIENT_SECRET``, ``SANDBOX_PORTALS``, ``SANDBOX_DISTINCT_HOSTS``
(``1``/``0``; unset: on for Linux). Knobs can be given as
``--knob name=value`` (repeatable). Prints one line with the base URL and the portal pages,
then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .knobs import KNOB_NAMES, KnobError
from .server import SandboxServer
from .state import DEFAULT_APP_URL, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m sandbox", description="Simulated Bitrix24 portals + OAuth server"
    )
    parser.add_argument("--host", default=env.get("SANDBOX_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env.get("SANDBOX_PORT", "8090")))
    parser.add_argument("--app-url", default=env.get("SANDBOX_APP_URL", DEFAULT_APP_URL))
    parser.add_argument("--client-id", default=env.get("B24_CLIENT_ID", DEFAULT_CLIENT_ID))
    parser.add_argument(
        "--client-secret", default=env.get("B24_CLIENT_SECRET", DEFAULT_CLIENT_SECRET)
    )
    parser.add_argument("--portals", type=int, default=int(env.get("SANDBOX_PORTALS", "2")))
    parser.add_argument(
        "--base-url",
        default=env.get("SANDBOX_BASE_URL"),
        help="public base URL if not http://host:port",
    )
    parser.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"set a global knob; known: {', '.join(KNOB_NAMES)}",
    )
    parser.add_argument(
        "--distinct-hosts",
        action=argparse.BooleanOptionalAction,
        default=_env_flag(env.get("SANDBOX_DISTINCT_HOSTS")),
        help="serve every portal on its own loopback host (127.0.0.N, same port); "
        "default: on for Linux",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser


def _env_flag(value: str | None) -> bool | None:
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() in ("1", "true", "yes", "y", "on")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    knobs: dict[str, str] = {}
    for item in args.knob:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"--knob expects NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        knobs[name.strip()] = value.strip()
    try:
        server = SandboxServer(
            host=args.host,
            port=args.port,
            app_url=args.app_url,
            client_id=args.client_id,
            client_secret=args.client_secret,
            portals=args.portals,
            base_url=args.base_url,
            verbose=args.verbose,
            distinct_hosts=args.distinct_hosts,
            **knobs,
        )
    except (KnobError, ValueError, OSError) as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    pages = " ".join(server.portal_url(name) for name in server.state.portals)
    print(
        f"Bitrix24 sandbox on {server.url} (OAuth {server.url}/oauth/token/) portals: {pages}",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
