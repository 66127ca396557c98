// The admin console (GET / on the admin listener): polls /api/stats every
// POLL seconds and shows the broker's figures live, with a chart of the
// last minutes; "Try it" subscribes and publishes through the JavaScript
// client. With [admin] token set, the page asks for the token once, keeps
// it in sessionStorage (this tab only) and sends it as a header.

import { connect } from "/client.js";

const POLL = 2; // seconds between two reads of /api/stats
const KEEP = 150; // samples on the chart: five minutes
const TOKEN_KEY = "trio-broker-admin-token";

const $ = (id) => document.getElementById(id);
const samples = []; // {t, publishes, deliveries, dropped, connections}
let previous = null; // the last stats read, for the rates
let timer = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function format(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return n.toFixed(digits);
}

function bytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
  return n.toFixed(0) + " B";
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}

function rows(table, data) {
  const body = $(table).tBodies[0];
  body.replaceChildren(
    ...data.map((cells) => {
      const tr = document.createElement("tr");
      for (const cell of cells) {
        const td = document.createElement("td");
        td.textContent = cell;
        if (typeof cell === "number") td.className = "num";
        tr.append(td);
      }
      return tr;
    }),
  );
}

async function poll() {
  timer = null;
  const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
  try {
    const response = await fetch("/api/stats", { headers, cache: "no-store" });
    if (response.status === 401) {
      showLogin(token() ? "that token was refused" : "");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    show(await response.json());
    $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("status").textContent = `cannot read /api/stats: ${error.message}`;
  }
  timer = setTimeout(poll, POLL * 1000);
}

function showLogin(message) {
  $("dashboard").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("status").textContent = "sign in";
  $("token").focus();
}

function show(stats) {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("signout").hidden = !token();
  $("version").textContent = `v${stats.version}`;
  $("ready").textContent = stats.ready ? "ready" : stats.not_ready_reasons.join(", ") || "not ready";
  $("ready").className = "badge " + (stats.ready ? "ok" : "bad");
  $("url").textContent = stats.url || stats.listeners.join(" ");
  $("uptime").textContent = `up ${duration(stats.uptime_seconds)}`;
  $("connections").textContent = format(stats.connections);
  $("subscriptions").textContent = format(stats.subscriptions);
  $("lag").textContent = `${(stats.loop_lag_seconds * 1000).toFixed(1)} ms`;

  const now = performance.now() / 1000;
  if (previous !== null) {
    const dt = Math.max(0.001, now - previous.t);
    const rate = (key) => Math.max(0, (stats[key] - previous.stats[key]) / dt);
    const sample = {
      t: now,
      publishes: rate("messages_in"),
      deliveries: rate("messages_out"),
      dropped: rate("messages_dropped"),
      connections: stats.connections,
    };
    samples.push(sample);
    if (samples.length > KEEP) samples.shift();
    $("publish-rate").textContent = format(sample.publishes, 1);
    $("delivery-rate").textContent = format(sample.deliveries, 1);
    $("drop-rate").textContent = format(sample.dropped, 1);
    $("byte-rate").textContent = `${bytes(rate("bytes_in"))} / ${bytes(rate("bytes_out"))}`;
    draw();
  }
  previous = { t: now, stats };

  const busiest = stats.busiest_topics || { topics: [], window_seconds: 0 };
  rows("busiest", busiest.topics.map((b) => [b.topic, b.per_second]));
  $("busiest-window").textContent = busiest.window_seconds ? `(last ${busiest.window_seconds.toFixed(0)} s, sampled)` : "";
  rows("drops", Object.entries(stats.overflows_by_policy || {}).map(([policy, n]) => [policy, n]));
  $("dropped-total").textContent = format(stats.messages_dropped);
  rows(
    "sources",
    stats.sources.length
      ? stats.sources.map((s) => [s.name, s.state, s.restarts, s.last_error || ""])
      : [["(none)", "", "", ""]],
  );
  const h = stats.history || {};
  const p = stats.presence || {};
  const recoveries = h.recoveries || {};
  rows("history", [
    ["stored messages", h.messages ?? 0],
    ["stored bytes", bytes(h.bytes ?? 0)],
    ["topics tracked / with history", `${h.topics ?? 0} / ${h.stored_topics ?? 0}`],
    ["evicted", h.evicted ?? 0],
    ["resumes recovered / not", `${recoveries.recovered ?? 0} / ${recoveries.not_recovered ?? 0}`],
    ["presence topics / members", `${p.topics ?? 0} / ${p.members ?? 0}`],
    ["presence events", p.events ?? 0],
  ]);
  const rejected = Object.entries(stats.rejected || {});
  rows("rejected", rejected.length ? rejected.map(([why, n]) => [why, n]) : [["(none)", ""]]);
  $("try-url").textContent = tryUrl(stats);
}

// The chart: four series over the last KEEP samples, each scaled to its own maximum.
function draw() {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 24;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#263140";
  ctx.fillStyle = "#7d8a9a";
  ctx.font = "11px system-ui, sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = pad + ((h - 2 * pad) * i) / 4;
    ctx.beginPath();
    ctx.moveTo(pad, y);
    ctx.lineTo(w - pad, y);
    ctx.stroke();
  }
  const css = getComputedStyle(document.documentElement);
  const series = [
    ["publishes", css.getPropertyValue("--pub")],
    ["deliveries", css.getPropertyValue("--del")],
    ["dropped", css.getPropertyValue("--drop")],
    ["connections", css.getPropertyValue("--conn")],
  ];
  const peak = Math.max(1, ...samples.map((s) => Math.max(s.publishes, s.deliveries, s.dropped)));
  const peakConnections = Math.max(1, ...samples.map((s) => s.connections));
  ctx.fillText(`${format(peak, 1)}/s`, pad + 2, pad - 6);
  ctx.fillText(`${peakConnections} conn.`, w - pad - 60, pad - 6);
  const x = (i) => pad + ((w - 2 * pad) * (i + KEEP - samples.length)) / (KEEP - 1);
  for (const [key, color] of series) {
    const top = key === "connections" ? peakConnections : peak;
    ctx.strokeStyle = color.trim();
    ctx.lineWidth = 2;
    ctx.beginPath();
    samples.forEach((s, i) => {
      const y = h - pad - ((h - 2 * pad) * s[key]) / top;
      if (i === 0) ctx.moveTo(x(i), y);
      else ctx.lineTo(x(i), y);
    });
    ctx.stroke();
  }
}

