"""The portal page's stylesheet and script (see :mod:`sandbox.pages`).

The script reads its configuration from the page's ``sandbox-config`` JSON block and writes
data only with ``textContent``.
"""

CSS = """
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

JS = """
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
