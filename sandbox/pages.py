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

Query parameters: ``user`` (user id), ``lang`` (``en``/``ru``), ``open=1`` (open the app on
load), ``installer=1`` (open the installer instead), ``placement`` (a bound placement code).
The page also listens for ``postMessage`` from the frame: a message that is (or contains) the
BX24 command ``setInstallFinish`` - or ``{"command": "installFinish"}`` - finishes the
installation, ``{"command": "resizeWindow", "height": N}`` resizes the frame.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from .model import Portal, User
from .state import SandboxState

_CSS = """
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 "Helvetica Neue", Arial, sans-serif;
       color: #333; background: #eef2f4; }
.shell { display: flex; min-height: 100vh; }
.sidebar { width: 240px; background: #1f3b57; color: #dfe7ee; padding: 16px; flex-shrink: 0; }
.sidebar h1 { font-size: 18px; margin: 0 0 4px; color: #fff; }
.sidebar .meta { font-size: 11px; color: #9fb3c6; word-break: break-all; margin-bottom: 16px; }
.sidebar nav a { display: block; color: #dfe7ee; padding: 6px 8px; border-radius: 4px;
                 text-decoration: none; }
.sidebar nav a.active { background: #2fc6f6; color: #0b2235; }
.sidebar h2 { font-size: 12px; text-transform: uppercase; color: #9fb3c6; margin: 20px 0 6px; }
.flows { list-style: none; margin: 0; padding: 0; font-size: 12px; }
.flows li { padding: 3px 0; border-bottom: 1px solid #2c4d6d; }
.flows li.inactive { opacity: .55; }
.flows .pin { color: #ffd24d; }
.main { flex: 1; display: flex; flex-direction: column; min-width: 0; }
.topbar { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; background: #fff;
          padding: 10px 16px; border-bottom: 1px solid #d5dde3; }
.topbar label { font-size: 12px; color: #667; }
.topbar button { border: 0; border-radius: 16px; padding: 6px 14px; background: #3bc8f5;
                 color: #fff; cursor: pointer; }
.topbar button.secondary { background: #8d99a5; }
.topbar button.warn { background: #ff5752; }
.topbar .sep { width: 1px; height: 24px; background: #d5dde3; margin: 0 6px; }
#status { padding: 6px 16px; font-size: 12px; color: #556; background: #f8fafb;
          border-bottom: 1px solid #e3e8ec; }
#app-frame { width: 100%; height: 78vh; border: 0; background: #fff; }
#log { margin: 0; padding: 8px 16px; font-size: 11px; max-height: 18vh; overflow: auto;
       background: #11202e; color: #b8f5c4; white-space: pre-wrap; }
"""

