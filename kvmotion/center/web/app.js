// The kvmotion web client: the center's public API (/v1/...) from the signed-in session, no build step.
// The page reads the cluster's state once, then follows the center's event stream (server-sent
// events) from the newest event: lists refresh when an event says something happened, the hosts'
// CPU and memory bars when the stream's `loads` message says a host's report changed them; a
// reconnect resumes after the last event seen. A migration's progress comes from its own stream.
// Data goes into the page as text, never as HTML.

const CSRF_HEADER = "X-KVMotion-CSRF";
const ROLES = ["viewer", "operator", "admin"];
const MiB = 1 << 20;
const FEED = 30;  // events the feed shows from before the page was opened
const RECONNECT_MS = 3000;  // after the browser gave the event stream up (it retries network errors itself)

const state = { session: null, csrf: sessionStorage.getItem("kvmotion-csrf"), events: null, refreshTimer: null,
                lastEvent: 0, reconnectTimer: null };
const $ = (id) => document.getElementById(id);

// ---- small DOM helpers -------------------------------------------------------------------------
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else if (key === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = v;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
const svg = (tag, attrs = {}) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};
const mib = (bytes) => `${(bytes / MiB).toFixed(bytes < 10 * MiB ? 1 : 0)} MiB`;
const rate = (bps) => `${(bps / MiB).toFixed(1)} MiB/s`;
const seconds = (s) => (s === null || s === undefined ? "unknown" : `${s.toFixed(1)} s`);
const ms = (m) => (m === null || m === undefined ? "unknown" : `${Math.round(m)} ms`);
const when = (t) => new Date(t * 1000).toLocaleTimeString();
const words = (text) => String(text).replaceAll("_", " ");
const badge = (text) => el("span", { class: `badge ${text}` }, words(text));

function bar(fraction, label, load = true) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  const inner = el("span");
  inner.style.width = `${(f * 100).toFixed(1)}%`;  // CSSOM: allowed under the page's CSP
  return el("span", { class: `bar${load && f > 0.85 ? " high" : ""}`, role: "img", "aria-label": label }, inner);
}

function status(text) { $("status").textContent = text; }
function failure(text) { $("error").textContent = text; }
const canOperate = () => state.session && ROLES.indexOf(state.session.role) >= 1;

// ---- the API -------------------------------------------------------------------------------------
async function api(method, path, body) {
  const headers = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method !== "GET" && state.csrf) headers[CSRF_HEADER] = state.csrf;
  const reply = await fetch(path, { method, headers, credentials: "same-origin",
                                    body: body === undefined ? undefined : JSON.stringify(body) });
  if (reply.status === 204) return null;
  const data = await reply.json().catch(() => null);
  if (!reply.ok) {
    const message = data && data.error ? data.error.message : `${method} ${path}: HTTP ${reply.status}`;
    const error = new Error(message);
    error.status = reply.status;
    throw error;
  }
  return data;
}

async function act(what, fn) {
  failure("");
  try {
    return await fn();
  } catch (err) {
    failure(`${what}: ${err.message}`);
    if (err.status === 401) showSignin();
    return undefined;
  }
}

// ---- signing in ------------------------------------------------------------------------------------
function showSignin() {
  state.session = null;
  stopFollowing();
  $("main").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  $("signin-user").focus();
}

function signedIn(session) {
  state.session = session;
  if (session.csrf) {
    state.csrf = session.csrf;
    sessionStorage.setItem("kvmotion-csrf", session.csrf);
  }
  $("user").textContent = session.user;
  $("role").textContent = session.role;
  $("who").hidden = false;
  $("signin").hidden = true;
  $("main").hidden = false;
  document.body.dataset.role = session.role;
  follow();
}

async function start() {
  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const session = await act("sign in", () => api("POST", "/v1/sessions",
      { user: $("signin-user").value, password: $("signin-password").value }));
    $("signin-password").value = "";
    if (session) signedIn(session);
  });
  $("signout").addEventListener("click", async () => {
    await act("sign out", () => api("DELETE", "/v1/sessions/current"));
    sessionStorage.removeItem("kvmotion-csrf");
    state.csrf = null;
    showSignin();
  });
  $("dialog-close").addEventListener("click", () => $("dialog").close());

  const token = new URLSearchParams(location.hash.slice(1)).get("signin");
  if (token) {
    history.replaceState(null, "", location.pathname);  // the token is spent: off the address bar
    const session = await act("sign in with the token", () => api("POST", "/v1/sessions", { token }));
    if (session) return signedIn(session);
  }
  if (state.csrf) {
    try {
      return signedIn(await api("GET", "/v1/sessions/current"));
    } catch (err) { /* no live session: sign in */ }
  }
  showSignin();
}

