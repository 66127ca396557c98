// Soak generator: keeps `n` subscribers connected to our broker for
// `duration_s` seconds, with churn, and prints ONE JSON line with what it saw
// (diagnostics go to stderr). bench/soak.py runs it and watches the broker.
//
//   node bench/gen/soak.mjs '{"port":8765,"n":10000,"duration_s":600}'
//
// Each of the `n` slots runs connections one after another, for the whole
// run: connect (at most `connect_concurrency` handshakes in flight), subscribe
// (its shared topic, exactly or by wildcard, plus a topic of its own that
// nobody publishes to, so the routing table sees a new pattern with every
// connection), wait for the acks, live for a lifetime drawn uniformly from
// [life_min_s, life_max_s], leave, start again. The first `slow_fraction` of
// the slots are SLOW: they also subscribe to `soak.hot` (large messages at
// `hot_rate`/s) and then stop reading their socket, so the kernel's buffers
// and then the broker's queue for them fill up, and the broker's policies
// act on them. A slow connection lives at most `slow_life_max_s` (from half
// that, or life_min_s if lower): the broker closes a client that answers no
// ping for ping_interval + ping_timeout (40 s by default), and a client that
// does not read cannot see that it was closed. Leaving is varied: readers unsubscribe
// their own topic first (`unsub_fraction`), then close with the closing
// handshake or drop the TCP connection (`abrupt_fraction`); slow ones close
// or drop at random (they no longer read, so a close is never answered).
//
// One publisher publishes open loop: `rate` messages/s round-robin over the
// `topics` shared topics (`payload` bytes) and `hot_rate`/s on soak.hot
// (`hot_payload` bytes). One probe connection sends a protocol ping every
// second: its round trips show whether the broker kept answering.
//
// Failures reported (ok: false): a connection refused or failed, an ack that
// never came, an `err` reply, a reading subscriber closed by the broker, the
// publisher or the probe lost. Only loopback targets are accepted.
//
// Protocols: `broker` (JSON) and `broker-msgpack` (no unsubscribing: the
// adapters of protocols.mjs have no unsub).

import { performance } from 'node:perf_hooks';
import { wsConnect } from './ws.mjs';
import { protocols } from './protocols.mjs';

const cfg = {
  protocol: 'broker',
  host: '127.0.0.1',
  port: 0,
  path: null, // default: the protocol's
  tls: false,
  n: 10000, // subscribers kept connected
  duration_s: 600,
  life_min_s: 60,
  life_max_s: 240,
  slow_life_max_s: 35,
  slow_fraction: 0.1,
  topics: 100, // shared topics soak.<k>.m
  wildcard_fraction: 0.1, // readers subscribing soak.<k>.* instead of the topic
  rate: 100, // publishes/s over the shared topics
  payload: 256,
  hot_rate: 10, // publishes/s on soak.hot (the slow subscribers' topic)
  hot_payload: 8192,
  unsub_fraction: 0.2,
  abrupt_fraction: 0.3,
  connect_concurrency: 64,
  connect_timeout_s: 15,
  ack_timeout_s: 15,
  seed: 1,
  deadline_s: 0, // 0: computed
  ...JSON.parse(process.argv[2] || '{}'),
};

const proto = protocols[cfg.protocol];
if (!proto || !cfg.protocol.startsWith('broker')) fatal(`soak: protocol must be broker or broker-msgpack, not ${cfg.protocol}`);
if (!/^127\.|^::1$|^localhost$/.test(cfg.host)) fatal(`refusing a non-loopback target: ${cfg.host}`);
const PATH = cfg.path ?? proto.path;
const CAN_UNSUB = cfg.protocol === 'broker';
const N_SLOW = Math.round(cfg.n * cfg.slow_fraction);
const SLOW_MAX = Math.min(cfg.slow_life_max_s, cfg.life_max_s);
const SLOW_LIFE = [Math.min(cfg.life_min_s, SLOW_MAX / 2), SLOW_MAX];

const log = (...a) => console.error('[soak]', ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const round = (x, d = 2) => (x == null || !Number.isFinite(x) ? null : Math.round(x * 10 ** d) / 10 ** d);

// A small deterministic PRNG (mulberry32), so two runs make the same choices.
let seed = cfg.seed >>> 0;
function rand() {
  seed = (seed + 0x6d2b79f5) >>> 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}

function fatal(msg) {
  console.error(msg);
  process.stdout.write(JSON.stringify({ ok: false, error: msg }) + '\n');
  process.exit(2);
}

// ------------------------------------------------------------ counters
const s = {
  opened: 0, // connections that completed the handshake and their acks
  reader_lives: 0,
  slow_lives: 0,
  silent_readers: 0, // readers that lived >= 5 message periods and got nothing
  deliveries: 0,
  dropped_notices: 0, // readers only (the slow ones never read theirs)
  unsubs: 0,
  closed_handshake: 0, // left with the closing handshake
  close_waits: 0, // ...of which the broker did not close TCP within 2 s (readers)
  dropped_tcp: 0, // left by dropping the TCP connection
  connect_failed: 0, // TCP or handshake failed (refusals included)
  ack_timeouts: 0,
  protocol_errors: 0,
  unexpected_closes: 0, // a reading subscriber closed by the broker
  published: 0,
  hot_published: 0,
  publish_skipped: 0,
};
const closeCodes = {};
const firstErrors = [];
function recordError(text) {
  if (firstErrors.length < 8) firstErrors.push(text);
}
let fatalError = null;

// ------------------------------------------------------------ connections
let running = true;
let stopWaiters = [];
function untilStopped(ms) {
  // resolves after `ms`, or at once when the run ends
  if (!running) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      stopWaiters = stopWaiters.filter((f) => f !== done);
      resolve();
    }
    stopWaiters.push(done);
  });
}