// -- try it ------------------------------------------------------------------

let client = null;

function tryUrl(stats) {
  if (!stats.url) return "";
  const url = new URL(stats.url);
  // A wildcard listener: connect to the host this page came from.
  if (["0.0.0.0", "[::]"].includes(url.hostname)) url.hostname = location.hostname;
  return url.href;
}

function log(line) {
  const pre = $("try-log");
  pre.textContent += `${new Date().toLocaleTimeString()} ${line}\n`;
  pre.scrollTop = pre.scrollHeight;
}

async function tryClient() {
  if (client && !client.closed) return client;
  const url = $("try-url").textContent;
  const brokerToken = $("try-token").value || null;
  client = await connect(url, { token: brokerToken });
  client.on("disconnected", ({ code, reason }) => log(`disconnected ${code} ${reason}`));
  client.on("connected", ({ attempts }) => attempts && log("reconnected"));
  client.on("error", (error) => log(`error: ${error.message}`));
  log(`connected to ${url}`);
  return client;
}

async function trySubscribe() {
  try {
    const c = await tryClient();
    const pattern = $("try-pattern").value;
    await c.subscribe(pattern, (item) => {
      if (item.type === "message") log(`${item.topic} #${item.seq} ${JSON.stringify(item.data)}`);
      else log(`${item.type} ${JSON.stringify(item)}`);
    });
    log(`subscribed to ${pattern}`);
  } catch (error) {
    log(`subscribe failed: ${error.message}`);
  }
}

async function tryPublish() {
  try {
    const data = JSON.parse($("try-data").value);
    const c = await tryClient();
    const seq = await c.publish($("try-topic").value, data);
    log(`published as seq ${seq}`);
  } catch (error) {
    log(`publish failed: ${error.message}`);
  }
}

// -- wiring --------------------------------------------------------------------

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token").value = "";
  if (timer !== null) clearTimeout(timer);
  poll();
});
$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer !== null) clearTimeout(timer);
  poll();
});
$("try-subscribe").addEventListener("click", trySubscribe);
$("try-publish").addEventListener("click", tryPublish);
poll();