// ---- the lists ----------------------------------------------------------------------------------------
function refreshSoon() {
  clearTimeout(state.refreshTimer);  // one refresh for a burst of events
  state.refreshTimer = setTimeout(refresh, 150);
}

async function refresh() {
  await act("reading the cluster", async () => {
    const [hosts, vms, tasks, drs] = await Promise.all([
      api("GET", "/v1/hosts"), api("GET", "/v1/vms"), api("GET", "/v1/tasks?limit=30"), api("GET", "/v1/drs")]);
    renderHosts(hosts);
    renderVms(vms);
    renderTasks(tasks);
    renderDrs(drs);
  });
}

// A host's CPU and memory cells from its figures ({cpus, cpu_demand, memory_total, memory_available},
// null where it has not reported): from the host list, or from the event stream's `loads` message.
function loadCells(f) {
  const reported = f.memory_total !== null;
  const cpu = f.cpus && f.cpu_demand !== null ? f.cpu_demand / f.cpus : 0;
  const used = reported ? (f.memory_total - f.memory_available) / Math.max(f.memory_total, 1) : 0;
  return [
    el("td", { class: "cpu" }, bar(cpu, `CPU ${Math.round(cpu * 100)}%`),
       el("span", { class: "figure" }, f.cpus ? `${(f.cpu_demand || 0).toFixed(1)}/${f.cpus}` : "–")),
    el("td", { class: "memory" }, bar(used, `memory ${Math.round(used * 100)}%`),
       el("span", { class: "figure" }, reported ? `${Math.round(used * 100)}% of ${mib(f.memory_total)}` : "–")),
  ];
}

const figuresOf = (h) => ({ cpus: h.load ? h.load.cpus : null, cpu_demand: h.cpu_demand,
                            memory_total: h.load ? h.load.memory_total : null,
                            memory_available: h.load ? h.load.memory_available : null });

function updateLoads(loads) {
  const rows = new Map([...$("hosts").tBodies[0].rows].map((row) => [row.dataset.host, row]));
  for (const f of loads.hosts) {
    const row = rows.get(f.host);
    if (!row) continue;  // a host the next refresh adds (its join is an event)
    const [cpu, memory] = loadCells(f);
    row.querySelector("td.cpu").replaceWith(cpu);
    row.querySelector("td.memory").replaceWith(memory);
  }
}

function renderHosts(hosts) {
  const body = $("hosts").tBodies[0];
  body.replaceChildren(...hosts.map((h) => {
    const actions = el("td", { class: "actions" });
    if (canOperate()) {
      actions.append(h.mode === "normal"
        ? el("button", { type: "button", class: "mutating", on: { click: () => maintenance(h.name, true) } }, "Enter maintenance…")
        : el("button", { type: "button", class: "mutating", on: { click: () => maintenance(h.name, false) } }, "Exit maintenance…"));
    }
    return el("tr", { data: { host: h.name } },
      el("th", { scope: "row" }, h.name),
      el("td", {}, badge(h.state), " ", h.mode !== "normal" ? badge(h.mode) : null,
         h.mode_reason && h.mode !== "normal" ? el("div", { class: "figure" }, h.mode_reason) : null),
      el("td", {}, badge(h.health), h.quarantined ? " quarantined" : ""),
      loadCells(figuresOf(h)),
      el("td", { class: "vmcount" }, h.vms),
      actions);
  }));
}

function renderVms(vms) {
  const body = $("vms").tBodies[0];
  body.replaceChildren(...vms.map((vm) => {
    const spec = vm.spec || { disks: [], nics: [] };
    const actions = el("td", { class: "actions" });
    if (canOperate() && vm.observed_state === "running") {
      actions.append(el("button", { type: "button", class: "mutating", on: { click: () => migrateDialog(vm.name) } }, "Migrate…"));
    }
    return el("tr", { data: { vm: vm.name } },
      el("th", { scope: "row" }, vm.name),
      el("td", {}, badge(vm.observed_state)),
      el("td", { class: "host" }, vm.observed_host || vm.desired_host || "–"),
      el("td", {}, spec.memory ? mib(spec.memory) : "–"),
      el("td", {}, spec.disks.map((d) => (d.datastore ? `${d.datastore}/${d.source}` : d.source)).join(", ") || "–"),
      el("td", {}, spec.nics.map((n) => `${n.portgroup} ${n.mac}`).join(", ") || "–"),
      actions);
  }));
}