// at most `connect_concurrency` handshakes in flight
let inFlight = 0;
const waiting = [];
async function acquire() {
  if (inFlight < cfg.connect_concurrency) {
    inFlight++;
    return;
  }
  await new Promise((resolve) => waiting.push(resolve));
}
function release() {
  const next = waiting.shift();
  if (next) next();
  else inFlight--;
}

const live = new Set();

function sinkFor(c) {
  return {
    msg: () => {
      c.got++;
      if (c.role !== 'slow') s.deliveries++;
    },
    ack: () => {
      c.acks++;
      if (c.ackWaiter !== null && c.acks >= c.ackWaiter.n) {
        const w = c.ackWaiter;
        c.ackWaiter = null;
        clearTimeout(w.timer);
        w.resolve();
      }
    },
    dropped: () => {
      if (c.role !== 'slow') s.dropped_notices++;
    },
    error: (text) => {
      s.protocol_errors++;
      recordError(`${c.role}: err reply: ${text}`);
    },
  };
}

function waitAcks(c, n, timeoutMs = cfg.ack_timeout_s * 1000) {
  if (c.acks >= n) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      c.ackWaiter = null;
      reject(new Error(`no ack within ${timeoutMs} ms`));
    }, timeoutMs);
    c.ackWaiter = { n, resolve, timer };
  });
}

async function open(role) {
  await acquire();
  let c;
  try {
    c = await wsConnect({
      host: cfg.host,
      port: cfg.port,
      path: PATH,
      subprotocol: proto.subprotocol,
      timeoutMs: cfg.connect_timeout_s * 1000,
      useTls: !!cfg.tls,
    });
  } finally {
    release();
  }
  Object.assign(c, { role, acks: 0, wanted: 0, ackWaiter: null, got: 0, leaving: false });
  c.onmessage = proto.reader(c, sinkFor(c));
  c.onclose = (code) => {
    live.delete(c);
    if (c.leaving || !running) return;
    closeCodes[code] = (closeCodes[code] || 0) + 1;
    if (role === 'reader') {
      s.unexpected_closes++;
      recordError(`a reader was closed by the broker (${code})`);
    } else if (role === 'pub' || role === 'probe') {
      fatalError = `the ${role} connection was closed (${code})`;
    }
  };
  live.add(c);
  return c;
}

function subscribe(c, topic) {
  proto.subscribe(c, topic);
  c.wanted++;
}

function unsubscribe(c, topic) {
  c.p.id = (c.p.id || 0) + 1; // the adapter's id counter (protocols.mjs)
  c.text(Buffer.from(`{"op":"unsub","id":${c.p.id},"topic":"${topic}"}`));
  c.wanted++;
}

let serial = 0;

// One slot: connections one after another until the run ends.
async function slot(i) {
  const slow = i < N_SLOW;
  // spread the first connections' lifetimes, so churn starts at once
  let first = true;
  while (running) {
    const id = serial++;
    let c;
    try {
      c = await open(slow ? 'slow' : 'reader');
    } catch (err) {
      if (!running) return;
      s.connect_failed++;
      recordError(`connect: ${err.message}`);
      await untilStopped(500);
      continue;
    }
    const k = Math.floor(rand() * cfg.topics);
    const own = `soak.c${id}`;
    const shared = !slow && rand() < cfg.wildcard_fraction ? `soak.${k}.*` : `soak.${k}.m`;
    subscribe(c, shared);
    subscribe(c, own);
    if (slow) subscribe(c, 'soak.hot');
    try {
      await waitAcks(c, c.wanted);
    } catch (err) {
      if (running) {
        s.ack_timeouts++;
        recordError(`subscribe: ${err.message}`);
      }
      c.leaving = true;
      c.destroy();
      continue;
    }
    s.opened++;
    if (slow) c.pause(); // from now on it never reads
    const [lo, hi] = slow ? SLOW_LIFE : [cfg.life_min_s, cfg.life_max_s];
    let life = lo + rand() * (hi - lo);
    if (first) life = rand() * hi;
    first = false;
    const born = performance.now();
    await untilStopped(life * 1000);
    if (!running) return; // the rest are dropped together at the end
    const lived = (performance.now() - born) / 1000;
    if (slow) {
      s.slow_lives++;
    } else {
      s.reader_lives++;
      if (c.got === 0 && lived >= (5 * cfg.topics) / cfg.rate) s.silent_readers++;
    }
    if (c.closed) continue; // closed by the broker (a slow one: ping timeout)
    if (!slow && CAN_UNSUB && rand() < cfg.unsub_fraction) {
      unsubscribe(c, own);
      try {
        await waitAcks(c, c.wanted);
        s.unsubs++;
      } catch (err) {
        if (running) {
          s.ack_timeouts++;
          recordError(`unsub: ${err.message}`);
        }
      }
    }
    c.leaving = true;
    if (rand() < (slow ? 0.5 : cfg.abrupt_fraction)) {
      c.destroy();
      s.dropped_tcp++;
    } else {
      const t0 = performance.now();
      await c.close(2000);
      s.closed_handshake++;
      if (!slow && performance.now() - t0 >= 1990) s.close_waits++;
    }
  }
}

