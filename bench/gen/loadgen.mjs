// Load generator: runs ONE scenario against ONE broker, then prints ONE JSON
// line with the results on stdout (diagnostics go to stderr).
//
//   node bench/gen/loadgen.mjs '{"scenario":"fanout","protocol":"nats","port":4223,"n":100}'
//
// Scenarios (each bounded by its durations and by a hard deadline):
//   fanout   1 publisher -> n subscribers on one topic; closed loop: at most
//            `inflight` deliveries outstanding                -> deliveries/s
//   topics   n subscribers, one topic each; the publisher goes round-robin;
//            closed loop                                       -> deliveries/s
//   latency  n subscribers on one topic, open loop at `rate` publishes/s;
//            latency = receive time - send time in the payload -> p50/p99/max
//   idle     n connections, each subscribed to its own topic, then idle
//            -> broker RSS growth per connection, connect rate
//   slow     n reading subscribers + 1 more; a control phase in which all
//            read, then one stops reading; closed loop on the readers, or
//            open loop at `slow_rate` publishes/s -> the readers' rate and
//            its steadiness in both phases, the broker's extra RSS, and what
//            happened to the slow one
//   connect  open + handshake + one protocol round trip + close, as fast as
//            possible with bounded concurrency            -> connections/s
//   recovery (trio-broker with a history rule only) n subscribers of one
//            topic disconnect, `missed` messages are published, then all n
//            reconnect at once and resume with `since`  -> time until every
//            subscriber has every missed message, replayed deliveries/s,
//            the broker's RSS before, at peak and after; gaps, duplicates
//            and resumes not recovered are counted (all must be 0)
//   stream   n subscribers and no publisher, against the calibration server
//            (trivial.mjs --mode stream)         -> the generator's ceiling
//   publish  (trio-broker JSON only) n publishers, each with `window` acked
//            publishes in flight, round-robin over `topics` topics, no
//            subscriber                 -> acked publishes/s and the ack
//            latency (send -> ok) p50/p99/max of the measured window
//
// `pub_port` (default: `port`) sends the publisher elsewhere: a publisher on
// one broker and the subscribers on another (bench/cluster.py).
//
// Only loopback targets are accepted.

import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import { wsConnect } from './ws.mjs';
import { protocols } from './protocols.mjs';

const cfg = {
  scenario: 'fanout',
  protocol: 'broker',
  host: '127.0.0.1',
  port: 0,
  path: null, // default: the protocol's
  subprotocol: undefined, // default: the protocol's
  n: 100,
  warmup_s: 2,
  duration_s: 8,
  inflight: 10000, // closed loop: deliveries outstanding at most
  rate: 100, // latency: publishes per second
  payload: 100, // bytes
  broker_pid: 0,
  clk_tck: 100,
  connect_concurrency: 64,
  connect_timeout_s: 15,
  barrier_timeout_s: 45,
  settle_s: 2, // idle: wait before the "after" RSS sample
  slow_drain_s: 10, // slow: how long the slow subscriber may read at the end
  control_s: 8, // slow: the phase before, with every subscriber reading
  slow_rate: 0, // slow: publishes/s (open loop); 0: closed loop on `inflight`
  missed: 1000, // recovery: messages published while the subscribers are away
  pub_port: 0, // the publisher's port (0: `port`)
  broker_pids: [], // more broker processes: broker_cpu is their sum with broker_pid's
  aux_pids: [], // other server-side processes (Redis...): their CPU as aux_cpu
  window: 16, // publish: acked publishes in flight per publisher
  topics: 100, // publish: topics the publishers go round
  deadline_s: 0, // 0: computed from the durations
  ...JSON.parse(process.argv[2] || '{}'),
};

const proto = protocols[cfg.protocol];
if (!proto) fatal(`unknown protocol ${cfg.protocol}`);
if (!/^127\.|^::1$|^localhost$/.test(cfg.host)) fatal(`refusing a non-loopback target: ${cfg.host}`);
const PATH = cfg.path ?? proto.path;
const SUBPROTOCOL = cfg.subprotocol === undefined ? proto.subprotocol : cfg.subprotocol;