_JS = """
(function () {
  const CFG = JSON.parse(document.getElementById('sandbox-config').textContent);
  const $ = (id) => document.getElementById(id);
  const log = (line) => {
    const el = $('log');
    const stamp = new Date().toISOString().slice(11, 19);
    el.textContent = stamp + ' ' + line + '\\n' + el.textContent;
  };
  const userId = () => parseInt($('user-picker').value, 10);
  const lang = () => $('lang-picker').value;

  async function post(action, body) {
    const resp = await fetch(CFG.control + action, {
      method: 'POST',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify(body || {}),
    });
    const data = await resp.json();
    if (!resp.ok) { throw new Error(data.error || ('HTTP ' + resp.status)); }
    return data;
  }

  async function openApp(installer, placement) {
    try {
      const launch = await post('launch', {
        user_id: userId(), lang: lang(), installer: !!installer,
        placement: placement || 'DEFAULT',
      });
      const form = $('launch-form');
      while (form.firstChild) { form.removeChild(form.firstChild); }
      form.action = launch.url;
      for (const [name, value] of Object.entries(launch.form)) {
        const input = document.createElement('input');
        input.type = 'hidden'; input.name = name; input.value = value;
        form.appendChild(input);
      }
      form.submit();
      const what = installer ? 'installer' : 'app';
      log(what + ' opened for user ' + launch.user_id + ' -> ' + launch.action);
      $('finish-install').hidden = !installer;
      refresh();
    } catch (err) { log('launch failed: ' + err.message); }
  }

  async function finishInstall() {
    try {
      await post('install_finish', {});
      log('installation finished');
      $('finish-install').hidden = true;
      openApp(false);
    } catch (err) { log('install_finish failed: ' + err.message); }
  }

  async function sendEvent() {
    const event = $('event-name').value;
    const clean = $('event-clean').checked ? 1 : 0;
    try {
      const user = event === 'ONAPPUSERREADY' ? userId() : 1;
      const res = await post('event', {event: event, clean: clean, user_id: user});
      for (const d of res.deliveries) {
        const outcome = d.status === null ? (d.error || 'not delivered') : d.status;
        log(event + ' -> ' + d.handler + ' : ' + outcome);
      }
      if (!res.deliveries.length) { log(event + ': no handler bound'); }
      refresh();
    } catch (err) { log('event failed: ' + err.message); }
  }

  async function refresh() {
    try {
      const resp = await fetch(CFG.stateUrl);
      const data = await resp.json();
      const portal = Object.values(data.portals)[0];
      const pinned = new Set((portal.pins[String(userId())] || []));
      const list = $('flow-list');
      while (list.firstChild) { list.removeChild(list.firstChild); }
      for (const flow of portal.flows) {
        if (!flow.visible_to.includes(userId())) { continue; }
        const li = document.createElement('li');
        li.dataset.flowId = String(flow.id);
        if (!flow.active) { li.className = 'inactive'; }
        const mark = document.createElement('span');
        mark.className = 'pin';
        mark.textContent = pinned.has(flow.id) ? '\\u2605 ' : '\\u2606 ';
        li.appendChild(mark);
        li.appendChild(document.createTextNode(flow.name));
        list.appendChild(li);
      }
      $('status').textContent = [
        'installed: ' + portal.installed,
        'app version ' + portal.app_version,
        'placements: ' + portal.placements.length,
        'event handlers: ' + portal.events.length,
        'user ' + userId(),
      ].join(' \\u00b7 ');
    } catch (err) { log('state refresh failed: ' + err.message); }
  }

  window.addEventListener('message', (event) => {
    const data = event.data;
    let command = '';
    if (typeof data === 'string') {
      command = data.indexOf('setInstallFinish') >= 0 ? 'installFinish' : data.split(':')[0];
    } else if (data && typeof data === 'object') {
      command = String(data.command || '');
    }
    if (command === 'installFinish' || command === 'setInstallFinish') {
      finishInstall();
    } else if (command === 'resizeWindow' && data && data.height) {
      $('app-frame').style.height = parseInt(data.height, 10) + 'px';
    }
  });

  $('open-app').addEventListener('click', () => openApp(false));
  $('install-app').addEventListener('click', () => openApp(true));
  $('finish-install').addEventListener('click', finishInstall);
  $('send-event').addEventListener('click', sendEvent);
  $('refresh').addEventListener('click', refresh);
  $('user-picker').addEventListener('change', refresh);
  if (CFG.autoOpen) { openApp(CFG.installer, CFG.placement); }
})();
"""


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
    lang = lang if lang in ("en", "ru") else portal.language
    user = portal.users[user_id]
    pinned = portal.pins.get(user_id, set())
    config = {
        "portal": portal.name,
        "control": f"/_sandbox/p/{portal.name}/",
        "stateUrl": f"/_sandbox/state?portal={portal.name}",
        "autoOpen": auto_open,
        "installer": installer,
        "placement": placement,
    }
    user_options = "".join(
        f'<option value="{u.id}"{" selected" if u.id == user_id else ""}>'
        f"{u.id} · {escape(u.full_name)}{_user_badge(u)}</option>"
        for u in sorted(portal.users.values(), key=lambda u: u.id)
    )
    lang_options = "".join(
        f'<option value="{code}"{" selected" if code == lang else ""}>{label}</option>'
        for code, label in (("en", "English"), ("ru", "Русский"))
    )
    flow_items = "".join(
        f'<li data-flow-id="{f.id}"{"" if f.active else " class=inactive"}>'
        f'<span class="pin">{"★" if f.id in pinned else "☆"} </span>{escape(f.name)}</li>'
        for f in portal.visible_flows(user)
    )
    status = " · ".join(
        [
            f"installed: {str(portal.installed).lower()}",
            f"app version {portal.app_version}",
            f"placements: {len(portal.placements)}",
            f"event handlers: {len(portal.events)}",
            f"user {user_id}",
        ]
    )
    finish_hidden = "" if installer else " hidden"
    return f"""<!doctype html>
<html lang="{escape(lang)}">
<head>
<meta charset="utf-8">
<title>{escape(portal.name)} · Bitrix24 sandbox</title>
<style>{_CSS}</style>
</head>
<body>
<div class="shell">
  <aside class="sidebar">
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
  </aside>
  <main class="main">
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
    <div id="status">{escape(status)}</div>
    <iframe name="app-frame" id="app-frame" title="Application"></iframe>
    <form id="launch-form" method="post" target="app-frame" hidden></form>
    <pre id="log"></pre>
  </main>
</div>
<script type="application/json" id="sandbox-config">{_script_json(config)}</script>
<script>{_JS}</script>
</body>
</html>
"""


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
