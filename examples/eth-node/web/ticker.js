// The chain ticker: new heads and USDC transfers as the node sends them,
// through the broker. The broker keeps the last blocks and logs
// ([[history]] in broker.local.toml): the page starts with them, and after
// a lost connection the client resumes where it was, so the list has no
// gap; a `resync` (the broker could not replay) is shown and the lists are
// reloaded from history.
//
//   ?broker=ws://127.0.0.1:8765/ws   the broker (default: that one)

const params = new URLSearchParams(location.search);
const brokerUrl = params.get("broker") || "ws://127.0.0.1:8765/ws";
const USDC = "0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48";
const KEEP = 20;

const script = new URL("/client.js", brokerUrl.replace(/^ws/, "http"));
const { connect } = await import(script.href);

const $ = (id) => document.getElementById(id);
// What the page shows, kept for the tests too.
const state = (window.ticker = { blocks: [], logs: [], reconnects: 0, resyncs: 0, ready: false });

const hex = (h) => (typeof h === "string" ? BigInt(h) : 0n);
const short = (h) => `${h.slice(0, 10)}…${h.slice(-6)}`;
const address = (topic) => `0x${topic.slice(-40)}`;

function event(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("events").append(li);
}

function row(cells, i) {
  const tr = document.createElement("tr");
  if (i === 0) tr.className = "fresh"; // the newest
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = c;
    tr.append(td);
  }
  return tr;
}

function render() {
  $("blocks").tBodies[0].replaceChildren(
    ...state.blocks.slice(-KEEP).reverse().map((b, i) => row([
      Number(hex(b.number)),
      short(b.hash),
      Number(hex(b.gasUsed)).toLocaleString(),
      `${(Number(hex(b.baseFeePerGas)) / 1e9).toFixed(1)} gwei`,
      new Date(Number(hex(b.timestamp)) * 1000).toLocaleTimeString(),
    ], i)),
  );
  $("logs").tBodies[0].replaceChildren(
    ...state.logs.slice(-KEEP).reverse().map((l, i) => row([
      Number(hex(l.blockNumber)),
      short(address(l.topics[1])),
      short(address(l.topics[2])),
      `${(Number(hex(l.data)) / 1e6).toLocaleString()} USDC`,
    ], i)),
  );
  const last = state.blocks[state.blocks.length - 1];
  $("head").textContent = last ? Number(hex(last.number)) : "–";
  $("reconnects").textContent = state.reconnects;
  $("resyncs").textContent = state.resyncs;
}

const client = await connect(brokerUrl);
window.client = client;
const status = $("status");
const live = () => {
  status.textContent = "live";
  status.className = "pill live";
};
live();
event(`connected to ${brokerUrl}`);
client.on("disconnected", ({ code, reason }) => {
  status.textContent = "reconnecting…";
  status.className = "pill down";
  event(`connection lost (${code} ${reason}); reconnecting`);
});
client.on("connected", ({ attempts }) => {
  if (!attempts) return;
  state.reconnects += 1;
  live();
  event("reconnected: resuming from the last block seen");
  render();
});

function follow(topic, list, limit) {
  return client.subscribe(topic, { history: limit }, async (item) => {
    if (item.type === "message") {
      list.push(item.data);
      if (list.length > 200) list.shift();
    } else if (item.type === "resync") {
      state.resyncs += 1;
      event(`${topic}: messages may be missing (${item.reason}); reloading from history`);
      const page = await client.history(topic, { limit });
      list.length = 0;
      list.push(...page.messages.map((m) => m.data));
    }
    render();
  });
}

await follow("eth.blocks", state.blocks, KEEP);
await follow(`eth.logs.${USDC}`, state.logs, KEEP);
state.ready = true;
render();
