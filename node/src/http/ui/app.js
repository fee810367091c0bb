// raftsched dashboard: a single page over /api/v1, no dependencies, no build step.
// Every value from the server is put in the page as text (never as HTML).
"use strict";

const TOKEN_KEY = "raftsched.token";
const STATES = ["waiting", "queued", "delayed", "assigned", "running", "succeeded", "failed", "cancelled", "upstream_failed"];
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "upstream_failed"]);
const RETRYABLE = new Set(["failed", "cancelled", "upstream_failed"]);
const STATE_COLORS = {
  waiting: "#7c3aed", queued: "#2f6fde", delayed: "#d08a00", assigned: "#0284c7", running: "#16a34a",
  succeeded: "#1f9d55", failed: "#d64545", cancelled: "#4b5563", upstream_failed: "#e08585",
};

const app = {
  role: null,          // the token's role (admin when auth is off)
  auth: false,
  view: null,          // the current render function, re-run on live updates
  refreshTimer: null,
  lastEventId: null,
  liveBatches: 0,
  pageToken: [],       // task list: tokens of the pages before this one
};
window.__raftsched = app; // for tests: lets them see live updates arrive without a reload

// ---------------------------------------------------------------------------- helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function statePill(s) { return h("span", { class: `pill state st-${s}`, "data-state": s }, s.replace("_", " ")); }

function fmtTime(ms) {
  if (!ms) return "—";
  const d = new Date(ms);
  return d.toLocaleTimeString() + (Date.now() - ms > 86400000 ? " " + d.toLocaleDateString() : "");
}

function fmtAgo(ms) {
  if (!ms) return "—";
  return fmtDur(Date.now() - ms) + " ago";
}

function fmtDur(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return Math.round(ms) + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
  if (ms < 3600000) return Math.floor(ms / 60000) + "m " + Math.round((ms % 60000) / 1000) + "s";
  return (ms / 3600000).toFixed(1) + " h";
}

function flash(msg, bad) {
  const el = document.getElementById("flash");
  el.textContent = msg;
  el.className = "flash" + (bad ? " bad" : "");
  el.hidden = false;
  clearTimeout(flash.t);
  flash.t = setTimeout(() => { el.hidden = true; }, 5000);
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, body) { super(body && body.error ? body.error : "HTTP " + status); this.status = status; this.body = body; }
}

async function api(path, opts) {
  const headers = Object.assign({}, (opts && opts.headers) || {});
  const t = token();
  if (t) headers["authorization"] = "Bearer " + t;
  const resp = await fetch(path, Object.assign({}, opts || {}, { headers }));
  let body = null;
  try { body = await resp.json(); } catch (_) { body = null; }
  if (resp.status === 401) { showLogin(body && body.error); throw new ApiError(401, body); }
  if (!resp.ok) throw new ApiError(resp.status, body);
  return body;
}

function post(path, body) {
  return api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body || {}) });
}

function canCancel() { return app.role === "admin" || app.role === "submitter"; }
function canDrain() { return app.role === "admin"; }
function canRetry() { return canCancel(); }

// ---------------------------------------------------------------------------- login

function showLogin(msg) {
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = token() ? (msg || "the token was refused") : "";
}

document.getElementById("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
  document.getElementById("login").hidden = true;
  await start();
});

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
});

// ---------------------------------------------------------------------------- routing

function route() {
  const hash = location.hash || "#/";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.remove("active"));
  let m;
  if ((m = path.match(/^\/task\/(\d+)$/))) { setNav("tasks"); return show(() => taskPage(m[1])); }
  if (path === "/tasks") { setNav("tasks"); return show(() => tasksPage(params)); }
  if (path === "/workers") { setNav("workers"); return show(workersPage); }
  setNav("overview");
  return show(overviewPage);
}

function setNav(name) {
  const a = document.querySelector(`[data-nav="${name}"]`);
  if (a) a.classList.add("active");
}

async function show(render) {
  app.view = render;
  await rerender();
}

async function rerender() {
  const render = app.view;
  if (!render) return;
  try {
    const el = await render();
    if (app.view !== render) return; // navigated meanwhile
    const main = document.getElementById("main");
    main.replaceChildren(el);
  } catch (e) {
    if (e.status === 401) return;
    document.getElementById("main").replaceChildren(h("div", { class: "card error" }, "Could not load: " + e.message));
  }
}

