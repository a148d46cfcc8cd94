"""Who may frame a page, read from the answer, and the origin that should: computed from where
the simulated portal serves its page (the frame's parent), never from the app's own values."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


def frame_ancestors(response: Any) -> list[str]:
    """The sources of the answer's `Content-Security-Policy: frame-ancestors`, in order."""
    policy = response["Content-Security-Policy"]
    directives = [d.split() for d in policy.split(";") if d.strip()]
    found = [d[1:] for d in directives if d[0] == "frame-ancestors"]
    assert len(found) == 1, policy
    return found[0]


def portal_origin(sandbox: Any, name: str) -> str:
    """`scheme://host:port` of the portal's own page, where the browser's parent frame is."""
    page = urlsplit(sandbox.portal_url(name))
    return f"{page.scheme}://{page.netloc}"
