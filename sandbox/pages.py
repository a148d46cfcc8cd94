"""HTML pages for people: the portal shell (``/p/NAME/``) and the index (``/``).

Everything that comes from data is escaped with :func:`html.escape`; data handed to the inline
script is JSON with ``<``, ``>`` and ``&`` escaped, and the script only ever writes it with
``textContent``. Flow names in the seed deliberately contain markup and a ``<script>`` tag.

The portal page loads the app the way Bitrix24 does: it asks the control API for a launch
(fresh tokens for the chosen user), builds a hidden ``<form method=POST target=app-frame>``
with the frame parameters and submits it into ``<iframe name="app-frame">``. The page is served
from the portal's own origin (with distinct hosts, ``http://127.0.0.N:PORT``), so the frame's
parent is that origin and the app's origin differs from it, as in production. The page calls
the control API same-origin (it answers on every host).

Query parameters: ``user`` (user id), ``lang`` (a Bitrix24 language code, ``LANGUAGES``),
``open=1`` (open the app on load), ``installer=1`` (open the installer instead), ``placement``
(a bound placement code).
The page also listens for ``postMessage`` from the frame: a message that is (or contains) the
BX24 command ``setInstallFinish`` - or ``{"command": "installFinish"}`` - finishes the
installation, ``{"command": "resizeWindow", "height": N}`` resizes the frame.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from .model import Portal, User
from .page_assets import CSS, JS
from .state import SandboxState


def _script_json(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False)
    for char, code in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, code)
    return text


# The picker's languages: Bitrix24's own codes (`LANG` of the frame), as its cloud offers them.
LANGUAGES = (
    ("en", "English"),
    ("ru", "Русский"),
    ("ua", "Українська"),
    ("de", "Deutsch"),
    ("la", "Español"),
    ("br", "Português (Brasil)"),
    ("pl", "Polski"),
    ("fr", "Français"),
    ("it", "Italiano"),
    ("tr", "Türkçe"),
    ("kz", "Қазақша"),
    ("sc", "中文（简体）"),
    ("tc", "中文（繁體）"),
    ("ja", "日本語"),
    ("vn", "Tiếng Việt"),
    ("id", "Bahasa Indonesia"),
    ("ms", "Bahasa Melayu"),
    ("th", "ภาษาไทย"),
    ("ar", "العربية"),
)


def _user_badge(user: User) -> str:
    if user.admin:
        return " (admin)"
    return " (extranet)" if user.extranet else ""


def render_portal_page(
    state: SandboxState,
    portal: Portal,
    *,
    user_id: int = 1,
    lang: str = "",
    auto_open: bool = False,
    installer: bool = False,
    placement: str = "DEFAULT",
) -> str:
    """The portal shell. Call with the state lock held."""
    if user_id not in portal.users:
        user_id = 1
    lang = lang if lang in dict(LANGUAGES) else portal.language
    config = {
        "portal": portal.name,
        "control": f"/_sandbox/p/{portal.name}/",
        "stateUrl": f"/_sandbox/state?portal={portal.name}",
        "autoOpen": auto_open,
        "installer": installer,
        "placement": placement,
    }
    return f"""<!doctype html>
<html lang="{escape(lang)}">
<head>
<meta charset="utf-8">
<title>{escape(portal.name)} · Bitrix24 sandbox</title>
<style>{CSS}</style>
</head>
<body>
<div class="shell">
{_sidebar(state, portal, user_id)}
{_main(portal, user_id, lang, installer)}
</div>
<script type="application/json" id="sandbox-config">{_script_json(config)}</script>
<script>{JS}</script>
</body>
</html>
"""


def _sidebar(state: SandboxState, portal: Portal, user_id: int) -> str:
    """The portal's name and addresses and the flows the user sees (pinned ones starred)."""
    pinned = portal.pins.get(user_id, set())
    flow_items = "".join(
        f'<li data-flow-id="{f.id}"{"" if f.active else " class=inactive"}>'
        f'<span class="pin">{"★" if f.id in pinned else "☆"} </span>{escape(f.name)}</li>'
        for f in portal.visible_flows(portal.users[user_id])
    )
    return f"""  <aside class="sidebar">
    <h1 id="portal-name">{escape(portal.name)}</h1>
    <div class="meta">{escape(state.domain(portal))}<br>{escape(state.origin(portal))}<br>
      member_id {escape(portal.member_id)}</div>
    <nav>
      <a href="#">Задачи и проекты</a>
      <a href="#" class="active">Приложения</a>
      <a href="#">Сотрудники</a>
    </nav>
    <h2>Flows visible to this user</h2>
    <ul class="flows" id="flow-list">{flow_items}</ul>
  </aside>"""