// ------------------------------------------------------------ publisher
async function publisher(pub) {
  const payload = Buffer.alloc(cfg.payload, 0x78);
  const hot = Buffer.alloc(cfg.hot_payload, 0x79);
  const start = performance.now();
  let due = 0;
  let hotDue = 0;
  let k = 0;
  while (running && fatalError === null) {
    const t = (performance.now() - start) / 1000;
    const want = Math.floor(t * cfg.rate);
    const hotWant = Math.floor(t * cfg.hot_rate);
    // never more than 8 MiB unsent in the publisher's socket
    const backed = () => pub.buffered > 8 << 20;
    for (; due < want; due++) {
      if (backed()) {
        s.publish_skipped++;
        continue;
      }
      proto.publish(pub, `soak.${k}.m`, payload);
      k = (k + 1) % cfg.topics;
      s.published++;
    }
    for (; hotDue < hotWant; hotDue++) {
      if (backed()) {
        s.publish_skipped++;
        continue;
      }
      proto.publish(pub, 'soak.hot', hot);
      s.hot_published++;
    }
    await sleep(10);
  }
}

// ------------------------------------------------------------ probe
const rtts = [];
async function probe(c) {
  while (running && fatalError === null) {
    const t0 = performance.now();
    proto.ping(c);
    c.wanted++;
    try {
      // a slow answer is a figure (the round trips are reported); none for
      // a minute means the broker stopped serving
      await waitAcks(c, c.wanted, 60000);
      rtts.push(performance.now() - t0);
    } catch {
      if (running) fatalError = 'the probe got no pong within 60 s';
      return;
    }
    await untilStopped(1000);
  }
}

function pct(sorted, p) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] : null;
}

// ------------------------------------------------------------ run
const deadlineS = cfg.deadline_s || cfg.duration_s + 120 + cfg.n / 100;
setTimeout(() => {
  process.stdout.write(JSON.stringify({ ok: false, error: `hard deadline of ${Math.round(deadlineS)} s exceeded`, ...s }) + '\n');
  process.exit(3);
}, deadlineS * 1000).unref();

const t0 = performance.now();
const cpu0 = process.cpuUsage();
let result;
try {
  const pub = await open('pub');
  const probeConn = await open('probe');
  const tasks = [publisher(pub), probe(probeConn)];
  for (let i = 0; i < cfg.n; i++) tasks.push(slot(i));
  const end = t0 + cfg.duration_s * 1000;
  while (performance.now() < end && fatalError === null) await sleep(Math.min(500, end - performance.now()));
  running = false;
  for (const f of [...stopWaiters]) f();
  const elapsed = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  // slots still handshaking finish within their timeouts; then drop everything
  await Promise.race([Promise.all(tasks), sleep((cfg.connect_timeout_s + cfg.ack_timeout_s + 5) * 1000)]);
  const open_at_end = live.size;
  for (const c of live) {
    c.leaving = true;
    c.destroy();
  }
  const sorted = rtts.slice().sort((a, b) => a - b);
  const failures = [];
  if (fatalError) failures.push(fatalError);
  if (s.connect_failed) failures.push(`${s.connect_failed} connections failed`);
  if (s.ack_timeouts) failures.push(`${s.ack_timeouts} acks never came`);
  if (s.protocol_errors) failures.push(`${s.protocol_errors} err replies`);
  if (s.unexpected_closes) failures.push(`${s.unexpected_closes} readers closed by the broker`);
  if (s.deliveries === 0) failures.push('no message delivered');
  result = {
    ok: failures.length === 0,
    ...(failures.length ? { error: failures.join('; ') } : {}),
    n: cfg.n,
    slow: N_SLOW,
    duration_s: round(elapsed, 1),
    ...s,
    deliveries_per_s: Math.round(s.deliveries / elapsed),
    connections_per_s: round(s.opened / elapsed, 1),
    open_at_end,
    close_codes: closeCodes,
    ping_rtt_ms: { n: sorted.length, p50: round(pct(sorted, 50)), p99: round(pct(sorted, 99)), max: round(sorted.at(-1)) },
    gen_cpu: round((cpu.user + cpu.system) / 1e6 / elapsed),
    first_errors: firstErrors,
    config: cfg,
  };
} catch (err) {
  log('failed:', err.message);
  result = { ok: false, error: err.message, ...s, first_errors: firstErrors };
}
process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(result.ok ? 0 : 1));