// Live updates re-render the current page, at most every 400 ms.
function scheduleRefresh() {
  if (app.refreshTimer) return;
  app.refreshTimer = setTimeout(() => { app.refreshTimer = null; rerender(); }, 400);
}

window.addEventListener("hashchange", () => {
  // The task list's page stack lives while paging; any other page starts it afresh.
  if (!location.hash.startsWith("#/tasks")) app.pageToken = [];
  route();
});

// Membership, leadership and indexes change without task events: poll the overview too.
setInterval(() => { if (app.view === overviewPage && !document.hidden) scheduleRefresh(); }, 3000);

// ---------------------------------------------------------------------------- overview

async function overviewPage() {
  const [c, stats] = await Promise.all([api("/api/v1/cluster"), api("/api/v1/stats?window=10m")]);
  document.getElementById("node-info").textContent = `node ${c.node_id} · term ${c.term}`;
  const members = h("table", { id: "members" },
    h("thead", {}, h("tr", {}, ["id", "address", "role", "term", "last log", "committed", "applied", "matched", "reachable"].map((x) => h("th", {}, x)))),
    h("tbody", {}, c.members.map((n) => h("tr", { "data-node": n.id },
      h("td", {}, n.id === c.leader_id ? h("span", { class: "leader" }, `${n.id} ★`) : String(n.id)),
      h("td", {}, n.addr),
      h("td", {}, n.reachable ? n.role + (n.voter ? "" : " (learner)") : h("span", { class: "error" }, n.error || "unreachable")),
      h("td", {}, n.term), h("td", {}, n.last_log_index), h("td", {}, n.committed_index),
      h("td", {}, n.applied_index), h("td", {}, n.matched_index || "—"),
      h("td", {}, n.reachable ? "yes" : "no")))));
  const counts = h("div", { class: "counts", id: "task-counts" }, STATES.map((s) =>
    h("a", { class: "count", href: `#/tasks?state=${s}`, "data-state": s }, h("b", {}, c.tasks[s] || 0), s.replace("_", " "))));
  return h("div", {},
    h("h1", {}, "Cluster"),
    h("div", { class: "card" },
      h("h2", {}, "Leader: ", h("span", { id: "leader", class: "leader" }, c.leader_id ? `node ${c.leader_id}` : "none"), h("span", { class: "muted" }, ` · term ${c.term}`)),
      members),
    h("div", { class: "card" }, h("h2", {}, "Tasks per state"), counts),
    h("div", { class: "card" }, h("h2", {}, "Throughput and latency, last 10 minutes"), throughputChart(stats),
      h("div", { class: "chart-legend" }, "bars: tasks finished per minute (green succeeded, red failed, grey cancelled) · line: mean submit-to-finish time · tasks submitted in the window")));
}

function throughputChart(stats) {
  const W = 900, H = 180, P = 30;
  const rows = stats.minutes;
  const maxN = Math.max(1, ...rows.map((r) => r.succeeded + r.failed + r.cancelled));
  const maxL = Math.max(1, ...rows.map((r) => r.mean_end_to_end_ms || 0));
  const bw = (W - 2 * P) / rows.length;
  const g = svg("svg", { viewBox: `0 0 ${W} ${H + 20}`, width: "100%", id: "throughput" });
  g.append(svg("line", { x1: P, y1: H, x2: W - P, y2: H, stroke: "#cdd3dc" }));
  const pts = [];
  rows.forEach((r, i) => {
    const x = P + i * bw;
    let y = H;
    for (const [k, color] of [["succeeded", "#1f9d55"], ["failed", "#d64545"], ["cancelled", "#8a94a6"]]) {
      const hgt = (r[k] / maxN) * (H - P);
      if (hgt > 0) g.append(svg("rect", { x: x + 3, y: y - hgt, width: bw - 6, height: hgt, fill: color }, svg("title", {}, `${r[k]} ${k}`)));
      y -= hgt;
    }
    const label = new Date(r.minute_ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    g.append(svg("text", { x: x + bw / 2, y: H + 14, "text-anchor": "middle", fill: "#6b7280" }, label));
    if (r.mean_end_to_end_ms !== null) pts.push(`${x + bw / 2},${H - (r.mean_end_to_end_ms / maxL) * (H - P)}`);
  });
  if (pts.length > 1) g.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: "#2f6fde", "stroke-width": 2 }));
  g.append(svg("text", { x: P, y: 14, fill: "#6b7280" }, `max ${maxN}/min · latency max ${fmtDur(maxL)}`));
  return g;
}