const log = (...a) => console.error(`[loadgen ${cfg.scenario}/${cfg.protocol}]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const round = (x, d = 2) => (x == null || !Number.isFinite(x) ? null : Math.round(x * 10 ** d) / 10 ** d);
const nowUs = () => Math.round(performance.now() * 1000);

// ------------------------------------------------------------ result + exit
const allConns = new Set();
let reported = false;
function report(obj) {
  if (reported) return;
  reported = true;
  const line = JSON.stringify({ scenario: cfg.scenario, protocol: cfg.protocol, n: cfg.n, ...obj });
  for (const c of allConns) c.destroy();
  process.stdout.write(line + '\n', () => process.exit(obj.ok ? 0 : 1));
}
function fatal(msg) {
  console.error(msg);
  process.stdout.write(JSON.stringify({ ok: false, error: msg }) + '\n'); // synchronous for pipes and files
  process.exit(2);
}

const deadlineS =
  cfg.deadline_s ||
  cfg.warmup_s + cfg.control_s + cfg.duration_s + cfg.barrier_timeout_s + cfg.settle_s + cfg.slow_drain_s + 30 + cfg.n / 200;
setTimeout(() => {
  report({ ok: false, error: `hard deadline of ${Math.round(deadlineS)} s exceeded` });
  setTimeout(() => process.exit(3), 1000).unref();
}, deadlineS * 1000).unref();

// ------------------------------------------------------------ broker probes
function brokerRssKb() {
  if (!cfg.broker_pid) return null;
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${cfg.broker_pid}/status`, 'latin1'));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}
function cpuSeconds(pids) {
  let total = 0;
  for (const pid of pids) {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
      // fields after "(comm)": state is field 3, utime 14 and stime 15
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      total += (Number(f[11]) + Number(f[12])) / cfg.clk_tck;
    } catch {
      return null;
    }
  }
  return total;
}
function brokerCpuSeconds() {
  if (!cfg.broker_pid) return null;
  return cpuSeconds([cfg.broker_pid, ...cfg.broker_pids]);
}
function cpuMark() {
  const u = process.cpuUsage();
  const aux = cfg.aux_pids.length ? cpuSeconds(cfg.aux_pids) : null;
  return { t: performance.now(), broker: brokerCpuSeconds(), aux, gen: (u.user + u.system) / 1e6 };
}
// cores used by the broker and by this process between two marks
function cpuBetween(a, b) {
  const secs = (b.t - a.t) / 1000;
  const out = {
    broker_cpu: a.broker == null || b.broker == null ? null : round((b.broker - a.broker) / secs),
    gen_cpu: round((b.gen - a.gen) / secs),
  };
  if (a.aux != null && b.aux != null) out.aux_cpu = round((b.aux - a.aux) / secs);
  return out;
}

// ------------------------------------------------------------ payload
// ASCII: "@T" + send time (16 digits, µs of this process's monotonic clock)
// + "#" + filler up to cfg.payload bytes. Rewritten in place for each publish.
const PAYLOAD = Buffer.alloc(Math.max(cfg.payload, 19), 0x78);
PAYLOAD.write('@T', 0, 'latin1');
PAYLOAD[18] = 0x23;
function stampPayload() {
  let v = nowUs();
  for (let i = 17; i >= 2; i--) {
    PAYLOAD[i] = 0x30 + (v % 10);
    v = Math.floor(v / 10);
  }
  return PAYLOAD;
}
const MARK = Buffer.from('@T');
function sentAtUs(buf, s, e) {
  const at = buf.indexOf(MARK, s);
  if (at < 0 || at + 18 > e) return -1;
  let v = 0;
  for (let i = at + 2; i < at + 18; i++) v = v * 10 + (buf[i] - 0x30);
  return v;
}

// ------------------------------------------------------------ connections
const ROLE_READER = 0;
const ROLE_SLOW = 1;
const ROLE_PUB = 2;

let onDelivery = () => {}; // (conn, buf, start, end), set per scenario
let gotBy = new Uint32Array(0); // deliveries per subscriber index
const errors = [];
let errorCount = 0;
let droppedReported = 0; // sum of the broker's "dropped" notices (our broker only)
const closes = []; // unexpected closes: {idx, role, code}
let closing = false;

function sinkFor(c) {
  return {
    msg: (buf, s, e) => onDelivery(c, buf, s, e),
    ack: (buf, s, e) => {
      if (c.onAckFrame !== null) c.onAckFrame(buf, s, e);
      c.acks++;
      if (c.ackWaiter !== null && c.acks >= c.ackWaiter.n) {
        const w = c.ackWaiter;
        c.ackWaiter = null;
        clearTimeout(w.timer);
        w.resolve();
      }
    },
    dropped: (count) => {
      droppedReported += count;
      c.dropped += count;
    },
    error: (text) => {
      if (c.onErrorFrame !== null) c.onErrorFrame(text);
      errorCount++;
      if (errors.length < 5) errors.push(text);
    },
  };
}

function waitAcks(c, n, timeoutMs = cfg.connect_timeout_s * 1000) {
  if (c.acks >= n) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      c.ackWaiter = null;
      reject(new Error(`no ack within ${timeoutMs} ms${errors.length ? ': ' + errors[0] : ''}`));
    }, timeoutMs);
    c.ackWaiter = { n, resolve, timer };
  });
}

async function open(idx, role, { waitHello = true } = {}) {
  const port = role === ROLE_PUB && cfg.pub_port ? cfg.pub_port : cfg.port;
  const c = await wsConnect({ host: cfg.host, port, path: PATH, subprotocol: SUBPROTOCOL, timeoutMs: cfg.connect_timeout_s * 1000, useTls: !!cfg.tls });
  Object.assign(c, { idx, role, acks: 0, wanted: 0, ackWaiter: null, dropped: 0, onAckFrame: null, onErrorFrame: null });
  allConns.add(c);
  c.onmessage = proto.reader(c, sinkFor(c));
  c.onclose = (code) => {
    allConns.delete(c);
    if (!closing) closes.push({ idx, role, code });
  };
  c.wanted += proto.hello(c, idx);
  if (waitHello) await waitAcks(c, c.wanted);
  return c;
}

