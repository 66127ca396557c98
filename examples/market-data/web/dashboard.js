// The market dashboard: an order book rebuilt from the broker's snapshot
// plus deltas, a trades tape and a candle chart, for one symbol.
//
//   ?broker=ws://127.0.0.1:8765/ws   the broker (default: that one)
//   ?symbol=ETH-USD                  the market (default BTC-USD)
//   ?slow=MS                         spend MS milliseconds on each message
//                                    (a slow tab: the broker drops, and the
//                                    book, conflated per level, stays right)
//
// What a slow tab misses needs no reload under broker.toml's queue rules:
// a book level's dropped change was replaced by a newer one still to come
// (conflate), and drop-oldest keeps the newest trades and candles, the ones
// shown. The header counts the drops.
//
// The client comes from the broker itself (GET /client.js).

const params = new URLSearchParams(location.search);
const brokerUrl = params.get("broker") || "ws://127.0.0.1:8765/ws";
const symbol = params.get("symbol") || "BTC-USD";
const slow = Number(params.get("slow") || 0);
const SYMBOLS = ["BTC-USD", "ETH-USD", "SOL-USD"];
const TAPE = 30;
const CANDLES = 60;

const script = new URL("/client.js", brokerUrl.replace(/^ws/, "http"));
const { connect } = await import(script.href);

const $ = (id) => document.getElementById(id);
// What the page shows, kept for the tests too.
const state = (window.dashboard = {
  symbol,
  bids: new Map(), // price -> size
  asks: new Map(),
  trades: [], // newest first
  candles: [], // oldest first
  last: null,
  dropped: 0,
  resyncs: 0,
  ready: false,
});

for (const s of SYMBOLS) {
  const a = document.createElement("a");
  a.textContent = s;
  a.href = `?${new URLSearchParams({ ...Object.fromEntries(params), symbol: s })}`;
  if (s === symbol) a.className = "active";
  $("symbols").append(a);
}

function busy() {
  if (!slow) return;
  const until = performance.now() + slow;
  while (performance.now() < until);
}

// -- rendering, at most once per frame ----------------------------------------

let scheduled = false;
function render() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    drawBook();
    drawTape();
    drawCandles();
    $("last").textContent = state.last === null ? "–" : state.last.toFixed(2);
    $("dropped").textContent = state.dropped;
    $("dropped").parentElement.classList.toggle("warn", state.dropped > 0);
    $("resyncs").textContent = state.resyncs;
  });
}

function cells(tr, values) {
  for (const v of values) {
    const td = document.createElement("td");
    td.textContent = v;
    tr.append(td);
  }
  return tr;
}

/** The book around the last trade: asks above it, bids below, 12 a side. */
function visibleBook() {
  const mid = state.last ?? 0;
  const asks = [...state.asks].filter(([p]) => !state.last || p >= mid).sort((a, b) => a[0] - b[0]).slice(0, 12);
  const bids = [...state.bids].filter(([p]) => !state.last || p <= mid).sort((a, b) => b[0] - a[0]).slice(0, 12);
  return { asks, bids };
}

function drawBook() {
  const { asks, bids } = visibleBook();
  const biggest = Math.max(1e-9, ...asks.map((l) => l[1]), ...bids.map((l) => l[1]));
  const row = ([price, size]) => {
    const tr = cells(document.createElement("tr"), [price.toFixed(2), size.toFixed(4)]);
    tr.lastChild.style.backgroundSize = `${(100 * size) / biggest}% 100%`;
    return tr;
  };
  $("asks").replaceChildren(...asks.slice().reverse().map(row));
  $("bids").replaceChildren(...bids.map(row));
  const spread = asks.length && bids.length ? (asks[0][0] - bids[0][0]).toFixed(2) : "–";
  $("spread").replaceChildren(cells(document.createElement("tr"), [`spread ${spread}`]));
  $("spread").firstChild.firstChild.colSpan = 2;
}