// ---------------------------------------------------------------------------- tasks

async function tasksPage(params) {
  const q = new URLSearchParams();
  for (const k of ["state", "queue", "name", "since"]) if (params.get(k)) q.set(k, params.get(k));
  q.set("limit", params.get("limit") || "50");
  if (params.get("page_token")) q.set("page_token", params.get("page_token"));
  const page = await api("/api/v1/tasks?" + q.toString());
  const field = (name, el) => h("label", {}, name, el);
  const stateSel = h("select", { name: "state" }, h("option", { value: "" }, "any"), STATES.map((s) => h("option", { value: s, selected: params.get("state") === s }, s)));
  const form = h("form", { class: "filters", id: "task-filters", onsubmit: (e) => {
    e.preventDefault();
    const f = new FormData(form);
    const idJump = String(f.get("id") || "").trim();
    if (idJump) { location.hash = "#/task/" + encodeURIComponent(idJump); return; }
    app.pageToken = [];
    const n = new URLSearchParams();
    for (const k of ["state", "queue", "name", "since"]) if (f.get(k)) n.set(k, String(f.get(k)).trim());
    location.hash = "#/tasks?" + n.toString();
  } },
    field("state", stateSel),
    field("queue", h("input", { name: "queue", value: params.get("queue") || "", placeholder: "default", size: 10 })),
    field("name", h("input", { name: "name", value: params.get("name") || "", placeholder: "exact name", size: 14 })),
    field("since", h("input", { name: "since", value: params.get("since") || "", placeholder: "10m", size: 6 })),
    field("go to id", h("input", { name: "id", placeholder: "task id", size: 8 })),
    h("button", { type: "submit" }, "Search"));
  const rows = page.tasks.map((t) => h("tr", { class: "clickable", "data-id": t.id, "data-state": t.state, onclick: () => { location.hash = "#/task/" + t.id; } },
    h("td", {}, t.id), h("td", {}, t.name), h("td", {}, t.queue), h("td", {}, t.priority),
    h("td", { class: "state-cell" }, statePill(t.state)), h("td", {}, t.attempt), h("td", {}, t.worker || "—"),
    h("td", {}, fmtTime(t.submitted_at_ms)), h("td", {}, fmtAgo(t.updated_at_ms))));
  const table = h("table", { id: "task-table" },
    h("thead", {}, h("tr", {}, ["id", "name", "queue", "prio", "state", "attempt", "worker", "submitted", "changed"].map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No tasks match."))));
  const go = (tok) => { const n = new URLSearchParams(params); if (tok) n.set("page_token", tok); else n.delete("page_token"); location.hash = "#/tasks?" + n.toString(); };
  const pager = h("div", { class: "pager" },
    h("button", { class: "secondary", id: "page-newer", disabled: !params.get("page_token"), onclick: () => go(app.pageToken.pop() || "") }, "← newer"),
    h("button", { class: "secondary", id: "page-older", disabled: !page.next_page_token, onclick: () => { app.pageToken.push(params.get("page_token") || ""); go(page.next_page_token); } }, "older →"),
    h("span", { class: "muted" }, page.remaining ? `${page.remaining}${page.remaining_is_lower_bound ? "+" : ""} more` : ""));
  return h("div", {}, h("h1", {}, "Tasks"), h("div", { class: "card" }, form, table, pager));
}

async function taskPage(id) {
  const t = await api("/api/v1/tasks/" + id);
  const actions = h("div", { class: "pager" });
  if (canCancel() && !TERMINAL.has(t.state)) {
    actions.append(h("button", { class: "danger", id: "cancel-task", onclick: async () => {
      if (!confirm(`Cancel task ${t.id} (${t.name})?`)) return;
      try { await post(`/api/v1/tasks/${t.id}/cancel`, { reason: "cancelled from the dashboard" }); flash(`task ${t.id} cancelled`); rerender(); }
      catch (e) { flash(e.message, true); }
    } }, "Cancel"));
  }
  if (canRetry() && RETRYABLE.has(t.state)) {
    const deps = h("input", { type: "checkbox", id: "retry-dependents" });
    actions.append(h("button", { id: "retry-task", onclick: async () => {
      const withDeps = deps.checked;
      if (!confirm(`Run task ${t.id} (${t.name}) again${withDeps ? " with its failed dependents" : ""}?`)) return;
      try {
        const r = await post(`/api/v1/tasks/${t.id}/retry`, { with_dependents: withDeps });
        flash(`task ${t.id} retried` + (r.retried.length > 1 ? ` with ${r.retried.length - 1} dependents` : ""));
        rerender();
      } catch (e) { flash(e.message, true); }
    } }, "Retry"), h("label", { class: "muted" }, deps, " with dependents"));
  }
  const kv = (pairs) => h("div", { class: "kv" }, pairs.flatMap(([k, v]) => [h("div", {}, k), h("div", {}, v)]));
  const details = kv([
    ["state", statePill(t.state)], ["queue", t.queue], ["priority", t.priority],
    ["attempt", `${t.attempt}${t.max_attempts ? " of " + t.max_attempts : ""}`],
    ["worker", t.worker || "—"], ["fencing token", t.fence !== undefined ? t.fence : "hidden (admins only)"],
    ["submitted", fmtTime(t.submitted_at_ms)], ["finished", fmtTime(t.finished_at_ms)],
    ["depends on", t.depends_on.length ? t.depends_on.map((d) => h("a", { href: "#/task/" + d }, d, " ")) : "—"],
    ["resources", `${t.resources.cpu_milli}m cpu, ${t.resources.memory_mib} MiB` + Object.entries(t.resources.named).map(([k, v]) => `, ${k}=${v}`).join("")],
    ["labels", Object.entries(t.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "—"],
    ["cancel reason", t.cancel_reason || "—"],
  ]);
  const timeline = h("ul", { class: "timeline", id: "timeline" }, buildTimeline(t).map((e) =>
    h("li", {}, h("b", {}, fmtTime(e.at)), " ", e.state ? statePill(e.state) : null, " ", e.text)));
  const lf = t.last_failure;
  return h("div", {},
    h("h1", {}, `Task ${t.id}: `, t.name, " ", statePill(t.state)),
    h("div", { class: "card" }, h("h2", {}, "Why"), h("div", { class: "explain", id: "explain" }, t.explain ? t.explain.summary : "—"),
      lf ? h("p", { class: "error" }, `last failure: attempt ${lf.attempt} on ${lf.worker}: ${lf.kind}: ${lf.message}`) : null, actions),
    h("div", { class: "grid" },
      h("div", { class: "card" }, h("h2", {}, "Details"), details),
      h("div", { class: "card" }, h("h2", {}, "Timeline of attempts"), timeline)),
    h("div", { class: "card" }, h("h2", {}, "DAG"), dagView(t.dag, t.id)),
    h("div", { class: "card" }, h("h2", {}, "Result"), t.state === "succeeded" ? h("pre", { id: "result" }, t.result || "(empty)") : h("p", { class: "muted" }, "No result yet.")));
}

function buildTimeline(t) {
  const out = [{ at: t.submitted_at_ms, text: "submitted" }];
  for (const e of t.history) {
    let text = `attempt ${e.attempt}`;
    if (e.worker) text += ` on ${e.worker}`;
    if (e.revoked_worker) text += ` (taken from ${e.revoked_worker})`;
    out.push({ at: e.at_ms, state: e.state, text });
  }
  if (!t.history.length) {
    if (t.assigned_at_ms) out.push({ at: t.assigned_at_ms, state: "assigned", text: `attempt ${t.attempt} on ${t.worker}` });
    if (t.started_at_ms) out.push({ at: t.started_at_ms, state: "running", text: `attempt ${t.attempt}` });
    if (t.last_failure) out.push({ at: t.last_failure.at_ms, state: "failed", text: `attempt ${t.last_failure.attempt}: ${t.last_failure.kind}` });
    if (t.finished_at_ms) out.push({ at: t.finished_at_ms, state: t.state, text: "finished" });
  }
  return out.sort((a, b) => a.at - b.at);
}

function dagView(dag, current) {
  if (!dag || dag.nodes.length <= 1) return h("p", { class: "muted", id: "dag" }, "No dependencies and no dependents.");
  const byId = new Map(dag.nodes.map((n) => [n.id, n]));
  const depth = new Map();
  const depthOf = (id, guard) => {
    if (depth.has(id)) return depth.get(id);
    if (guard > 500) return 0;
    const n = byId.get(id);
    const d = n ? Math.max(-1, ...n.deps.filter((x) => byId.has(x)).map((x) => depthOf(x, guard + 1))) + 1 : 0;
    depth.set(id, d);
    return d;
  };
  dag.nodes.forEach((n) => depthOf(n.id, 0));
  const layers = [];
  for (const n of dag.nodes) (layers[depth.get(n.id)] = layers[depth.get(n.id)] || []).push(n);
  const NW = 150, NH = 34, GX = 60, GY = 16;
  const W = layers.length * (NW + GX) + 20, H = Math.max(...layers.map((l) => l.length)) * (NH + GY) + 20;
  const pos = new Map();
  layers.forEach((l, i) => l.forEach((n, j) => pos.set(n.id, { x: 10 + i * (NW + GX), y: 10 + j * (NH + GY) })));
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: Math.min(W, 1200), id: "dag" });
  g.append(svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" }, svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8a94a6" }))));
  for (const [a, b] of dag.edges) {
    const p = pos.get(a), q = pos.get(b);
    if (!p || !q) continue;
    g.append(svg("path", { d: `M${p.x + NW},${p.y + NH / 2} C${p.x + NW + GX / 2},${p.y + NH / 2} ${q.x - GX / 2},${q.y + NH / 2} ${q.x},${q.y + NH / 2}`, fill: "none", stroke: "#8a94a6", "marker-end": "url(#arrow)" }));
  }
  for (const n of dag.nodes) {
    const p = pos.get(n.id);
    const node = svg("g", { class: "dag-node" + (n.id === current ? " current" : ""), "data-id": n.id, "data-state": n.state, transform: `translate(${p.x},${p.y})`, onclick: () => { location.hash = "#/task/" + n.id; } },
      svg("rect", { width: NW, height: NH, rx: 6, fill: STATE_COLORS[n.state] || "#999", opacity: 0.9 }),
      svg("text", { x: 8, y: 14, fill: "#fff" }, `${n.id} · ${n.name}`.slice(0, 24)),
      svg("text", { x: 8, y: 27, fill: "#fff" }, n.state.replace("_", " ")),
      svg("title", {}, `task ${n.id} ${n.name}: ${n.state}`));
    g.append(node);
  }
  const wrap = h("div", {}, g);
  if (dag.truncated) wrap.append(h("p", { class: "muted" }, "The graph is cut at 200 tasks."));
  return wrap;
}

