// nexus-fast dashboard: one ES module, no build step, no dependency.
//
// Lists the state once (/api/v1/nodes, /api/v1/agents, /health/detailed, the recent event
// log), then follows /api/v1/events/stream (server-sent events, read with fetch so HTTP
// statuses are visible). Every message carries its index; after a disconnect the stream
// resumes after the last index seen, so nothing is missed and nothing is polled. Only a
// `reset` (410: the log no longer holds what we missed) makes it list everything again.
// Renders are batched per animation frame; the node table renders only its visible rows.

const ROW = 30;                 // px, must match --row in dashboard.css
const PAGE = 1000;              // the HTTP API's largest page
const BACKLOG = 3000;           // recent events read at start for the feed and the rates
const MAX_COMMANDS = 2000;      // commands kept in memory (most recently updated)
const MAX_FEED = 200;
const MAX_FAILURES = 50;
const RATE_WINDOW_MS = 60_000;
const COMMAND_STATES = ["PENDING", "PLACED", "DISPATCHED", "ACKED", "SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED"];
const GONE = new Set(["node.removed", "node.expired", "node.deregistered"]);

const $ = (id) => document.getElementById(id);
const state = {
  nodes: new Map(),
  nodeOrder: null,              // sorted ids, rebuilt when the set of ids changes
  filtered: [],
  commands: new Map(),          // id -> record; Map order = least recently updated first
  history: new Map(),           // command id -> [{index, time_ms, state, node_id, attempt, reason}]
  failures: [],
  agents: new Map(),
  feed: [],
  feedPaused: false,
  rates: [],                    // [time_ms, state] of command transitions in the window
  labelValues: new Set(),
  health: null,
  lastIndex: null,
  selected: null,
};
// For people and tests: what the page knows about its stream.
const stats = { connects: 0, relists: 0, events: 0, lastIndex: null, live: false };
window.nexusDashboard = stats;

// ------------------------------------------------------------------ helpers

const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ESC[c]);
const short = (name, prefix) => (name || "").startsWith(prefix) ? name.slice(prefix.length) : (name || "");
const cmdState = (s) => short(s, "COMMAND_STATE_").toUpperCase();  // events say "succeeded"
const agentState = (s) => short(s, "AGENT_STATE_").toLowerCase();

function ago(ms) {
  if (!ms) return "never";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  return `${Math.floor(s / 3600)}h ago`;
}

function clock(ms) {
  return ms ? new Date(ms).toLocaleTimeString([], { hour12: false }) : "";
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}

function usage(used, cap) {
  if (!cap) return `<span class="muted">–</span>`;
  const f = Math.min(1, used / cap);
  return `<meter min="0" max="1" low="0.7" high="0.9" optimum="0" value="${f.toFixed(3)}"></meter>${Math.round(f * 100)}%`;
}

function showError(message) {
  $("error").textContent = message || "";
}