def _main(portal: Portal, user_id: int, lang: str, installer: bool) -> str:
    """The top bar (user, language, app and event buttons), the status line and the frame."""
    user_options = "".join(
        f'<option value="{u.id}"{" selected" if u.id == user_id else ""}>'
        f"{u.id} · {escape(u.full_name)}{_user_badge(u)}</option>"
        for u in sorted(portal.users.values(), key=lambda u: u.id)
    )
    lang_options = "".join(
        f'<option value="{code}"{" selected" if code == lang else ""}>{label}</option>'
        for code, label in LANGUAGES
    )
    finish_hidden = "" if installer else " hidden"
    return f"""  <main class="main">
    <div class="topbar">
      <label for="user-picker">User</label>
      <select id="user-picker" name="user">{user_options}</select>
      <label for="lang-picker">Language</label>
      <select id="lang-picker" name="lang">{lang_options}</select>
      <span class="sep"></span>
      <button type="button" id="open-app">Open app</button>
      <button type="button" id="install-app" class="secondary">Install app</button>
      <button type="button" id="finish-install" class="secondary"{finish_hidden}>
        Finish install</button>
      <span class="sep"></span>
      <select id="event-name" aria-label="Event">
        <option>ONAPPINSTALL</option><option>ONAPPUPDATE</option><option>ONAPPUNINSTALL</option>
        <option>ONAPPUSERREADY</option>
      </select>
      <label><input type="checkbox" id="event-clean"> CLEAN</label>
      <button type="button" id="send-event" class="warn">Send event</button>
      <button type="button" id="refresh" class="secondary">Refresh</button>
    </div>
    <div id="status">{escape(_status_line(portal, user_id))}</div>
    <iframe name="app-frame" id="app-frame" title="Application"></iframe>
    <form id="launch-form" method="post" target="app-frame" hidden></form>
    <pre id="log"></pre>
  </main>"""


def _status_line(portal: Portal, user_id: int) -> str:
    return " · ".join(
        [
            f"installed: {str(portal.installed).lower()}",
            f"app version {portal.app_version}",
            f"placements: {len(portal.placements)}",
            f"event handlers: {len(portal.events)}",
            f"user {user_id}",
        ]
    )


def render_index(state: SandboxState) -> str:
    """List of portals with their page and REST endpoints. Call with the state lock held."""
    rows = "".join(
        f'<tr><td><a href="{escape(state.page_url(p))}">{escape(p.name)}</a></td>'
        f"<td>{escape(p.member_id)}</td><td>{escape(state.client_endpoint(p))}</td>"
        f"<td>{'yes' if p.installed else 'no'}</td></tr>"
        for p in state.portals.values()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Bitrix24 sandbox</title>
<style>body{{font:14px Arial,sans-serif;margin:24px}}
td,th{{padding:4px 10px;text-align:left}}</style></head>
<body><h1>Bitrix24 sandbox</h1>
<p>OAuth server: <code>{escape(state.base_url)}/oauth/token/</code> ·
server_endpoint <code>{escape(state.server_endpoint)}</code> ·
app <code>{escape(state.app_url)}</code></p>
<table><tr><th>portal</th><th>member_id</th><th>client_endpoint</th><th>installed</th></tr>{rows}</table>
<p>Control API: <a href="/_sandbox/state">/_sandbox/state</a></p>
</body></html>
"""