function subscribe(c, topic) {
  proto.subscribe(c, topic);
  c.wanted++;
}

// Open `count` connections, at most `concurrency` handshakes at a time; each
// is set up by `setup(conn, i)` (may be async). Retries a failed connect twice.
async function openMany(count, role, setup, concurrency = cfg.connect_concurrency) {
  const conns = new Array(count);
  let next = 0;
  async function worker() {
    while (next < count) {
      const i = next++;
      for (let attempt = 1; ; attempt++) {
        try {
          conns[i] = await open(i, role);
          break;
        } catch (err) {
          if (attempt >= 3) throw new Error(`connection ${i}: ${err.message}`);
          await sleep(100 * attempt);
        }
      }
      if (setup) await setup(conns[i], i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  return conns;
}

// Subscribe each connection to topicOf(i) and wait for every ack.
async function subscribeAll(conns, topicOf) {
  for (let i = 0; i < conns.length; i++) subscribe(conns[i], topicOf(i));
  await Promise.all(conns.map((c) => waitAcks(c, c.wanted, cfg.barrier_timeout_s * 1000)));
}

// Subscription barrier: publish probes on the topics of the subscribers that
// have received nothing yet, until each has received one. This proves the
// routes are in place, whatever the protocol's acks mean.
async function barrier(pub, subs, topicOf) {
  const t0 = performance.now();
  for (let attempt = 0; ; attempt++) {
    const missing = [];
    for (let i = 0; i < subs.length; i++) if (gotBy[i] === 0) missing.push(i);
    if (missing.length === 0) break;
    if (performance.now() - t0 > cfg.barrier_timeout_s * 1000)
      throw new Error(`barrier: ${missing.length} of ${subs.length} subscribers never got a probe`);
    const topics = new Set(missing.map(topicOf));
    let k = 0;
    for (const t of topics) {
      proto.publish(pub, t, stampPayload());
      if (++k % 500 === 0) await sleep(2);
    }
    await sleep(Math.min(500, 30 + 20 * attempt + topics.size / 20));
  }
  const barrierS = (performance.now() - t0) / 1000;
  await quiet();
  return barrierS;
}

// Wait until nothing has been delivered for 150 ms (probes drained).
let lastDeliveryAt = 0;
async function quiet(maxMs = 3000) {
  const t0 = performance.now();
  while (performance.now() - lastDeliveryAt < 150 && performance.now() - t0 < maxMs) await sleep(50);
}

function stats(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function median(xs) {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

// ------------------------------------------------------------ closed loop
// Shared by fanout, topics and slow: the publisher keeps at most
// cfg.inflight deliveries to the readers outstanding. A broker may drop
// messages: after 250 ms without any delivery the outstanding ones are
// written off (counted in `lost`) so that the loop goes on.
const loop = {
  on: false,
  received: 0, // deliveries to readers
  expected: 0,
  published: 0,
  lost: 0,
  perPublish: 1,
  topic: () => 't0',
  pub: null,
  scheduled: false,
  lastReceived: 0,
  lastProgressAt: 0,
  timer: null,
};

function pump() {
  loop.scheduled = false;
  if (!loop.on) return;
  const pub = loop.pub;
  let budget = 2000;
  while (loop.expected - loop.received + loop.perPublish <= cfg.inflight || loop.expected === loop.received) {
    if (budget-- === 0 || pub.buffered > 1 << 20) break;
    proto.publish(pub, loop.topic(), stampPayload());
    loop.published++;
    loop.expected += loop.perPublish;
  }
}

function readerDelivered() {
  loop.received++;
  if (loop.on && !loop.scheduled && loop.expected - loop.received <= cfg.inflight / 2) {
    loop.scheduled = true;
    setImmediate(pump);
  }
}

function startLoop(pub, perPublish, topic) {
  Object.assign(loop, { on: true, received: 0, expected: 0, published: 0, lost: 0, perPublish, topic, pub });
  loop.lastReceived = 0;
  loop.lastProgressAt = performance.now();
  loop.timer = setInterval(() => {
    const t = performance.now();
    if (loop.received !== loop.lastReceived) {
      loop.lastReceived = loop.received;
      loop.lastProgressAt = t;
    } else if (loop.expected > loop.received && t - loop.lastProgressAt > 250) {
      loop.lost += loop.expected - loop.received;
      loop.expected = loop.received;
      loop.lastProgressAt = t;
    }
    pump();
  }, 5);
  pump();
}

async function stopLoop(drainMs = 2000) {
  loop.on = false;
  clearInterval(loop.timer);
  const t0 = performance.now();
  let last = -1;
  while (loop.received < loop.expected && performance.now() - t0 < drainMs) {
    if (loop.received === last && performance.now() - lastDeliveryAt > 300) break;
    last = loop.received;
    await sleep(50);
  }
}

// per-second increments of `get()` until stop()
// (a last partial second counts if it is at least 0.9 s long)
function perSecond(get) {
  const series = [];
  let prev = get();
  let at = performance.now();
  const timer = setInterval(() => {
    const v = get();
    series.push(v - prev);
    prev = v;
    at = performance.now();
  }, 1000);
  const stop = () => {
    clearInterval(timer);
    const dt = performance.now() - at;
    if (dt >= 900) series.push(Math.round(((get() - prev) * 1000) / dt));
  };
  return { series, stop };
}

// ------------------------------------------------------------ scenarios
async function runThroughput(ownTopics) {
  const n = cfg.n;
  gotBy = new Uint32Array(n);
  const topicOf = ownTopics ? (i) => `t${i}` : () => 't0';
  onDelivery = (c, buf, s, e) => {
    gotBy[c.idx]++;
    lastDeliveryAt = performance.now();
    readerDelivered();
  };
  const t0 = performance.now();
  const subs = await openMany(n, ROLE_READER);
  await subscribeAll(subs, topicOf);
  const pub = await open(n, ROLE_PUB);
  const setupS = (performance.now() - t0) / 1000;
  const barrierS = await barrier(pub, subs, topicOf);
  let rr = 0;
  startLoop(pub, ownTopics ? 1 : n, ownTopics ? () => `t${(rr = (rr + 1) % n)}` : () => 't0');
  await sleep(cfg.warmup_s * 1000);
  const r0 = loop.received;
  const p0 = loop.published;
  const l0 = loop.lost;
  const rss0 = brokerRssKb();
  const c0 = cpuMark();
  const ps = perSecond(() => loop.received);
  await sleep(cfg.duration_s * 1000);
  const c1 = cpuMark();
  ps.stop();
  const r1 = loop.received;
  const p1 = loop.published;
  const l1 = loop.lost;
  const rss1 = brokerRssKb();
  await stopLoop();
  const secs = (c1.t - c0.t) / 1000;
  return {
    ok: true,
    deliveries_per_s: Math.round((r1 - r0) / secs),
    publishes_per_s: Math.round((p1 - p0) / secs),
    per_second: ps.series,
    lost_in_window: l1 - l0,
    lost_total: loop.lost + Math.max(0, loop.expected - loop.received),
    broker_rss_kb: [rss0, rss1],
    ...cpuBetween(c0, c1),
    setup_s: round(setupS),
    barrier_s: round(barrierS),
    unexpected_closes: closes.length,
  };
}

async function runLatency() {
  const n = cfg.n;
  gotBy = new Uint32Array(n);
  let measuring = false;
  let fromUs = Infinity;
  let toUs = Infinity;
  const cap = Math.ceil(cfg.rate * (cfg.duration_s + 1) * n * 1.1) + 1000;
  const lat = new Float64Array(cap);
  let k = 0;
  onDelivery = (c, buf, s, e) => {
    gotBy[c.idx]++;
    lastDeliveryAt = performance.now();
    if (measuring) {
      const sent = sentAtUs(buf, s, e);
      if (sent >= fromUs && sent < toUs && k < cap) lat[k++] = (nowUs() - sent) / 1000;
    }
  };
  const subs = await openMany(n, ROLE_READER);
  await subscribeAll(subs, () => 't0');
  const pub = await open(n, ROLE_PUB);
  await barrier(pub, subs, () => 't0');
  measuring = true;
  // open loop: publish on schedule whatever the deliveries
  const start = performance.now();
  const measureFrom = start + cfg.warmup_s * 1000;
  const end = measureFrom + cfg.duration_s * 1000;
  let published = 0;
  let sentInWindow = 0;
  let c0 = null;
  let c1 = null;
  await new Promise((resolve) => {
    const tick = () => {
      const t = performance.now();
      if (c0 === null && t >= measureFrom) {
        c0 = cpuMark();
        fromUs = Math.round(t * 1000);
      }
      if (t >= end) {
        c1 = cpuMark();
        toUs = Math.round(t * 1000);
        return resolve();
      }
      const due = Math.floor(((t - start) / 1000) * cfg.rate) + 1;
      while (published < due) {
        proto.publish(pub, 't0', stampPayload());
        published++;
        if (c0 !== null) sentInWindow++;
      }
      const next = start + (published * 1000) / cfg.rate;
      setTimeout(tick, Math.max(0, Math.min(next, end) - performance.now()));
    };
    tick();
  });
  // the window's last messages may still be on their way (bounded wait)
  const want = sentInWindow * n;
  const t0 = performance.now();
  while (k < want && performance.now() - t0 < 3000) await sleep(20);
  measuring = false;
  const sorted = lat.subarray(0, k).sort();
  return {
    ok: true,
    rate: cfg.rate,
    offered_deliveries_per_s: cfg.rate * n,
    samples: k,
    delivered_fraction: want ? round(k / want, 4) : null,
    p50_ms: round(stats(sorted, 50)),
    p90_ms: round(stats(sorted, 90)),
    p99_ms: round(stats(sorted, 99)),
    max_ms: round(k ? sorted[k - 1] : null),
    ...cpuBetween(c0, c1),
    unexpected_closes: closes.length,
  };
}

async function runIdle() {
  const n = cfg.n;
  gotBy = new Uint32Array(n);
  onDelivery = (c) => {
    gotBy[c.idx]++;
    lastDeliveryAt = performance.now();
  };
  const rssBefore = brokerRssKb();
  const c0 = cpuMark();
  // each connection: handshake, protocol hello, subscribe, wait for the ack
  const subs = await openMany(n, ROLE_READER, async (c, i) => {
    subscribe(c, `t${i}`);
    await waitAcks(c, c.wanted);
  });
  const c1 = cpuMark();
  const connectS = (c1.t - c0.t) / 1000;
  const pub = await open(n, ROLE_PUB);
  const barrierS = await barrier(pub, subs, (i) => `t${i}`);
  await sleep(cfg.settle_s * 1000);
  const rssAfter = brokerRssKb();
  // are they all still there? one protocol ping each
  let alive = 0;
  await Promise.all(
    subs.map(async (c) => {
      if (c.closed) return;
      proto.ping(c);
      c.wanted++;
      try {
        await waitAcks(c, c.wanted, 10000);
        alive++;
      } catch {}
    }),
  );
  return {
    ok: true,
    connections: n,
    rss_before_kb: rssBefore,
    rss_after_kb: rssAfter,
    bytes_per_conn: rssBefore != null && rssAfter != null ? Math.round(((rssAfter - rssBefore) * 1024) / n) : null,
    connect_s: round(connectS),
    connects_per_s: Math.round(n / connectS),
    ...cpuBetween(c0, c1),
    barrier_s: round(barrierS),
    alive_after: alive,
    unexpected_closes: closes.length,
  };
}

// Publish to `topic` at `rate` messages/s whatever the deliveries (open
// loop), counting each publish in `loop` as `perPublish` deliveries owed.
// A publisher whose socket holds more than 64 MiB unsent skips publishes
// (counted) rather than grow without bound.
function startPaced(pub, rate, perPublish, topic) {
  Object.assign(loop, { on: false, received: 0, expected: 0, published: 0, lost: 0, perPublish, topic, pub });
  const paced = { skipped: 0, timer: null, on: true };
  const start = performance.now();
  let due0 = 0;
  const tick = () => {
    if (!paced.on) return;
    const due = Math.floor(((performance.now() - start) / 1000) * rate) + 1;
    while (due0 < due) {
      due0++;
      if (pub.buffered > 64 << 20) {
        paced.skipped++;
        continue;
      }
      proto.publish(pub, topic(), stampPayload());
      loop.published++;
      loop.expected += perPublish;
    }
    paced.timer = setTimeout(tick, Math.max(0, start + (due0 * 1000) / rate - performance.now()));
  };
  tick();
  paced.stop = () => {
    paced.on = false;
    clearTimeout(paced.timer);
  };
  return paced;
}

// Per-subscriber deliveries in each full second, for subscribers 0..n-1.
function perSecondEach(n) {
  const series = Array.from({ length: n }, () => []);
  let prev = gotBy.slice(0, n);
  const timer = setInterval(() => {
    const now = gotBy.slice(0, n);
    for (let i = 0; i < n; i++) series[i].push(now[i] - prev[i]);
    prev = now;
  }, 1000);
  return { series, stop: () => clearInterval(timer) };
}

// One measured phase of the slow scenario: the readers' rate, its
// steadiness (overall and per reader) and the broker's RSS.
async function slowPhase(n, seconds) {
  const rssStart = brokerRssKb();
  let rssMax = rssStart;
  const sampleRss = () => {
    const r = brokerRssKb();
    if (r != null && (rssMax == null || r > rssMax)) rssMax = r;
  };
  const rssTimer = setInterval(sampleRss, 250);
  const r0 = loop.received;
  const c0 = cpuMark();
  const ps = perSecond(() => loop.received);
  const each = perSecondEach(n);
  await sleep(seconds * 1000);
  const c1 = cpuMark();
  ps.stop();
  each.stop();
  clearInterval(rssTimer);
  sampleRss();
  const r1 = loop.received;
  const med = median(ps.series);
  const worst = ps.series.length ? Math.min(...ps.series) : null;
  // each reader's worst second over its own median second; the worst reader
  let eachWorst = null;
  for (const xs of each.series) {
    const m = median(xs);
    if (!m) continue;
    const v = Math.min(...xs) / m;
    if (eachWorst === null || v < eachWorst) eachWorst = v;
  }
  return {
    deliveries_per_s: Math.round((r1 - r0) / ((c1.t - c0.t) / 1000)),
    per_second: ps.series,
    worst_second: worst,
    median_second: med,
    worst_over_median: med ? round(worst / med, 3) : null,
    each_worst_over_median: round(eachWorst, 3),
    rss_start_kb: rssStart,
    rss_max_kb: rssMax,
    ...cpuBetween(c0, c1),
  };
}

// Two phases on one broker, same load: first every subscriber reads (the
// control), then one stops reading. What the slow one costs the others is
// the difference between the phases; the control also shows how steady the
// readers are on this machine with nobody slow.
async function runSlow() {
  const n = cfg.n; // readers; index n is the slow subscriber
  gotBy = new Uint32Array(n + 1);
  let slowGot = 0;
  onDelivery = (c) => {
    gotBy[c.idx]++;
    lastDeliveryAt = performance.now();
    if (c.role === ROLE_SLOW) slowGot++;
    else readerDelivered();
  };
  const readers = await openMany(n, ROLE_READER);
  const slow = await open(n, ROLE_SLOW);
  const subs = [...readers, slow];
  await subscribeAll(subs, () => 't0');
  const pub = await open(n + 1, ROLE_PUB);
  await barrier(pub, subs, () => 't0');
  const paced = cfg.slow_rate > 0 ? startPaced(pub, cfg.slow_rate, n, () => 't0') : null;
  if (!paced) startLoop(pub, n, () => 't0');
  await sleep(cfg.warmup_s * 1000);
  const control = await slowPhase(n, cfg.control_s);
  slow.pause(); // from now on it never reads: kernel buffers fill, then the broker's
  const slowBase = slowGot;
  const droppedBase = slow.dropped;
  const p0 = loop.published;
  const run = await slowPhase(n, cfg.duration_s);
  const published = loop.published - p0;
  if (paced) paced.stop();
  await stopLoop();
  const slowGone = slow.closed;
  const rssEnd = brokerRssKb();
  const slowBeforeResume = slowGot - slowBase;
  // let the slow subscriber read what is left for it (bounded)
  slow.resume();
  const drain = [];
  const t0 = performance.now();
  let last = -1;
  while (!slow.closed && performance.now() - t0 < cfg.slow_drain_s * 1000) {
    await sleep(500);
    const got = slowGot - slowBase;
    drain.push(got);
    if (got === last && performance.now() - lastDeliveryAt > 1000) break;
    last = got;
  }
  const received = slowGot - slowBase;
  const ratio = (a, b) => (a != null && b ? round(a / b, 3) : null);
  return {
    ok: true,
    readers: n,
    payload_bytes: cfg.payload,
    loop: paced ? 'open' : 'closed',
    offered_deliveries_per_s: paced ? cfg.slow_rate * n : null,
    publishes_skipped: paced ? paced.skipped : 0,
    // with the slow subscriber (the measured window)
    readers_deliveries_per_s: run.deliveries_per_s,
    readers_per_second: run.per_second,
    readers_worst_second: run.worst_second,
    readers_median_second: run.median_second,
    readers_worst_over_median: run.worst_over_median,
    readers_each_worst_over_median: run.each_worst_over_median,
    // the control phase before it, everyone reading
    control_deliveries_per_s: control.deliveries_per_s,
    control_per_second: control.per_second,
    control_worst_over_median: control.worst_over_median,
    control_each_worst_over_median: control.each_worst_over_median,
    readers_vs_control: ratio(run.median_second, control.median_second),
    readers_lost: loop.lost + Math.max(0, loop.expected - loop.received),
    published,
    slow_offered_mib: round((published * cfg.payload) / 1048576, 1),
    slow_received_before_resume: slowBeforeResume,
    slow_received: received,
    slow_received_fraction: published ? round(received / published, 4) : null,
    slow_dropped_reported: slow.dropped - droppedBase,
    slow_drain_trace: drain,
    slow_disconnected: slow.closed,
    slow_disconnected_during_run: slowGone,
    slow_close_code: slow.closed ? slow.closeCode : null,
    other_unexpected_closes: closes.filter((x) => x.role !== ROLE_SLOW).length,
    // RSS: the peak with the slow subscriber over the peak without it (same
    // load, so transient buffers count in both), and the raw figures
    rss_growth_kb: run.rss_max_kb != null && control.rss_max_kb != null ? run.rss_max_kb - control.rss_max_kb : null,
    rss_growth_in_window_kb: run.rss_max_kb != null && run.rss_start_kb != null ? run.rss_max_kb - run.rss_start_kb : null,
    control_rss_growth_kb:
      control.rss_max_kb != null && control.rss_start_kb != null ? control.rss_max_kb - control.rss_start_kb : null,
    rss_start_kb: control.rss_start_kb,
    control_rss_max_kb: control.rss_max_kb,
    rss_max_kb: run.rss_max_kb,
    rss_end_kb: rssEnd,
    broker_cpu: run.broker_cpu,
    gen_cpu: run.gen_cpu,
    control_broker_cpu: control.broker_cpu,
  };
}

async function runConnect() {
  // One protocol round trip proves the connection is usable: the hello's ack
  // (NATS CONNECT+PING -> PONG, MQTT CONNECT -> CONNACK) or, for a protocol
  // without a hello reply, a ping. Then the closing handshake.
  let done = 0;
  let failed = 0;
  let firstError = null;
  let measuring = false;
  let inWindow = 0;
  const setupMs = []; // connect until usable, for connections completed in the window
  const concurrency = cfg.connect_concurrency;
  const end = performance.now() + (cfg.warmup_s + cfg.duration_s) * 1000;
  async function worker(w) {
    let i = w;
    while (performance.now() < end) {
      try {
        const t0 = performance.now();
        const c = await open(i, ROLE_READER);
        if (c.wanted === 0) {
          proto.ping(c);
          c.wanted++;
          await waitAcks(c, c.wanted);
        }
        const usable = performance.now() - t0;
        closing = true; // our own closes are not "unexpected"
        await c.close();
        allConns.delete(c);
        done++;
        if (measuring) {
          inWindow++;
          setupMs.push(usable);
        }
      } catch (err) {
        failed++;
        if (firstError === null) firstError = err.message;
        await sleep(50);
      }
      i += concurrency;
    }
  }
  const workers = Array.from({ length: concurrency }, (_, w) => worker(w));
  await sleep(cfg.warmup_s * 1000);
  measuring = true;
  const c0 = cpuMark();
  const ps = perSecond(() => done);
  await sleep(cfg.duration_s * 1000);
  measuring = false;
  const c1 = cpuMark();
  ps.stop();
  await Promise.all(workers);
  setupMs.sort((a, b) => a - b);
  return {
    ok: done > 0,
    ...(done > 0 ? {} : { error: `no connection completed: ${firstError}` }),
    connections_per_s: Math.round(inWindow / ((c1.t - c0.t) / 1000)),
    setup_p50_ms: round(stats(setupMs, 50)),
    setup_p99_ms: round(stats(setupMs, 99)),
    per_second: ps.series,
    completed: done,
    failed,
    first_error: firstError,
    concurrency,
    ...cpuBetween(c0, c1),
  };
}

// ------------------------------------------------------------ recovery
const SEQ_KEY = Buffer.from('"seq":');
function frameSeq(buf, s, e) {
  const at = buf.subarray(s, e).indexOf(SEQ_KEY);
  return at < 0 ? -1 : readNumber(buf, s + at + SEQ_KEY.length, e);
}
function readNumber(buf, at, end) {
  let v = 0;
  while (at < end && buf[at] >= 0x30 && buf[at] <= 0x39) v = v * 10 + (buf[at++] - 0x30);
  return v;
}

async function runRecovery() {
  if (cfg.protocol !== 'broker') throw new Error('recovery: trio-broker JSON protocol only');
  const n = cfg.n;
  const missed = cfg.missed;
  gotBy = new Uint32Array(n);
  // the position of each subscriber: the last seq it received
  const last = new Float64Array(n);
  let gaps = 0;
  let duplicates = 0;
  let caughtUp = 0;
  let target = Infinity;
  let onCaughtUp = () => {};
  onDelivery = (c, buf, s, e) => {
    gotBy[c.idx]++;
    lastDeliveryAt = performance.now();
    if (c.role !== ROLE_READER) return;
    const seq = frameSeq(buf, s, e);
    const prev = last[c.idx];
    if (seq <= prev) duplicates++;
    else if (prev > 0 && seq !== prev + 1) gaps++;
    last[c.idx] = Math.max(prev, seq);
    if (seq === target) {
      caughtUp++;
      if (caughtUp === n) onCaughtUp();
    }
  };
  let epoch = null;
  const EPOCH_RE = /"epoch":"([^"]+)"/;
  const subs = await openMany(n, ROLE_READER);
  for (const c of subs) {
    c.onAckFrame = (buf, s, e) => {
      const m = EPOCH_RE.exec(buf.toString('utf8', s, e));
      if (m) epoch = m[1];
      c.onAckFrame = null;
    };
  }
  await subscribeAll(subs, () => 't0');
  if (epoch === null) throw new Error('recovery: the sub ok carried no epoch (no [[history]] rule on t0?)');
  const pub = await open(n, ROLE_PUB);
  await barrier(pub, subs, () => 't0');
  // every subscriber drops its connection (no close handshake)
  for (const c of subs) {
    c.onclose = () => allConns.delete(c);
    c.destroy();
  }
  await sleep(1000); // the broker notices the EOFs and forgets the subscriptions
  // the messages they miss; a ping after them: the broker has handled them
  const start = Math.max(...last);
  for (let i = 0; i < missed; i++) {
    proto.publish(pub, 't0', stampPayload());
    if (pub.buffered > 1 << 20) await sleep(1);
  }
  proto.ping(pub);
  pub.wanted++;
  await waitAcks(pub, pub.wanted, cfg.barrier_timeout_s * 1000);
  target = start + missed;
  const rssBefore = brokerRssKb();
  let rssPeak = rssBefore;
  const sampler = setInterval(() => {
    const v = brokerRssKb();
    if (v != null && (rssPeak == null || v > rssPeak)) rssPeak = v;
  }, 20);
  let recovered = 0;
  let notRecovered = 0;
  const done = new Promise((resolve) => (onCaughtUp = resolve));
  const c0 = cpuMark();
  // all reconnect at once (bounded concurrency of handshakes) and resume
  const again = await openMany(
    n,
    ROLE_READER,
    (c, i) => {
      c.idx = i;
      c.onAckFrame = (buf, s, e) => {
        const text = buf.toString('utf8', s, e);
        if (text.includes('"recovered":true')) recovered++;
        else notRecovered++;
        c.onAckFrame = null;
      };
      c.text(Buffer.from(`{"op":"sub","id":1,"topic":"t0","since":{"epoch":"${epoch}","seq":${last[i]}}}`));
      c.wanted++;
    },
    cfg.connect_concurrency,
  );
  const connected = cpuMark();
  await Promise.race([done, sleep(cfg.barrier_timeout_s * 1000)]);
  const c1 = cpuMark();
  clearInterval(sampler);
  await sleep(cfg.settle_s * 1000);
  const rssAfter = brokerRssKb();
  const replayS = (c1.t - c0.t) / 1000;
  return {
    ok: caughtUp === n && gaps === 0 && duplicates === 0 && notRecovered === 0,
    ...(caughtUp === n ? {} : { error: `${n - caughtUp} of ${n} subscribers did not catch up` }),
    subscribers: n,
    missed,
    recover_s: round(replayS, 3),
    connect_s: round((connected.t - c0.t) / 1000, 3),
    replayed_per_s: Math.round((n * missed) / replayS),
    recovered,
    not_recovered: notRecovered,
    gaps,
    duplicates,
    rss_before_kb: rssBefore,
    rss_peak_kb: rssPeak,
    rss_after_kb: rssAfter,
    ...cpuBetween(c0, c1),
    open_after: again.filter((c) => !c.closed).length,
    unexpected_closes: closes.length,
  };
}

async function runStream() {
  const n = cfg.n;
  gotBy = new Uint32Array(n);
  let received = 0;
  onDelivery = () => {
    received++;
  };
  const subs = await openMany(n, ROLE_READER, null);
  for (let i = 0; i < n; i++) proto.subscribe(subs[i], 't0'); // the server starts streaming
  await sleep(cfg.warmup_s * 1000);
  const r0 = received;
  const c0 = cpuMark();
  await sleep(cfg.duration_s * 1000);
  const c1 = cpuMark();
  const r1 = received;
  return { ok: true, deliveries_per_s: Math.round((r1 - r0) / ((c1.t - c0.t) / 1000)), ...cpuBetween(c0, c1) };
}

async function runPublish() {
  if (cfg.protocol !== 'broker') throw new Error('publish: trio-broker JSON protocol only');
  const n = cfg.n;
  gotBy = new Uint32Array(n);
  const pubs = await openMany(n, ROLE_PUB);
  const HEAD = (id, topic) => Buffer.from(`{"op":"pub","id":${id},"topic":"${topic}","data":"`);
  const TAIL = Buffer.from('"}');
  let on = true;
  let measuring = false;
  let acked = 0;
  let refused = 0;
  const latencies = [];
  let next = 0;
  function send(c) {
    const topic = `p${next++ % cfg.topics}`;
    c.sent.push(performance.now());
    c.text(HEAD(c.sent.length, topic), stampPayload(), TAIL);
  }
  function answered(c, ok) {
    const t0 = c.sent.shift();
    if (measuring) {
      if (ok) {
        acked++;
        latencies.push(performance.now() - t0);
      } else refused++;
    }
    if (on) send(c);
  }
  for (const c of pubs) {
    c.sent = [];
    c.onAckFrame = () => answered(c, true);
    c.onErrorFrame = () => answered(c, false);
    for (let i = 0; i < cfg.window; i++) send(c);
  }
  await sleep(cfg.warmup_s * 1000);
  measuring = true;
  const c0 = cpuMark();
  const ps = perSecond(() => acked);
  await sleep(cfg.duration_s * 1000);
  const c1 = cpuMark();
  ps.stop();
  measuring = false;
  on = false;
  await sleep(500);
  latencies.sort((a, b) => a - b);
  const secs = (c1.t - c0.t) / 1000;
  return {
    ok: acked > 0,
    publishers: n,
    window: cfg.window,
    acked_per_s: Math.round(acked / secs),
    refused,
    per_second: ps.series,
    ack_p50_ms: round(stats(latencies, 50), 3),
    ack_p99_ms: round(stats(latencies, 99), 3),
    ack_max_ms: round(latencies[latencies.length - 1], 3),
    ...cpuBetween(c0, c1),
    unexpected_closes: closes.length,
  };
}

const SCENARIOS = {
  fanout: () => runThroughput(false),
  topics: () => runThroughput(true),
  latency: runLatency,
  idle: runIdle,
  slow: runSlow,
  connect: runConnect,
  recovery: runRecovery,
  stream: runStream,
  publish: runPublish,
};

if (cfg.scenario === 'stream') {
  // the calibration server answers nothing: do not wait for hello acks
  proto.hello = ((hello) => (c, idx) => (hello(c, idx), 0))(proto.hello);
}

try {
  const run = SCENARIOS[cfg.scenario];
  if (!run) throw new Error(`unknown scenario ${cfg.scenario}`);
  const res = await run();
  closing = true;
  if (errorCount) Object.assign(res, { protocol_errors: errorCount, first_errors: errors });
  if (droppedReported) res.dropped_reported = droppedReported;
  report(res);
} catch (err) {
  log('failed:', err.message);
  report({ ok: false, error: err.message, protocol_errors: errorCount, first_errors: errors });
}