// ---------------------------------------------------------------------------- workers

async function workersPage() {
  const w = await api("/api/v1/workers");
  const bar = (used, cap) => {
    const pct = cap ? Math.min(100, (100 * used) / cap) : 0;
    const fill = h("span", {});
    fill.style.width = pct + "%"; // CSSOM, not a style attribute: the CSP forbids inline styles
    return h("div", { class: "bar", title: `${used} of ${cap}` }, fill);
  };
  const rows = w.workers.map((x) => h("tr", { "data-worker": x.id, "data-status": x.status },
    h("td", {}, x.id), h("td", {}, h("span", { class: "pill" + (x.status === "alive" ? " on" : "") }, x.status)),
    h("td", {}, x.queues.join(", ")),
    h("td", {}, `${x.load} / ${x.slots}`, bar(x.load, x.slots)),
    h("td", {}, `${x.used.cpu_milli}m / ${x.capacity.cpu_milli}m`, bar(x.used.cpu_milli, x.capacity.cpu_milli)),
    h("td", {}, `${x.used.memory_mib} / ${x.capacity.memory_mib} MiB`, bar(x.used.memory_mib, x.capacity.memory_mib)),
    h("td", {}, x.heartbeat_age_ms === null ? (w.heartbeats_known ? "—" : "known by the leader") : fmtDur(x.heartbeat_age_ms)),
    h("td", {}, x.tasks.slice(0, 8).map((t) => h("a", { href: "#/task/" + t }, t, " ")), x.tasks.length > 8 ? "…" : ""),
    h("td", {}, !canDrain() ? "" : x.status === "alive" ? h("button", { class: "secondary", onclick: async () => {
      if (!confirm(`Drain worker ${x.id}? It keeps its tasks and takes no new work until undrained.`)) return;
      try { await post(`/api/v1/workers/${encodeURIComponent(x.id)}/drain`); flash(`worker ${x.id} draining`); rerender(); }
      catch (e) { flash(e.message, true); }
    } }, "Drain") : x.status === "draining" ? h("button", { class: "secondary", "data-action": "undrain", onclick: async () => {
      try { await post(`/api/v1/workers/${encodeURIComponent(x.id)}/undrain`); flash(`worker ${x.id} takes tasks again`); rerender(); }
      catch (e) { flash(e.message, true); }
    } }, "Undrain") : "")));
  return h("div", {}, h("h1", {}, "Workers"), h("div", { class: "card" },
    h("table", { id: "workers-table" },
      h("thead", {}, h("tr", {}, ["id", "status", "queues", "slots", "cpu", "memory", "heartbeat", "tasks", ""].map((x) => h("th", {}, x)))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No workers registered.")))),
    h("p", { class: "muted" }, "Draining stops new assignments (the worker keeps what it holds); undraining gives it tasks again.")));
}

// ---------------------------------------------------------------------------- live updates

// Server-Sent Events over fetch (EventSource cannot send the authorization header).
// Reconnects from the last event id, with a bounded backoff.
async function live() {
  const pill = document.getElementById("live");
  let backoff = 500;
  for (;;) {
    try {
      const headers = {};
      if (token()) headers["authorization"] = "Bearer " + token();
      if (app.lastEventId !== null) headers["last-event-id"] = String(app.lastEventId);
      const resp = await fetch("/api/v1/events", { headers });
      if (resp.status === 401) { pill.textContent = "offline"; pill.className = "pill off"; return; }
      if (resp.status === 410) app.lastEventId = null; // events compacted: start from now
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      pill.textContent = "live"; pill.className = "pill on";
      backoff = 500;
      const reader = resp.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const raw = buf.slice(0, i);
          buf = buf.slice(i + 2);
          handleFrame(raw);
        }
      }
    } catch (_) { /* reconnect below */ }
    pill.textContent = "reconnecting"; pill.className = "pill off";
    await new Promise((r) => setTimeout(r, backoff));
    backoff = Math.min(backoff * 2, 10000);
  }
}