function renderTasks(tasks) {
  const body = $("tasks").tBodies[0];
  body.replaceChildren(...tasks.map((t) => {
    const what = `${t.kind} ${t.target}${t.destination ? ` → ${t.destination}` : ""}`;
    const name = t.kind === "migrate"
      ? el("button", { type: "button", class: "link", on: { click: () => watchMigration(t.id, t.target) } }, what)
      : what;
    return el("tr", { data: { task: t.id } },
      el("td", {}, name, t.why ? el("div", { class: "figure" }, t.why) : null),
      el("td", {}, badge(t.state)),
      el("td", {}, bar(t.state === "done" ? 1 : t.progress.fraction, t.state === "done" ? "100%" : `${Math.round(t.progress.fraction * 100)}%`, false),
         el("div", { class: "figure" }, t.error || t.progress.message || t.progress.phase)),
      el("td", { class: "figure" }, t.requested_by));
  }));
}

function renderDrs(drs) {
  const recs = drs.recommendations;
  $("drs-summary").textContent = `Automation ${drs.config.automation}, threshold ${drs.config.threshold}; ` +
    `imbalance ${drs.imbalance.toFixed(3)}` + (drs.target !== null ? ` (target ${drs.target.toFixed(3)})` : "") +
    (recs.length ? "" : ": nothing to recommend") + (drs.notes.length ? `. ${drs.notes.join("; ")}` : "");
  $("drs-list").replaceChildren(...recs.map((r) => el("li", { data: { recommendation: r.id } },
    el("strong", {}, `${r.move.vm}: ${r.move.source} → ${r.move.destination}`),
    r.mandatory ? [" ", el("span", { class: "badge warning" }, "mandatory")] : null,
    el("div", {}, r.why),
    el("div", { class: "figure" }, `gain ${r.gain.toFixed(2)}, cost ${seconds(r.cost)}, predicted downtime ` +
                                   ms(r.move.predicted_downtime_ms)),
    canOperate() ? el("button", { type: "button", class: "mutating", on: { click: () => applyDrs({ ids: [r.id] }) } },
                      "Apply") : null)));
  $("drs-actions").replaceChildren(canOperate() && recs.length > 0  // absent, not hidden, for a viewer
    ? el("button", { type: "button", id: "drs-apply-all", class: "mutating", on: { click: () => applyDrs({ all: true }) } },
         "Apply all") : "");
}

async function applyDrs(body) {
  const applied = await act("apply DRS", () => api("POST", "/v1/drs/apply", body));
  if (applied) status(`DRS: ${applied.tasks.length} migration(s) queued` +
                      (applied.skipped.length ? `; skipped: ${applied.skipped.join("; ")}` : ""));
}

// ---- the event feed (server-sent events) ----------------------------------------------------------
const eventItem = (e) => el("li", { data: { kind: e.kind, event: e.id } }, el("time", {}, when(e.at)), `${e.message} `,
                            el("span", { class: "figure" }, e.who));

function stopFollowing() {
  clearTimeout(state.reconnectTimer);
  if (state.events) state.events.close();
  state.events = null;
}

async function follow() {
  // The newest events first (the feed's history and the id to follow from), then the state, then
  // the stream from that id: whatever changes after the state was read arrives as an event.
  stopFollowing();
  const page = await act("reading the events", () => api("GET", `/v1/events?newest=1&limit=${FEED}`));
  if (!page) return;
  state.lastEvent = page.next;
  $("events").replaceChildren(...page.events.slice().reverse().map(eventItem));
  await refresh();
  if (state.session) listen();
}

function reconnect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(async () => {
    try {
      await api("GET", "/v1/sessions/current");
    } catch (err) {
      if (err.status === 401) showSignin();
      else reconnect();  // the center not answering yet: once more later
      return;
    }
    if (state.session) listen();
  }, RECONNECT_MS);
}

function listen() {
  // The browser resumes a dropped stream itself, sending the last id it saw (Last-Event-ID); when
  // it gives up (an answer that is no stream: a session ended, a center restarting) the page opens
  // a new one after the last event it showed, or asks to sign in again.
  const source = new EventSource(`/v1/events?follow=1&loads=1&since=${state.lastEvent}`);
  state.events = source;
  const list = $("events");
  source.onopen = () => { $("live").textContent = "live"; $("live").className = "badge pass"; };
  source.onerror = () => {
    $("live").textContent = "reconnecting";
    $("live").className = "badge warning";
    if (source.readyState === EventSource.CLOSED && state.events === source) reconnect();
  };
  source.onmessage = (message) => {
    const e = JSON.parse(message.data);
    if (e.id <= state.lastEvent) return;  // shown already
    state.lastEvent = e.id;
    list.prepend(eventItem(e));
    while (list.children.length > 100) list.lastElementChild.remove();
    refreshSoon();
  };
  source.addEventListener("loads", (message) => updateLoads(JSON.parse(message.data)));
}