function drawTape() {
  $("tape").tBodies[0].replaceChildren(
    ...state.trades.map((t) => {
      const tr = cells(document.createElement("tr"), [
        new Date(t.ts).toLocaleTimeString(),
        t.price.toFixed(2),
        t.qty.toFixed(4),
      ]);
      tr.className = t.side;
      return tr;
    }),
  );
}

function drawCandles() {
  const canvas = $("candles");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 30;
  ctx.clearRect(0, 0, w, h);
  const candles = state.candles.slice(-CANDLES);
  $("candle-info").textContent = candles.length ? `${candles.length} × ${candles[0].interval}` : "";
  if (!candles.length) return;
  const high = Math.max(...candles.map((c) => c.high));
  const low = Math.min(...candles.map((c) => c.low));
  const y = (p) => pad + ((h - 2 * pad) * (high - p)) / Math.max(1e-9, high - low);
  const step = (w - 2 * pad) / CANDLES;
  ctx.fillStyle = "#7b8898";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(high.toFixed(2), 2, pad - 8);
  ctx.fillText(low.toFixed(2), 2, h - pad + 16);
  candles.forEach((c, i) => {
    const x = pad + i * step + step / 2;
    const color = c.close >= c.open ? "#2ebd85" : "#f6465d";
    ctx.strokeStyle = ctx.fillStyle = color;
    ctx.beginPath();
    ctx.moveTo(x, y(c.high));
    ctx.lineTo(x, y(c.low));
    ctx.stroke();
    const top = y(Math.max(c.open, c.close));
    ctx.fillRect(x - step * 0.35, top, step * 0.7, Math.max(1, y(Math.min(c.open, c.close)) - top));
  });
}

// -- the streams ------------------------------------------------------------------

const client = await connect(brokerUrl);
window.client = client;
const status = $("status");
const live = () => {
  status.textContent = "live";
  status.className = "pill live";
};
live();
client.on("connected", live);
client.on("disconnected", ({ code, reason, reconnecting }) => {
  status.textContent = reconnecting ? `reconnecting (${code} ${reason})` : `closed (${code} ${reason})`;
  status.className = "pill down";
});
client.on("dropped", ({ count }) => {
  state.dropped += count;
  render();
});
client.on("resync", () => {
  state.resyncs += 1;
  render();
});

// The book: the snapshot (every level's newest size) then each change; a
// size of 0 removes the level. After a resync the broker sends the
// snapshot again, so the book is cleared first.
await client.subscribe(`book.${symbol}`, { snapshot: true }, (item) => {
  busy();
  if (item.type === "resync") {
    state.bids.clear();
    state.asks.clear();
  } else if (item.type === "message") {
    const { side, price, qty } = item.data;
    const levels = side === "bid" ? state.bids : state.asks;
    if (qty > 0) levels.set(price, qty);
    else levels.delete(price);
  }
  render();
});

async function reload(topic, limit) {
  const page = await client.history(topic, { limit });
  return page.messages.map((m) => m.data);
}

// The tape: the last trades from history, then live ones.
await client.subscribe(`trades.${symbol}`, { history: TAPE }, async (item) => {
  busy();
  if (item.type === "message") {
    state.trades.unshift(item.data);
    state.trades.length = Math.min(state.trades.length, TAPE);
    state.last = item.data.price;
  } else if (item.type === "resync") {
    state.trades = (await reload(`trades.${symbol}`, TAPE)).reverse();
  }
  render();
});

// Candles: the last minutes from history, then each closed one.
await client.subscribe(`candles.${symbol}`, { history: CANDLES }, async (item) => {
  if (item.type === "message") {
    state.candles.push(item.data);
    if (state.candles.length > CANDLES) state.candles.shift();
  } else if (item.type === "resync") {
    state.candles = await reload(`candles.${symbol}`, CANDLES);
  }
  render();
});

state.ready = true;
render();