function handleFrame(raw) {
  let event = "message", data = "", id = null;
  for (const line of raw.split("\n")) {
    if (line.startsWith(":")) continue;
    const j = line.indexOf(":");
    const k = j < 0 ? line : line.slice(0, j);
    const v = j < 0 ? "" : line.slice(j + 1).replace(/^ /, "");
    if (k === "event") event = v; else if (k === "data") data += v; else if (k === "id") id = v;
  }
  if (event === "batch") {
    app.lastEventId = id;
    app.liveBatches += 1;
    let b;
    try { b = JSON.parse(data); } catch (_) { return; }
    for (const e of b.events) markRow(e);
    scheduleRefresh();
  } else if (event === "close") {
    try { const c = JSON.parse(data); if (c.resume_from) app.lastEventId = c.resume_from - 1; } catch (_) { /* ignore */ }
  }
}

// Update a visible row at once, before the page refresh lands.
function markRow(e) {
  const row = document.querySelector(`#task-table tr[data-id="${e.task}"]`);
  if (!row) return;
  row.setAttribute("data-state", e.state);
  const cell = row.querySelector(".state-cell");
  if (cell) cell.replaceChildren(statePill(e.state));
  row.classList.remove("flash-row");
  void row.offsetWidth;
  row.classList.add("flash-row");
}

// ---------------------------------------------------------------------------- start

async function start() {
  try {
    const me = await api("/api/v1/whoami");
    app.auth = me.auth;
    app.role = me.role;
    document.getElementById("who").textContent = me.auth ? `${me.name} (${me.role})` : "auth off";
    document.getElementById("logout").hidden = !me.auth;
  } catch (e) {
    if (e.status !== 401) document.getElementById("main").replaceChildren(h("div", { class: "card error" }, "Could not reach the node: " + e.message));
    return;
  }
  route();
  if (!app.liveStarted) { app.liveStarted = true; live(); }
}

start();