// ---- dialogs ------------------------------------------------------------------------------------------
function dialog(title, body, confirm) {
  $("dialog-title").textContent = title;
  $("dialog-body").replaceChildren(body);
  const button = $("dialog-confirm");
  const fresh = button.cloneNode(false);  // drops the previous dialog's listener
  button.replaceWith(fresh);
  fresh.hidden = !confirm;
  if (confirm) {
    fresh.textContent = confirm.label;
    fresh.addEventListener("click", confirm.run);
  }
  if (!$("dialog").open) $("dialog").showModal();
  return fresh;
}

// ---- maintenance ----------------------------------------------------------------------------------------
function planView(plan) {
  const moves = plan.moves.map((m) => el("li", { value: m.order },  // the list numbers the moves in their order
    `${m.vm}: ${m.source} → ${m.destination} — ${m.why}`,
    el("span", { class: "figure" }, m.powered_off ? "powered off: only its home changes"
                                                  : `predicted ${seconds(m.predicted_s)}, downtime ${ms(m.predicted_downtime_ms)}`)));
  const stuck = plan.unmovable.map((u) => el("li", { class: "error" }, `${u.vm}: ${u.reason}`));
  return el("div", { class: "plan" },
    el("p", {}, plan.moves.length ? `${plan.moves.length} migration(s)` + (plan.predicted_s !== null
      ? `, about ${seconds(plan.predicted_s)} in all` : "") : "No VM to move."),
    moves.length ? el("ol", { class: "moves" }, moves) : null,
    stuck.length ? el("div", {}, el("h3", {}, "Cannot move"), el("ul", {}, stuck)) : null);
}

async function maintenance(host, enter) {
  if (enter) {
    const answer = await act("maintenance plan", () => api("POST", `/v1/hosts/${host}/maintenance`, { dry_run: true }));
    if (!answer) return;
    dialog(`Enter maintenance: ${host}`, planView(answer.plan), { label: "Enter maintenance", run: async () => {
      const done = await act("enter maintenance", () => api("POST", `/v1/hosts/${host}/maintenance`, { dry_run: false }));
      if (done) { $("dialog").close(); status(`${host}: ${words(done.mode)}, ${done.tasks.length} migration(s) queued`); }
    } });
    return;
  }
  const back = el("input", { type: "checkbox", id: "move-back" });
  const body = el("div", {}, el("p", {}, el("label", { for: "move-back" }, back, " move its VMs back")));
  const planBox = el("div");
  body.append(planBox);
  const showPlan = async () => {
    const answer = await act("exit plan", () => api("POST", `/v1/hosts/${host}/maintenance/exit`,
                                                     { dry_run: true, move_back: back.checked }));
    if (answer) planBox.replaceChildren(planView(answer.plan));
  };
  back.addEventListener("change", showPlan);
  dialog(`Exit maintenance: ${host}`, body, { label: "Exit maintenance", run: async () => {
    const done = await act("exit maintenance", () => api("POST", `/v1/hosts/${host}/maintenance/exit`,
                                                          { dry_run: false, move_back: back.checked }));
    if (done) { $("dialog").close(); status(`${host}: ${words(done.mode)}`); }
  } });
  await showPlan();
}

// ---- migrations -----------------------------------------------------------------------------------------
async function migrateDialog(vm) {
  const found = await act("destinations", () => api("GET", `/v1/vms/${vm}/destinations`));
  if (!found) return;
  const choices = found.destinations.map((d, i) => {
    const id = `dest-${i}`;
    const input = el("input", { type: "radio", name: "destination", id, value: d.host });
    if (d.verdict === "error") input.disabled = true;
    if (d.host === found.chosen) input.checked = true;
    return el("div", { class: "choice", data: { host: d.host, verdict: d.verdict } }, input,
      el("label", { for: id }, el("strong", {}, d.host), " ", badge(d.verdict),
         d.verdict !== "error" ? el("span", { class: "figure" },
           `predicted ${seconds(d.predicted_s)}, downtime ${ms(d.predicted_downtime_ms)}`) : null,
         d.reasons.length ? el("ul", {}, d.reasons.map((r) => el("li", {}, r))) : null));
  });
  const form = el("fieldset", {}, el("legend", {}, `${vm} is on ${found.source || "no host"}; move it to`), choices);
  const confirm = dialog(`Migrate ${vm}`, form, { label: "Start migration", run: async () => {
    const picked = form.querySelector("input[name=destination]:checked");
    if (!picked) { failure("pick a destination"); return; }
    const started = await act("migrate", () => api("POST", "/v1/migrations", { vm, destination: picked.value }));
    if (started) watchMigration(started.task.id, vm);
  } });
  confirm.disabled = !found.destinations.some((d) => d.verdict !== "error");
  const first = form.querySelector("input:checked") || form.querySelector("input:not([disabled])");
  if (first) first.focus();
}