async function getJSON(url) {
  const res = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await res.json().catch(() => null);
  if (!res.ok) {
    const err = new Error(`${url}: ${res.status} ${body?.error?.message ?? res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

// ------------------------------------------------------------------ render scheduling

const dirty = new Set();
let frame = 0;
function mark(...parts) {
  for (const p of parts) dirty.add(p);
  if (!frame) frame = requestAnimationFrame(flush);
}
function flush() {
  frame = 0;
  const parts = [...dirty];
  dirty.clear();
  for (const p of parts) RENDER[p]();
}

// ------------------------------------------------------------------ nodes

function nodeFilter() {
  const status = $("status-filter").value;
  const text = $("text-filter").value.trim().toLowerCase();
  const labels = [];
  for (const part of $("label-filter").value.split(",")) {
    const [k, ...v] = part.split("=");
    if (k.trim()) labels.push([k.trim(), v.join("=").trim()]);
  }
  return (n) => (!status || n.status === status)
    && labels.every(([k, v]) => n.labels?.[k] === v || (!v && k in (n.labels || {})))
    && (!text || n.id.toLowerCase().includes(text) || (n.address || "").toLowerCase().includes(text));
}

function renderCounts() {
  const counts = { ready: 0, draining: 0, down: 0 };
  for (const n of state.nodes.values()) counts[n.status] = (counts[n.status] || 0) + 1;
  $("count-total").textContent = state.nodes.size;
  for (const s of ["ready", "draining", "down"]) $(`count-${s}`).textContent = counts[s];
}

function renderNodes() {
  if (state.nodeOrder === null) state.nodeOrder = [...state.nodes.keys()].sort();
  const keep = nodeFilter();
  state.filtered = state.nodeOrder.filter((id) => keep(state.nodes.get(id)));
  $("shown").textContent = `${state.filtered.length} of ${state.nodes.size} shown`;
  $("nodes-spacer").style.height = `${state.filtered.length * ROW}px`;
  // Short lists take their own height; long ones scroll inside 14 rows.
  $("nodes-scroller").style.height = `${Math.min(14, Math.max(1, state.filtered.length)) * ROW + 2}px`;
  renderCounts();
  renderRows();
}

// Only the rows in view (plus a margin) exist in the DOM: 10,000 nodes cost ~30 rows.
function renderRows() {
  const scroller = $("nodes-scroller");
  const rows = state.filtered;
  const first = Math.max(0, Math.floor(scroller.scrollTop / ROW) - 5);
  const count = Math.ceil(scroller.clientHeight / ROW) + 10;
  const html = [];
  for (const id of rows.slice(first, first + count)) {
    const n = state.nodes.get(id);
    const labels = Object.entries(n.labels || {}).map(([k, v]) => `<span class="tag">${esc(k)}=${esc(v)}</span>`).join("");
    html.push(`<tr data-node-id="${esc(n.id)}"><td class="mono" title="${esc(n.id)}">${esc(n.id)}</td>`
      + `<td class="status"><span class="pill s-${esc(n.status)}">${esc(n.status)}</span></td>`
      + `<td class="mono">${esc(n.address)}</td><td>${labels}</td>`
      + `<td>${usage(n.usage?.cpu, n.capacity?.cpu)}</td><td>${usage(n.usage?.memory, n.capacity?.memory)}</td>`
      + `<td>${usage(n.usage?.gpu, n.capacity?.gpu)}</td><td>${ago(n.status_changed_ms)}</td></tr>`);
  }
  if (!html.length) {
    html.push(`<tr><td colspan="8" class="empty">${state.nodes.size ? "no node matches the filter" : "no nodes registered"}</td></tr>`);
  }
  $("nodes").innerHTML = html.join("");
  $("nodes-table").style.transform = `translateY(${first * ROW}px)`;
}

function putNode(n) {
  if (!state.nodes.has(n.id)) state.nodeOrder = null;
  state.nodes.set(n.id, n);
  if (state.labelValues.size < 200) {
    for (const [k, v] of Object.entries(n.labels || {})) state.labelValues.add(`${k}=${v}`);
  }
}

function renderLabelValues() {
  $("label-values").innerHTML = [...state.labelValues].sort().map((v) => `<option value="${esc(v)}">`).join("");
}

// ------------------------------------------------------------------ commands

function putCommand(c, event) {
  state.commands.delete(c.id);
  state.commands.set(c.id, c);
  if (state.commands.size > MAX_COMMANDS) {
    const oldest = state.commands.keys().next().value;
    state.commands.delete(oldest);
    state.history.delete(oldest);
  }
  if (event) {
    let h = state.history.get(c.id);
    if (!h) state.history.set(c.id, h = []);
    if (!h.length || h[h.length - 1].index < event.index) {
      h.push({ index: event.index, time_ms: event.time_ms, state: cmdState(c.state), node_id: c.node_id, attempt: c.attempt, reason: c.reason });
      if (h.length > 32) h.shift();
    }
    state.rates.push([event.time_ms, cmdState(c.state)]);
    const s = cmdState(c.state);
    if (s === "FAILED" || s === "TIMED_OUT") {
      state.failures.unshift({ id: c.id, state: s, node_id: c.node_id, reason: c.reason, time_ms: event.time_ms });
      state.failures.length = Math.min(state.failures.length, MAX_FAILURES);
    }
  }
}

function renderCommands() {
  const recent = [...state.commands.values()].slice(-50).reverse();
  $("commands").innerHTML = recent.length ? recent.map((c) => {
    const s = cmdState(c.state);
    return `<tr class="pick" data-command-id="${esc(c.id)}"><td class="mono">${esc(c.id)}</td><td>${esc(c.spec?.kind)}</td>`
      + `<td class="state"><span class="pill s-${esc(s.toLowerCase())}">${esc(s)}</span></td>`
      + `<td class="mono">${esc(c.node_id)}</td><td class="num">${c.attempt ?? ""}</td><td>${clock(c.updated_ms)}</td></tr>`;
  }).join("") : `<tr><td colspan="6" class="empty">no commands seen yet</td></tr>`;
  $("failures").innerHTML = state.failures.length ? state.failures.map((f) =>
    `<tr class="pick" data-command-id="${esc(f.id)}"><td class="mono">${esc(f.id)}</td>`
    + `<td><span class="pill s-${esc(f.state.toLowerCase())}">${esc(f.state)}</span></td>`
    + `<td class="mono">${esc(f.node_id)}</td><td title="${esc(f.reason)}">${esc(f.reason || "–")}</td><td>${clock(f.time_ms)}</td></tr>`,
  ).join("") : `<tr><td colspan="5" class="empty">none</td></tr>`;
  if (state.selected && state.commands.has(state.selected)) renderLifecycle(state.commands.get(state.selected));
}

function renderRates() {
  const now = Date.now();
  const rates = state.rates;
  let drop = 0;
  while (drop < rates.length && rates[drop][0] < now - RATE_WINDOW_MS) drop++;
  if (drop) rates.splice(0, drop);
  const counts = Object.fromEntries(COMMAND_STATES.map((s) => [s, 0]));
  for (const [, s] of rates) counts[s] = (counts[s] || 0) + 1;
  const max = Math.max(1, ...Object.values(counts));
  $("rates").innerHTML = COMMAND_STATES.map((s) =>
    `<span class="pill s-${s.toLowerCase()}">${s}</span><meter min="0" max="${max}" value="${counts[s]}"></meter>`
    + `<span class="n" data-state="${s}">${counts[s]}/min</span>`).join("");
  $("cmd-rate").textContent = counts.SUCCEEDED + counts.FAILED + counts.TIMED_OUT + counts.CANCELLED;
}

function renderLifecycle(c) {
  const s = cmdState(c.state);
  const steps = (state.history.get(c.id) || []).map((h) =>
    `<li><span class="pill s-${esc(h.state.toLowerCase())}">${esc(h.state)}</span> ${clock(h.time_ms)}`
    + ` <span class="muted">#${h.index}${h.node_id ? ` on ${esc(h.node_id)}` : ""}${h.attempt ? `, attempt ${h.attempt}` : ""}</span>`
    + `${h.reason ? ` – ${esc(h.reason)}` : ""}</li>`).join("");
  const spec = c.spec || {};
  $("lifecycle").className = "panel";
  $("lifecycle").innerHTML = `<dl>
    <dt>id</dt><dd class="mono">${esc(c.id)}</dd>
    <dt>state</dt><dd><span class="pill s-${esc(s.toLowerCase())}" id="lifecycle-state">${esc(s)}</span></dd>
    <dt>kind</dt><dd>${esc(spec.kind)}</dd>
    <dt>node</dt><dd class="mono">${esc(c.node_id || spec.target_node || "–")}</dd>
    <dt>attempt</dt><dd>${c.attempt} of ${spec.max_attempts || "default"}${c.tried_nodes?.length ? ` (tried ${c.tried_nodes.map(esc).join(", ")})` : ""}</dd>
    <dt>created</dt><dd>${clock(c.created_ms)}</dd>
    <dt>dispatched</dt><dd>${clock(c.dispatched_ms) || "–"}</dd>
    <dt>finished</dt><dd>${clock(c.finished_ms) || "–"}</dd>
    <dt>reason</dt><dd>${esc(c.reason || "–")}</dd>
  </dl>${steps ? `<ol>${steps}</ol>` : `<p class="muted">no transitions seen since this page opened</p>`}`;
}

async function selectCommand(id) {
  state.selected = id;
  $("lifecycle-id").value = id;
  try {
    const c = await getJSON(`/api/v1/commands/${encodeURIComponent(id)}`);
    if (state.selected === id) renderLifecycle(c);
  } catch (err) {
    $("lifecycle").className = "panel muted";
    $("lifecycle").textContent = err.message;
  }
}

// ------------------------------------------------------------------ agents

function renderAgents() {
  const byName = new Map();
  let running = 0;
  for (const a of state.agents.values()) {
    const s = agentState(a.state);
    if (s === "running") running++;
    if (!byName.has(a.name)) byName.set(a.name, { replicas: a.spec?.replicas || 0, states: {} });
    const g = byName.get(a.name);
    g.states[s] = (g.states[s] || 0) + 1;
  }
  $("agents-running").textContent = running;
  $("agents").innerHTML = byName.size ? [...byName].sort().map(([name, g]) =>
    `<tr data-agent="${esc(name)}"><td>${esc(name)}</td><td class="num">${g.replicas}</td><td>${Object.entries(g.states).map(([s, n]) =>
      `<span class="pill s-${esc(s)}">${n} ${esc(s)}</span>`).join(" ")}</td></tr>`).join("")
    : `<tr><td colspan="3" class="empty">no agents</td></tr>`;
  const replicas = [...state.agents.values()].sort((a, b) => a.id.localeCompare(b.id)).slice(0, 200);
  $("replicas").innerHTML = replicas.length ? replicas.map((a) => {
    const s = agentState(a.state);
    return `<tr data-replica="${esc(a.id)}"><td class="mono">${esc(a.id)}</td><td><span class="pill s-${esc(s)}">${esc(s)}</span></td>`
      + `<td class="mono">${esc(a.node_id || "–")}</td><td>${esc(a.message)}</td></tr>`;
  }).join("") : `<tr><td colspan="4" class="empty">no replicas</td></tr>`;
}

// ------------------------------------------------------------------ health

let healthAt = 0;
function renderHealth() {
  const h = state.health;
  if (!h) return;
  const overall = $("overall");
  overall.textContent = h.status;
  overall.className = `pill s-${h.status}`;
  $("version").textContent = h.version;
  $("uptime").textContent = duration(h.uptime_seconds + (Date.now() - healthAt) / 1000);
  $("components").innerHTML = Object.entries(h.components || {}).map(([name, c]) => {
    const extra = Object.entries(c).filter(([k]) => k !== "status").slice(0, 4).map(([k, v]) => `${esc(k)} ${esc(typeof v === "object" ? JSON.stringify(v) : v)}`).join(", ");
    return `<div class="component"><b>${esc(name)}</b><span class="pill s-${esc(c.status)}">${esc(c.status)}</span><span class="extra">${extra}</span></div>`;
  }).join("");
  $("implementation").innerHTML = Object.entries(h.implementation || {}).map(([k, v]) =>
    `<div class="component" data-impl="${esc(k)}"><b>${esc(k)}</b>${esc(v === "c" ? "compiled (c)" : v === "py" ? "pure Python (py)" : v)}</div>`).join("");
}

async function loadHealth() {
  try {
    state.health = await getJSON("/health/detailed");
  } catch (err) {
    // 503 still carries the detail of an unhealthy server.
    if (err.status !== 503) throw err;
  }
  healthAt = Date.now();
  mark("health");
}

// ------------------------------------------------------------------ events

function renderFeed() {
  $("feed").innerHTML = state.feed.length ? state.feed.map((e) => {
    const p = e.payload || {};
    let detail = "";
    if (e.topic === "node") detail = p.status ?? "";
    else if (e.topic === "command") detail = `${cmdState(p.state)}${p.node_id ? ` on ${p.node_id}` : ""}${p.reason ? ` – ${p.reason}` : ""}`;
    else if (e.topic === "agent") detail = `${agentState(p.state)}${p.node_id ? ` on ${p.node_id}` : ""}`;
    else if (p && typeof p === "object") detail = JSON.stringify(p);
    return `<tr data-index="${e.index}"><td class="num">${e.index}</td><td>${clock(e.time_ms)}</td><td>${esc(e.type)}</td>`
      + `<td class="mono">${esc(e.key)}</td><td>${esc(detail)}</td></tr>`;
  }).join("") : `<tr><td colspan="5" class="empty">waiting for events…</td></tr>`;
}

const RENDER = {
  nodes: renderNodes, rows: renderRows, labels: renderLabelValues, commands: renderCommands,
  rates: renderRates, agents: renderAgents, health: renderHealth, feed: renderFeed,
  index: () => { $("last-index").textContent = state.lastIndex ?? "–"; },
};

// `listed`: the lists are fresher than the event (backlog), so only feed, rates, history.
function apply(e, listed = false) {
  stats.events++;
  if (!listed) {
    if (e.topic === "node") {
      if (GONE.has(e.type)) { state.nodes.delete(e.key); state.nodeOrder = null; } else if (e.payload?.id) putNode(e.payload);
      mark("nodes", "labels");
    } else if (e.topic === "agent" && e.payload?.id) {
      state.agents.set(e.payload.id, e.payload);
      mark("agents");
    } else if (e.topic === "system") {
      loadHealth().catch((err) => showError(err.message));
    }
  }
  if (e.topic === "command" && e.payload?.id) {
    putCommand(e.payload, e);
    mark("commands", "rates");
  }
  if (!state.feedPaused) {
    state.feed.unshift(e);
    if (state.feed.length > MAX_FEED) state.feed.length = MAX_FEED;
    mark("feed");
  }
}

async function listAll(url, field, put) {
  let token = "";
  do {
    const sep = url.includes("?") ? "&" : "?";
    const page = await getJSON(`${url}${sep}limit=${PAGE}${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
    for (const item of page[field]) put(item);
    token = page.next_page_token;
  } while (token);
}

// Everything the page shows, as of event index `at` (the stream's cursor at hello).
async function relist(at, oldest) {
  stats.relists++;
  state.nodes.clear(); state.nodeOrder = null; state.agents.clear();
  state.commands.clear(); state.history.clear(); state.failures = []; state.feed = []; state.rates = [];
  await Promise.all([
    loadHealth(),
    listAll("/api/v1/nodes", "nodes", putNode).then(() => {
      $("usage-at").textContent = `usage as of ${clock(Date.now())}`;
    }),
    listAll("/api/v1/agents", "agents", (a) => state.agents.set(a.id, a)),
    (async () => {
      let after = Math.max(oldest - 1, at - BACKLOG, 0);
      while (after < at) {
        const page = await getJSON(`/api/v1/events?after_index=${after}&limit=${PAGE}`);
        for (const e of page.events) if (e.index <= at) apply(e, true);
        if (page.next_after_index <= after) break;
        after = page.next_after_index;
      }
    })(),
  ]);
  mark("nodes", "labels", "agents", "commands", "rates", "feed");
}

// One server-sent-events connection read with fetch; resolves when it ends.
async function follow(after, onHello) {
  const params = new URLSearchParams();
  if (after !== null) params.set("after_index", String(after));
  const res = await fetch(`/api/v1/events/stream?${params}`, { headers: { Accept: "text/event-stream" }, cache: "no-store" });
  if (!res.ok) {
    const body = await res.json().catch(() => null);
    const err = new Error(`event stream: ${res.status} ${body?.error?.message ?? res.statusText}`);
    err.status = res.status;
    throw err;
  }
  stats.connects++;
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let ended = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return ended;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let type = "message", id = null;
      const data = [];
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") type = val;
        else if (field === "id") id = Number(val);
        else if (field === "data") data.push(val);
      }
      if (!data.length) continue;
      const payload = JSON.parse(data.join("\n"));
      if (type === "hello") {
        await onHello(payload);
      } else if (type === "events") {
        for (const e of payload) apply(e);
      } else if (type === "reset" || type === "error") {
        ended = { type, ...payload };
        showError(payload.message);
      }
      if (id !== null) setIndex(id);
    }
  }
}

function setIndex(index) {
  state.lastIndex = stats.lastIndex = index;
  mark("index");
}

async function run() {
  let delay = 500;
  for (;;) {
    const stream = $("stream");
    try {
      const ended = await follow(state.lastIndex, async (hello) => {
        stats.live = true;
        stream.textContent = "live";
        stream.className = "pill s-live";
        showError("");
        delay = 500;
        // Resumed where we were: nothing to list again. Otherwise list as of the cursor;
        // the stream holds everything after it (read once the lists are in).
        if (state.lastIndex === null || hello.after_index !== state.lastIndex) {
          await relist(hello.after_index, hello.oldest_index);
        }
      });
      if (ended?.type === "reset") state.lastIndex = null; // what we missed is gone: re-list
    } catch (err) {
      if (err.status === 410) state.lastIndex = null;
      showError(err.message);
    }
    stats.live = false;
    stream.textContent = "reconnecting";
    stream.className = "pill s-reconnecting";
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 5000);
  }
}

// ------------------------------------------------------------------ wiring

for (const id of ["status-filter", "label-filter", "text-filter"]) {
  $(id).addEventListener("input", () => { $("nodes-scroller").scrollTop = 0; mark("nodes"); });
}
$("nodes-scroller").addEventListener("scroll", () => mark("rows"), { passive: true });
for (const id of ["commands", "failures"]) {
  $(id).addEventListener("click", (ev) => {
    const row = ev.target.closest("tr[data-command-id]");
    if (row) selectCommand(row.dataset.commandId);
  });
}
$("lifecycle-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const id = $("lifecycle-id").value.trim();
  if (id) selectCommand(id);
});
// Usage travels in heartbeats, which are not events: re-read it when asked, never on a timer.
$("refresh-nodes").addEventListener("click", async () => {
  try {
    await listAll("/api/v1/nodes", "nodes", putNode);
    $("usage-at").textContent = `usage as of ${clock(Date.now())}`;
    mark("nodes", "labels");
  } catch (err) {
    showError(err.message);
  }
});
$("feed-pause").addEventListener("click", () => {
  state.feedPaused = !state.feedPaused;
  $("feed-pause").textContent = state.feedPaused ? "resume" : "pause";
});
// Local clock only (no request): ages, uptime and the rate window move on between events.
setInterval(() => mark("rows", "rates", "health"), 1000);

run();