function figures(pairs) {
  return el("dl", { class: "figures" }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", { data: { figure: k } }, v)]));
}

function roundsChart(rounds) {
  // Bars per round: MiB sent (blue) and MiB left after the round's sync (orange).
  const box = svg("svg", { class: "chart", viewBox: "0 0 400 160", role: "img",
                           "aria-label": `rounds chart: ${rounds.length} round(s)` });
  const top = Math.max(1, ...rounds.map((r) => Math.max(r.bytes_sent, r.remaining)));
  const width = 380 / Math.max(rounds.length, 1);
  rounds.forEach((r, i) => {
    const x = 10 + i * width;
    const hs = (r.bytes_sent / top) * 130;
    const hl = (r.remaining / top) * 130;
    box.append(svg("rect", { class: "sent", x, y: 140 - hs, width: width * 0.45, height: hs }));
    box.append(svg("rect", { class: "left", x: x + width * 0.47, y: 140 - hl, width: width * 0.45, height: hl }));
    const label = svg("text", { x: x + width * 0.3, y: 154 });
    label.textContent = String(r.round);
    box.append(label);
  });
  const legend = svg("text", { x: 10, y: 12 });
  legend.textContent = `MiB sent (blue) and left (orange) per round; peak ${mib(top)}`;
  box.append(legend);
  return box;
}

function migrationView(d) {
  const p = d.progress;
  const t = d.task;
  const parts = [
    el("p", {}, badge(t.state), ` ${t.target}: ${t.source || "?"} → ${t.destination || "?"}`),
    el("progress", { max: "1", value: String(t.progress.fraction), "aria-label": "migration progress" }),
    figures([
      ["Phase", d.phase || t.progress.phase || "queued"], ["Round", String(p.round)],
      ["Sent", mib(p.transferred)], ["Remaining", mib(p.remaining)],
      ["Dirty rate", rate(p.dirty_rate)], ["Link rate", rate(p.link_rate)],
      ["Throttle", `${Math.round(p.throttle * 100)}%`],
      ["Predicted", `${seconds(t.predicted_s)}, downtime ${ms(t.predicted_downtime_ms)}`],
    ]),
  ];
  if (d.checks.length) {
    parts.push(el("ul", { class: "checks" }, d.checks.map((c) => el("li", {}, badge(c.level), ` ${c.name}: ${c.reason}`))));
  }
  if (t.error) parts.push(el("p", { class: "error" }, t.error));
  if (t.state === "done" || t.state === "failed" || t.state === "cancelled") {
    const s = d.summary;
    if (s) {
      parts.push(el("h3", {}, "Summary"), figures([
        ["Total", ms(s.total_ms)], ["Downtime", ms(s.pause_ms ?? s.downtime_ms)],
        ["QEMU downtime", ms(s.downtime_ms)], ["Rounds", String(s.rounds)],
        ["Bytes", mib(s.bytes)], ["Mean link rate", rate(s.mean_link_rate)],
        ["Peak dirty rate", rate(s.peak_dirty_rate)], ["Max throttle", `${Math.round(s.throttle_max * 100)}%`],
        ["Converged", s.converged ? "yes" : "no"], ["Encrypted", s.encrypted ? "yes" : "no"],
      ]));
    }
    if (d.rounds.length) parts.push(el("h3", {}, "Rounds"), roundsChart(d.rounds));
  }
  return el("div", { class: "migration", data: { state: t.state } }, parts);
}

function watchMigration(taskId, vm) {
  dialog(`Migration of ${vm}`, el("p", {}, "Connecting…"));
  const stream = new EventSource(`/v1/tasks/${taskId}/migration?follow=1`);
  const stop = () => stream.close();
  $("dialog").addEventListener("close", stop, { once: true });
  stream.onmessage = (message) => {
    const detail = JSON.parse(message.data);
    $("dialog-body").replaceChildren(migrationView(detail));
    if (["done", "failed", "cancelled"].includes(detail.task.state)) {
      stop();
      status(`migration of ${vm}: ${detail.task.state}`);
      refreshSoon();
    }
  };
  stream.onerror = () => { if (stream.readyState === EventSource.CLOSED) stop(); };
}

start();
