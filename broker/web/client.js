// trio-broker's JavaScript client: an ES module, no build step, no dependency.
//
//     import { connect } from "http://127.0.0.1:8765/client.js";
//     const client = await connect("ws://127.0.0.1:8765/ws");
//     const sub = await client.subscribe("trades.*", {history: 10}, (item) => {
//       if (item.type === "message") console.log(item.topic, item.seq, item.data);
//       if (item.type === "resync") reload();      // messages may have been missed
//     });
//     const seq = await client.publish("trades.BTC-USD", {price: 64000.5});
//     await sub.unsubscribe();
//     await client.close();
//
// The API and the semantics are those of the Python client (broker/client/,
// docs/client.md): one WebSocket at a time, reconnected with exponential
// backoff and full jitter; every subscription resumed with `since` (its
// last position per topic, or a pattern's cursor), so that a broker keeping
// history replays what was missed with no gap and no duplicate, and a
// `resync` says when it could not; a resubscription the broker answers
// `unavailable` (its cluster backend could not take it yet) is sent again,
// with the same `since`, after a growing, jittered delay, until answered.
// docs/browser.md is the user's guide.
//
// JSON needs nothing. msgpack needs @msgpack/msgpack: pass the module as
// `connect(url, {encoding: "msgpack", msgpack})`, or load its UMD build,
// which defines `MessagePack` globally.

export const VERSION = "0.1.0";

/** Subprotocol of each encoding (docs/protocol.md, "Subprotocols"). */
export const SUBPROTOCOLS = Object.freeze({ json: "broker.v1.json", msgpack: "broker.v1.msgpack" });
/** Topics a pattern subscription keeps a position for (as broker/client/positions.py). */
export const MAX_TOPICS = 10000;
/** Largest `history` on subscribe, and `limit` of history(). */
export const MAX_HISTORY_REQUEST = 1000;
/** Close codes after which the client does not reconnect (broker/client/reconnect.py). */
export const FINAL_CLOSE_CODES = Object.freeze([1002, 1003, 1007, 1008]);
/** The reason the client gives when close() closes its connection. */
export const CLOSED_BY_CLIENT = "client closed the connection";

const MAX_TOPIC_LENGTH = 256;
const MAX_TOKENS = 16;
const TOKEN_RE = /^[A-Za-z0-9_\-:]+$/;
const TOPIC_RE = /^[A-Za-z0-9_\-:]+(\.[A-Za-z0-9_\-:]+)*$/;
const OTHER_TOPICS = ">"; // a `dropped` notice about topics no longer tracked apart
// Seconds: the closing handshake; an unsubscribe's answer.
const CLOSE_TIMEOUT = 5;
const UNSUBSCRIBE_TIMEOUT = 5;

// ---------------------------------------------------------------------------
// Errors (broker/client/errors.py)
// ---------------------------------------------------------------------------

/** Base class of the errors this module throws. */
export class ClientError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/**
 * The connection could not be established. A browser never learns why a
 * WebSocket handshake failed (a 401 looks like a network failure: close
 * 1006), so `status` is always null here; `reachable` says whether the
 * broker answered a plain HTTP request at the same address (true: it is up,
 * and refused the handshake: credentials, origin, path or limits; false: it
 * could not be reached; null: not checked).
 */
export class ConnectError extends ClientError {
  constructor(status, reason, reachable = null) {
    super(status == null ? reason : `HTTP ${status}: ${reason}`);
    this.status = status;
    this.reason = reason;
    this.reachable = reachable;
  }
}

/** The broker answered a request with `err` (`code`, `message`). */
export class ServerError extends ClientError {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.serverMessage = message;
  }
}
export class BadRequest extends ServerError {}
export class Unauthorized extends ServerError {}
export class Forbidden extends ServerError {}
export class Invalid extends ServerError {}
export class TooLarge extends ServerError {}
export class RateLimited extends ServerError {}
export class LimitExceeded extends ServerError {}
export class InternalError extends ServerError {}
/** `unavailable`: the broker's cluster backend did not answer; may be retried (a publish may or may not have gone out). */
export class Unavailable extends ServerError {}

const SERVER_ERRORS = {
  bad_request: BadRequest,
  unauthorized: Unauthorized,
  forbidden: Forbidden,
  invalid: Invalid,
  too_large: TooLarge,
  rate_limited: RateLimited,
  limit: LimitExceeded,
  internal: InternalError,
  unavailable: Unavailable,
};

/** The ServerError subclass for an `err` with `code`. */
export function serverError(code, message) {
  const Kind = SERVER_ERRORS[code] || ServerError;
  return new Kind(code, message);
}

/** The client is closed: requests and subscriptions cannot go on. */
export class Disconnected extends ClientError {
  constructor(code, reason) {
    super(code == null ? reason : `connection closed (${code}): ${reason}`);
    this.code = code;
    this.reason = reason;
  }
}

/** The connection was lost under this request; the client is reconnecting. */
export class ConnectionLost extends Disconnected {}

/** Reconnecting gave up (`maxAttempts` failed attempts in a row). */
export class ReconnectFailed extends Disconnected {
  constructor(code, reason, error, attempts) {
    super(code, reason);
    this.error = error;
    this.attempts = attempts;
    const plural = attempts === 1 ? "" : "s";
    this.message = `${this.message}; gave up reconnecting after ${attempts} attempt${plural}: ${error.message}`;
  }
}

// ---------------------------------------------------------------------------
// Topics (broker/core/topics.py)
// ---------------------------------------------------------------------------

function checkCommon(text, what) {
  if (typeof text !== "string") throw new BadRequest("bad_request", `${what} must be a string`);
  if (!text) throw new BadRequest("bad_request", `${what} is empty`);
  if (text.length > MAX_TOPIC_LENGTH) {
    throw new BadRequest("bad_request", `${what} is longer than ${MAX_TOPIC_LENGTH} characters`);
  }
}

/** Returns `topic` if it is a valid topic, else throws BadRequest. */
export function validateTopic(topic) {
  checkCommon(topic, "topic");
  if (!TOPIC_RE.test(topic)) {
    if (topic.includes("*") || topic.includes(">")) {
      throw new BadRequest("bad_request", "wildcards are only allowed in subscriptions");
    }
    throw new BadRequest(
      "bad_request",
      "topic must be dot-separated tokens of letters, digits, '_', '-' or ':'",
    );
  }
  if (topic.split(".").length > MAX_TOKENS) {
    throw new BadRequest("bad_request", `topic has more than ${MAX_TOKENS} tokens`);
  }
  return topic;
}

/** Returns `pattern` if it is a valid subscription pattern, else throws BadRequest. */
export function validatePattern(pattern) {
  checkCommon(pattern, "pattern");
  const tokens = pattern.split(".");
  if (tokens.length > MAX_TOKENS) {
    throw new BadRequest("bad_request", `pattern has more than ${MAX_TOKENS} tokens`);
  }
  tokens.forEach((token, i) => {
    if (token === "*") return;
    if (token === ">") {
      if (i !== tokens.length - 1) {
        throw new BadRequest("bad_request", "'>' is only allowed as the last token");
      }
      return;
    }
    if (!TOKEN_RE.test(token)) {
      throw new BadRequest(
        "bad_request",
        `invalid token '${token}': use letters, digits, '_', '-', ':' or a whole-token wildcard '*' / '>'`,
      );
    }
  });
  return pattern;
}

/** True if the valid `pattern` matches the valid `topic` (`*` one token, a final `>` one or more). */
export function patternMatches(pattern, topic) {
  const p = pattern.split(".");
  const t = topic.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== "*" && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

function isPattern(text) {
  return text.includes("*") || text.includes(">");
}

// ---------------------------------------------------------------------------
// Positions (broker/client/positions.py): where one subscription is in each
// topic, what to resume from, and which messages are duplicates.
// ---------------------------------------------------------------------------

function resync(topic, epoch, seq, lost, unknown, reason) {
  return { type: "resync", topic, epoch, seq, lost, unknown, reason };
}

export class Positions {
  constructor(pattern, maxTopics = MAX_TOPICS) {
    if (maxTopics < 1) throw new RangeError("maxTopics must be >= 1");
    this.pattern = pattern;
    /** A pattern's resume cursor, from its last ok. */
    this.cursor = null;
    /** The broker keeps history for it (the last ok had an epoch or a cursor). */
    this.resumable = false;
    /** Topics were forgotten since the last resume. */
    this.overflowed = false;
    this._exact = !isPattern(pattern);
    this._max = maxTopics;
    /** topic -> [epoch or null, last seq], least recently updated first. */
    this._seen = new Map();
  }

  get size() {
    return this._seen.size;
  }

  /** The [epoch or null, seq] last seen on `topic`, or undefined. */
  get(topic) {
    return this._seen.get(topic);
  }

  /** The `since` of a resubscription, or null when there is nothing to resume from. */
  since() {
    if (!this.resumable) return null;
    if (this._exact) {
      const seen = this._seen.get(this.pattern);
      if (seen === undefined || seen[0] === null) return null;
      return { epoch: seen[0], seq: seen[1] };
    }
    if (this.cursor === null) return null;
    const topics = {};
    for (const [topic, [epoch, seq]] of this._seen) {
      topics[topic] = epoch === null ? { seq } : { epoch, seq };
    }
    return { cursor: this.cursor, topics };
  }

  /** The ok of the first sub (not a resume); with `history`, that many stored messages may follow. */
  started(ok, history = null) {
    this._seen.clear();
    this.overflowed = false;
    if (this._exact) {
      this.resumable = ok.epoch != null;
      if (ok.epoch != null) {
        // Replayed messages follow the ok: they must not look like duplicates.
        this._seen.set(this.pattern, [ok.epoch, Math.max(0, (ok.seq || 0) - (history || 0))]);
      }
    } else {
      this.cursor = ok.cursor ?? null;
      this.resumable = ok.cursor != null;
    }
  }

  /** The ok of a resubscription that sent `since`: the resync to deliver, or null. */
  resumed(ok, since) {
    const overflowed = this.overflowed;
    this.overflowed = false;
    if (this._exact) return this._resumedTopic(ok, since);
    this.cursor = ok.cursor ?? null;
    this.resumable = ok.cursor != null;
    if (since === null) {
      this._seen.clear();
      return resync(this.pattern, null, null, [], false, "no_history");
    }
    const lost = ok.lost || [];
    const unknown = ok.unknown === true;
    if (ok.recovered === true && !lost.length && !unknown) {
      if (!overflowed) return null;
      return resync(this.pattern, null, null, [], false, "too_many_topics");
    }
    if (ok.recovered === true || lost.length) {
      // Every topic but the lost ones was replayed; unknown ones may have
      // been missed (the notice says so), their positions are kept.
      for (const topic of lost) this._seen.delete(topic);
    } else {
      this._seen.clear();
    }
    return resync(this.pattern, null, null, [...lost], unknown, "not_recovered");
  }

  _resumedTopic(ok, since) {
    this.resumable = ok.epoch != null;
    if (since !== null && ok.recovered === true) return null; // the missed messages follow
    this._seen.clear();
    if (ok.epoch != null) this._seen.set(this.pattern, [ok.epoch, ok.seq || 0]);
    const reason = since === null ? "no_history" : "not_recovered";
    return resync(this.pattern, ok.epoch ?? null, ok.seq ?? null, [], false, reason);
  }

  /**
   * Whether to deliver `msg`, and the resync to deliver before it when it
   * starts a new epoch: [deliver, resync or null]. A message whose seq is not
   * above the last one seen on its topic in the same epoch is a duplicate.
   * Snapshot messages are always delivered (the latest per key).
   */
  accept(msg) {
    const topic = msg.topic;
    const seen = this._seen.get(topic);
    if (msg.snapshot) {
      if (seen === undefined) {
        this._record(topic, msg.epoch, msg.seq);
      } else if ((msg.epoch === null || msg.epoch === seen[0]) && msg.seq > seen[1]) {
        this._record(topic, seen[0], msg.seq);
      }
      return [true, null];
    }
    if (seen === undefined) {
      this._record(topic, msg.epoch, msg.seq);
      return [true, null];
    }
    const [epoch, last] = seen;
    if (msg.epoch !== null && msg.epoch !== epoch) {
      this._record(topic, msg.epoch, msg.seq);
      if (epoch === null && msg.seq > last) return [true, null]; // learnt the epoch
      return [true, resync(topic, msg.epoch, msg.seq - 1, [], false, "epoch_changed")];
    }
    if (msg.seq <= last) return [false, null];
    this._record(topic, epoch, msg.seq);
    return [true, null];
  }

  _record(topic, epoch, seq) {
    const seen = this._seen;
    seen.delete(topic); // moves it to the end (most recently updated)
    seen.set(topic, [epoch, seq]);
    if (seen.size > this._max) {
      seen.delete(seen.keys().next().value);
      this.overflowed = true;
    }
  }
}

// ---------------------------------------------------------------------------
// Reconnecting (broker/client/reconnect.py)
// ---------------------------------------------------------------------------

/**
 * How the client reconnects: before attempt n (0 for the first after a
 * loss) it waits uniform(0, min(maxDelay, initialDelay * factor ** n))
 * seconds ("full jitter"), so that the clients a restarting broker dropped
 * at once do not all come back at the same instant. A resubscription the
 * broker answered `unavailable` is sent again after the same delays;
 * maxAttempts bounds both.
 */
export class Reconnect {
  constructor({
    initialDelay = 0.1,
    maxDelay = 30,
    factor = 2,
    maxAttempts = null,
    waitTimeout = 10,
  } = {}) {
    if (!(initialDelay >= 0 && initialDelay <= maxDelay)) {
      throw new RangeError("need 0 <= initialDelay <= maxDelay");
    }
    if (!(factor >= 1)) throw new RangeError("factor must be >= 1");
    if (maxAttempts !== null && !(maxAttempts >= 1)) {
      throw new RangeError("maxAttempts must be >= 1 or null");
    }
    if (!(waitTimeout >= 0)) throw new RangeError("waitTimeout must be >= 0");
    Object.assign(this, { initialDelay, maxDelay, factor, maxAttempts, waitTimeout });
    Object.freeze(this);
  }

  /** The largest delay before attempt `attempt` (0, 1, 2...), in seconds. */
  ceiling(attempt) {
    return Math.min(this.maxDelay, this.initialDelay * this.factor ** attempt);
  }

  /** Seconds to wait before attempt `attempt`: uniform in [0, ceiling(attempt)]. */
  delay(attempt, random = Math.random) {
    return random() * this.ceiling(attempt);
  }

  /** True once `failures` attempts in a row have failed. */
  givesUp(failures) {
    return this.maxAttempts !== null && failures >= this.maxAttempts;
  }
}

/** Whether a connection closed with `code` is worth reconnecting. */
export function reconnectAfterClose(code) {
  if (code == null) return true;
  return !FINAL_CLOSE_CODES.includes(code) && !(code >= 4000 && code <= 4999);
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

function deferred() {
  let resolve;
  const promise = new Promise((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

function now() {
  return performance.now() / 1000;
}

/** The claims of a JWT (its decoded payload), or null for other tokens. */
function jwtClaims(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(b64 + "===".slice((b64.length + 3) % 4)));
    return claims !== null && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** The `exp` claim of a JWT (seconds since the epoch), or null for other tokens. */
export function tokenExpiry(token) {
  const claims = jwtClaims(token);
  return claims !== null && typeof claims.exp === "number" ? claims.exp : null;
}

/**
 * Seconds until the JWT `token` expires, by the clock of its issuer (the
 * broker's, if they agree), or null for a token without `exp`. The page's
 * clock may be off by minutes: when it contradicts the token (`iat` still
 * to come: the page is behind; `exp` already past: far ahead), the token
 * is taken as just issued, its whole lifetime (`exp - iat`) left. A token
 * without `iat` that looks expired: 0.
 */
function tokenTimeLeft(token, nowSeconds = Date.now() / 1000) {
  const claims = jwtClaims(token);
  if (claims === null || typeof claims.exp !== "number") return null;
  const { exp, iat } = claims;
  const left = exp - nowSeconds;
  if (typeof iat === "number" && exp > iat && (nowSeconds < iat || left <= 0)) return exp - iat;
  return Math.max(0, left);
}

/** Automatic token refreshes are at least this many seconds apart. */
const MIN_REFRESH_INTERVAL = 1;

function checkToken(token) {
  if (typeof token !== "string" || !/^[!-~]+$/.test(token)) {
    throw new TypeError("token must be a non-empty string of printable ASCII characters");
  }
}

// JSON: NaN and infinities would silently become null; refuse them as the broker would.
function jsonReplacer(key, value) {
  if (typeof value === "number" && !Number.isFinite(value)) {
    throw new TypeError("data must be JSON-representable (NaN or infinite number)");
  }
  return value;
}

function message(m) {
  return {
    type: "message",
    topic: m.topic,
    seq: m.seq,
    data: m.data,
    key: m.key ?? null,
    epoch: m.epoch ?? null,
    snapshot: m.snapshot === true,
  };
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/** One subscribe() call: its handler and its place in the shared broker-side subscription. */
export class Subscription {
  constructor(client, held, handler, presence) {
    this.pattern = held.pattern;
    this.presence = presence;
    this._client = client;
    this._held = held;
    this._handler = handler;
    this._active = true;
  }

  /** False once unsubscribed or ended (the client closed, or a resubscription was refused). */
  get active() {
    return this._active;
  }

  /** Stop receiving; the broker is told when no other subscription of this client uses the pattern. */
  unsubscribe() {
    if (!this._active) return Promise.resolve();
    this._active = false;
    return this._client._release(this._held, this);
  }

  _deliver(item) {
    if (!this._active) return;
    try {
      this._handler(item);
    } catch (error) {
      this._client._report(error, `handler of ${this.pattern} threw`);
    }
  }

  _end(error) {
    if (!this._active) return;
    this._deliver({ type: "closed", error });
    this._active = false;
  }
}

class Connection {
  constructor(ws) {
    this.ws = ws;
    /** id -> {handler, event, done}: requests waiting for their answer. */
    this.pending = new Map();
    this.ready = false;
    this.closeInfo = null;
    this.done = deferred(); // resolved when the connection is lost
    this.lastReceived = now();
    this.checking = false;
  }
}

class Held {
  constructor(pattern, history, snapshot, presence) {
    this.pattern = pattern;
    this.history = history;
    this.snapshot = snapshot;
    this.presence = presence;
    this.positions = new Positions(pattern);
    this.blocks = []; // Subscriptions that receive its items
    this.users = 0; // subscribe() calls entered or entering
    this.conn = null; // the connection on which the broker holds it
    this.sent = null; // the connection its last sub was sent on
    this.established = false; // held once: resubscribed after a reconnect
    // A promise while a first sub is in flight, or while its resubscription
    // is retried after `unavailable`: another subscribe() of it waits.
    this.subscribing = null;
    this.settle = null; // resolves `subscribing` of a retry
    this.refused = null; // {code, message} that refused its resubscription for good
    // `dropped` notices that came while its sub awaited the ok on `sent`:
    // the broker writes notices ahead of queued frames, so those of a
    // replay that overflowed the queue precede the ok. Delivered after it.
    this.early = [];
  }
}

/** `held`'s resubscription is over: wake the subscribe() calls waiting for it. */
function settle(held) {
  const resolve = held.settle;
  if (resolve === null) return;
  held.settle = null;
  held.subscribing = null;
  resolve();
}

/**
 * A connection to the broker, kept up. Get one from `connect()`.
 *
 * Events (`client.on(name, listener)`, which returns a function that removes
 * the listener): `connected` {attempts}, `disconnected` {code, reason,
 * reconnecting}, `reconnecting` {attempt, delay, error}, `dropped` {topic,
 * count}, `resync` {topic, pattern, epoch, seq, lost, unknown, reason},
 * `error` (an Error), `closed` {code, reason, error}.
 */
export class Client {
  constructor(url, options = {}) {
    const {
      token = null,
      getToken = null,
      encoding = "json",
      msgpack = null,
      connectTimeout = 10,
      reconnect = true,
      keepalive = 30,
      pingTimeout = 10,
    } = options;
    if (!(encoding in SUBPROTOCOLS)) throw new TypeError('encoding must be "json" or "msgpack"');
    if (token !== null && getToken !== null) throw new TypeError("give token or getToken, not both");
    if (token !== null) checkToken(token);
    if (getToken !== null && typeof getToken !== "function") {
      throw new TypeError("getToken must be a function returning a token (or a promise of one)");
    }
    this.url = Client._wsUrl(url);
    this.encoding = encoding;
    this.reconnects = 0;
    this._codec = Client._codec(encoding, msgpack);
    this._token = token;
    this._getToken = getToken;
    this._connectTimeout = connectTimeout;
    this._reconnect =
      reconnect === true ? new Reconnect() : reconnect ? new Reconnect(reconnect) : null;
    this._keepalive = keepalive;
    this._pingTimeout = pingTimeout;
    this._ids = 0;
    this._conn = null;
    this._connecting = null; // the WebSocket of an attempt in progress
    this._probing = null; // the AbortController of _probe()'s request in progress
    this._up = deferred(); // resolved while a connection is ready, and once closed
    this._upSet = false;
    this._held = new Map();
    this._closeInfo = null;
    this._gaveUp = null;
    this._lost = { code: null, reason: "not connected" };
    this._closing = false;
    this._listeners = new Map();
    this._timers = new Set();
    this._wake = null; // resolves the backoff wait early (online, visible, close)
    this._refreshTimer = null;
    this._refreshedAt = null; // when the last automatic refresh began (now())
    this._offline = false;
    this._onOnline = () => this._networkChanged(true);
    this._onOffline = () => this._networkChanged(false);
    this._onVisibility = () => {
      if (globalThis.document && document.visibilityState === "visible") this._resumed();
    };
  }

  static _wsUrl(url) {
    const base = globalThis.location ? globalThis.location.href : undefined;
    const parsed = new URL(url, base);
    if (parsed.protocol === "http:") parsed.protocol = "ws:";
    else if (parsed.protocol === "https:") parsed.protocol = "wss:";
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError(`not a ws:// or wss:// URL: ${url}`);
    }
    parsed.hash = "";
    return parsed.href;
  }

  static _codec(encoding, msgpack) {
    if (encoding === "json") {
      return {
        encode: (command) => JSON.stringify(command, jsonReplacer),
        decode: (data) => {
          if (typeof data !== "string") throw new TypeError("a binary frame on the JSON subprotocol");
          return JSON.parse(data);
        },
      };
    }
    const lib = msgpack || globalThis.MessagePack;
    if (!lib || typeof lib.encode !== "function" || typeof lib.decode !== "function") {
      throw new TypeError(
        'encoding "msgpack" needs @msgpack/msgpack: pass its module as {msgpack} ' +
          "or load its UMD build (which defines MessagePack)",
      );
    }
    return {
      encode: (command) => lib.encode(command, { ignoreUndefined: true }),
      decode: (data) => {
        if (typeof data === "string") throw new TypeError("a text frame on the msgpack subprotocol");
        return lib.decode(new Uint8Array(data));
      },
    };
  }

  /** True while a connection is up and its subscriptions are active again
   * (those the broker answered `unavailable` after a reconnect may still be
   * being retried). */
  get connected() {
    return this._closeInfo === null && this._conn !== null && this._conn.ready;
  }

  /** True once the client is closed for good. */
  get closed() {
    return this._closeInfo !== null;
  }

  // -- events ------------------------------------------------------------------

  /** Call `listener` on each `event`; returns a function that removes it. */
  on(event, listener) {
    if (typeof listener !== "function") throw new TypeError("listener must be a function");
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    const set = this._listeners.get(event);
    if (set) set.delete(listener);
  }

  _emit(event, detail) {
    const set = this._listeners.get(event);
    if (!set || !set.size) return false;
    for (const listener of [...set]) {
      try {
        listener(detail);
      } catch (error) {
        console.error(`[broker] a "${event}" listener threw`, error);
      }
    }
    return true;
  }

  _report(error, context) {
    if (context && error instanceof Error && !error.context) error.context = context;
    if (!this._emit("error", error)) console.warn(`[broker] ${context || "error"}:`, error);
  }

  // -- timers (all of them, so that close() leaves none) ----------------------

  _setTimer(fn, seconds) {
    const handle = setTimeout(() => {
      this._timers.delete(handle);
      fn();
    }, Math.max(0, seconds * 1000));
    this._timers.add(handle);
    return handle;
  }

  _clearTimer(handle) {
    if (handle !== null && handle !== undefined) {
      clearTimeout(handle);
      this._timers.delete(handle);
    }
  }

  _sleep(seconds) {
    return new Promise((resolve) => this._setTimer(resolve, seconds));
  }

  // -- public API --------------------------------------------------------------

  /**
   * Publish `data` on `topic`; resolves to the message's seq (with
   * `ack: false`, to undefined once sent). While reconnecting, waits for
   * the new connection (at most `reconnect.waitTimeout` seconds).
   */
  async publish(topic, data, { key = null, ack = true } = {}) {
    if (data === undefined) throw new TypeError("data is required (null is a valid payload)");
    const command = (id) => {
      const c = { op: "pub", topic, data };
      if (id !== null) c.id = id;
      if (key !== null) c.key = key;
      return c;
    };
    if (!ack) {
      const conn = await this._readyConnection();
      this._send(conn, command(null));
      return undefined;
    }
    const answer = await this._request(command);
    return answer.seq;
  }

  /**
   * Subscribe to `pattern`; `handler(item)` gets every item (see
   * docs/browser.md): {type: "message"}, "dropped", "join", "leave",
   * "interrupted", "reconnected", "resync", and "closed" last. Resolves to
   * the Subscription once the broker has answered.
   */
  async subscribe(pattern, options, handler) {
    if (typeof options === "function" && handler === undefined) {
      handler = options;
      options = {};
    }
    const { history = null, snapshot = false, presence = false } = options || {};
    validatePattern(pattern);
    if (typeof handler !== "function") throw new TypeError("handler must be a function");
    if (history !== null && !(Number.isInteger(history) && history >= 1 && history <= MAX_HISTORY_REQUEST)) {
      throw new RangeError(`history must be from 1 to ${MAX_HISTORY_REQUEST}`);
    }
    if (this._closeInfo !== null) throw this._disconnected();
    let held = this._held.get(pattern);
    if (held === undefined) {
      held = new Held(pattern, history, Boolean(snapshot), Boolean(presence));
      this._held.set(pattern, held);
    } else if (history !== null || snapshot || (presence && !held.presence)) {
      throw new TypeError(
        `this client already subscribes to '${pattern}': its subscriptions share the options ` +
          "of the first one (history, snapshot and presence cannot be added)",
      );
    }
    const subscription = new Subscription(this, held, handler, Boolean(presence));
    held.users += 1;
    try {
      await this._hold(held, subscription);
    } catch (error) {
      subscription._active = false;
      await this._release(held, subscription);
      throw error;
    }
    return subscription;
  }

  /** Stored messages of `topic` without subscribing: {topic, epoch, seq, messages, more, recovered}. */
  async history(topic, { since = null, limit = 100 } = {}) {
    validateTopic(topic);
    if (!(Number.isInteger(limit) && limit >= 1 && limit <= MAX_HISTORY_REQUEST)) {
      throw new RangeError(`limit must be from 1 to ${MAX_HISTORY_REQUEST}`);
    }
    const position = Array.isArray(since) ? { epoch: since[0], seq: since[1] } : since;
    const answer = await this._request((id) => {
      const c = { op: "history", id, topic, limit };
      if (position !== null) c.since = { epoch: position.epoch, seq: position.seq };
      return c;
    });
    return {
      topic,
      epoch: answer.epoch ?? null,
      seq: answer.seq ?? null,
      messages: (answer.messages || []).map((m) => message({ ...m, topic: m.topic || topic })),
      more: answer.more === true,
      recovered: answer.recovered ?? null,
    };
  }

  /** Who is subscribed to `topic` (a topic with a presence rule): {count, connections, members}. */
  async presence(topic) {
    validateTopic(topic);
    const answer = await this._request((id) => ({ op: "presence", id, topic }));
    return {
      count: answer.count || 0,
      connections: answer.connections || 0,
      members: answer.members ?? null,
    };
  }

  /** The round trip of a protocol `ping`, in seconds. */
  async ping() {
    const conn = await this._readyConnection();
    const start = now();
    await this._requestOn(conn, (id) => ({ op: "ping", id }));
    return now() - start;
  }

  /**
   * Present a new token (`auth`), before the current identity expires; also
   * used for reconnecting unless getToken is set. With getToken, the client
   * does this itself before a JWT's `exp`.
   */
  async refresh(token) {
    checkToken(token);
    await this._request((id) => ({ op: "auth", id, token }));
    this._token = token;
    this._scheduleRefresh(token);
  }

  /**
   * Close the connection with 1000 and stop reconnecting (idempotent).
   * Pending requests reject with Disconnected; every subscription gets its
   * "closed" item; no timer, listener or socket of the client is left.
   */
  async close() {
    this._closing = true;
    const conn = this._conn;
    const attempt = this._connecting;
    if (attempt) attempt.close(1000, CLOSED_BY_CLIENT);
    if (this._wake) this._wake();
    if (conn !== null && conn.closeInfo === null) {
      conn.ws.close(1000, CLOSED_BY_CLIENT);
      const timer = this._setTimer(() => this._abandon(conn, "the closing handshake timed out"), CLOSE_TIMEOUT);
      await conn.done.promise;
      this._clearTimer(timer);
    }
    this._finish({ code: 1000, reason: CLOSED_BY_CLIENT });
  }

  // -- requests -----------------------------------------------------------------

  _disconnected() {
    const { code, reason } = this._closeInfo || { code: null, reason: "connection closed" };
    if (this._gaveUp !== null) {
      return new ReconnectFailed(code, reason, this._gaveUp.error, this._gaveUp.attempts);
    }
    return new Disconnected(code, reason);
  }

  _lostError(conn) {
    if (this._closeInfo !== null) return this._disconnected();
    const { code, reason } = conn.closeInfo || { code: null, reason: "connection closed" };
    if (this._closing || this._reconnect === null || !reconnectAfterClose(code)) {
      return new Disconnected(code, reason);
    }
    return new ConnectionLost(code, reason);
  }

  async _readyConnection() {
    let deadline = null;
    for (;;) {
      if (this._closeInfo !== null) throw this._disconnected();
      const conn = this._conn;
      if (conn !== null && conn.ready) return conn;
      if (this._reconnect === null) throw new Disconnected(this._lost.code, this._lost.reason);
      if (deadline === null) deadline = now() + this._reconnect.waitTimeout;
      let timer = null;
      await Promise.race([
        this._up.promise,
        new Promise((resolve) => {
          timer = this._setTimer(resolve, deadline - now());
        }),
      ]);
      this._clearTimer(timer);
      if (now() >= deadline && !this.connected && !this.closed) {
        const { code, reason } = this._lost;
        const wait = this._reconnect.waitTimeout;
        throw new ConnectionLost(code, `${reason}; not reconnected within ${wait}s`);
      }
    }
  }

  async _request(make) {
    return this._requestOn(await this._readyConnection(), make);
  }

  _send(conn, command) {
    const payload = this._codec.encode(command);
    if (conn.closeInfo !== null || conn.ws.readyState !== WebSocket.OPEN) {
      throw this._lostError(conn);
    }
    conn.ws.send(payload);
  }

  /** Send make(id) on `conn`; resolve to its ok/pong; `handler` runs on the answer before the next frame. */
  async _requestOn(conn, make, handler = null) {
    const id = ++this._ids;
    const reply = { handler, event: null, done: deferred() };
    conn.pending.set(id, reply);
    try {
      this._send(conn, make(id));
      await reply.done.promise;
    } finally {
      conn.pending.delete(id);
    }
    const answer = reply.event;
    if (answer === null) throw this._lostError(conn);
    if (answer.op === "err") throw serverError(answer.code, answer.message);
    return answer;
  }

  // -- subscriptions ----------------------------------------------------------------

  async _hold(held, subscription) {
    for (;;) {
      // Its resubscription was refused for good while this one waited.
      if (held.refused !== null) throw serverError(held.refused.code, held.refused.message);
      const conn = await this._readyConnection();
      if (held.conn === conn) {
        held.blocks.push(subscription);
        return;
      }
      if (held.subscribing !== null) {
        await held.subscribing;
        continue;
      }
      const done = deferred();
      held.subscribing = done.promise;
      try {
        held.sent = conn;
        const command = (id) => {
          const c = { op: "sub", id, topic: held.pattern };
          if (held.history !== null) c.history = held.history;
          if (held.snapshot) c.snapshot = true;
          if (held.presence) c.presence = true;
          return c;
        };
        await this._requestOn(conn, command, (event) => this._subscribed(held, subscription, conn, event));
        return;
      } catch (error) {
        if (!(error instanceof ConnectionLost)) throw error;
        // lost before the answer: subscribe on the next connection
      } finally {
        held.subscribing = null;
        done.resolve();
      }
    }
  }

  _subscribed(held, subscription, conn, event) {
    const early = held.early.splice(0);
    if (event.op === "err") {
      held.sent = null;
      return;
    }
    held.conn = conn;
    held.established = true;
    held.positions.started(event, held.history);
    held.blocks.push(subscription);
    for (const item of early) subscription._deliver(item);
  }

  async _release(held, subscription) {
    const i = held.blocks.indexOf(subscription);
    if (i >= 0) held.blocks.splice(i, 1);
    held.users -= 1;
    if (held.users) return;
    if (this._held.get(held.pattern) === held) this._held.delete(held.pattern);
    const conn = held.sent;
    if (conn !== null && conn === this._conn && conn.closeInfo === null) {
      let timer = null;
      const timeout = new Promise((resolve) => {
        timer = this._setTimer(() => resolve("timeout"), UNSUBSCRIBE_TIMEOUT);
      });
      try {
        const answer = await Promise.race([
          this._requestOn(conn, (id) => ({ op: "unsub", id, topic: held.pattern })),
          timeout,
        ]);
        if (answer === "timeout") {
          this._report(new ClientError(`no answer to unsubscribe from ${held.pattern} within ${UNSUBSCRIBE_TIMEOUT}s`));
        }
      } catch (error) {
        if (error instanceof ServerError) this._report(error, `unsubscribe from ${held.pattern} failed`);
        // Disconnected: the broker forgets every subscription of a closed connection
      } finally {
        this._clearTimer(timer);
      }
    }
  }

  /** After a reconnect: resubscribe every established pattern with `since`;
   * resolves, once every answer came, to those answered `unavailable`. */
  _resubscribe(conn, reconnected) {
    const wanted = [];
    for (const held of [...this._held.values()]) {
      if (!held.established || !held.users || held.conn === conn) continue;
      wanted.push({ held, since: held.positions.since() });
    }
    return this._sendResubscriptions(conn, wanted, reconnected, 1);
  }

  /** A sub with its `since` for each of `wanted`; resolves to those answered
   * `unavailable` (the `failures`-th time in a row) that may be retried. */
  async _sendResubscriptions(conn, wanted, reconnected, failures) {
    const retry = [];
    const replies = [];
    let lost = false;
    for (const item of wanted) {
      const held = item.held;
      const id = ++this._ids;
      const command = { op: "sub", id, topic: held.pattern };
      if (item.since !== null) command.since = item.since;
      // After a resume that is not recovered, the broker sends the snapshot again.
      if (held.snapshot) command.snapshot = true;
      if (held.presence) command.presence = true;
      const reply = {
        handler: (event) => this._resubscribed(item, conn, reconnected, retry, failures, event),
        event: null,
        done: deferred(),
      };
      conn.pending.set(id, reply);
      held.sent = conn;
      try {
        this._send(conn, command);
      } catch (error) {
        conn.pending.delete(id);
        if (!(error instanceof Disconnected)) throw error;
        lost = true; // lost again: the loop goes on
        break;
      }
      replies.push(reply.done.promise.finally(() => conn.pending.delete(id)));
    }
    await Promise.all(replies);
    return lost ? [] : retry;
  }

  _resubscribed(item, conn, reconnected, retry, failures, event) {
    const held = item.held;
    const early = held.early.splice(0);
    if (event.op === "err") {
      held.sent = null;
      const error = serverError(event.code, event.message);
      const reconnect = this._reconnect;
      if (event.code === "unavailable" && reconnect !== null && !reconnect.givesUp(failures)) {
        // The broker's cluster backend could not take it (yet): the same
        // since again after a backoff, still without a gap.
        this._report(error, `resubscribing to ${held.pattern} (will retry)`);
        retry.push(item);
        return;
      }
      held.established = false;
      held.refused = { code: event.code, message: event.message };
      if (this._held.get(held.pattern) === held) this._held.delete(held.pattern);
      this._report(error, `resubscribing to ${held.pattern}`);
      for (const subscription of [...held.blocks]) subscription._end(error);
      settle(held);
      return;
    }
    held.conn = conn;
    const notice = held.positions.resumed(event, item.since);
    for (const subscription of [...held.blocks]) {
      subscription._deliver(reconnected);
      if (notice !== null) subscription._deliver(notice);
      for (const dropped of early) subscription._deliver(dropped);
    }
    if (notice !== null) this._emit("resync", { ...notice, pattern: held.pattern });
    settle(held);
  }

  /**
   * Resubscribe `retry`, answered `unavailable` on `conn`, again and again
   * after a backoff (reconnect.delay), each with the `since` of its first
   * try, until the broker answers ok, refuses for good (or maxAttempts
   * answers in a row were `unavailable`), or the connection is lost (the
   * next one resubscribes them). Until then a subscribe() of their pattern
   * waits: they are marked so before this returns its promise.
   */
  async _retryResubscriptions(conn, retry, reconnected) {
    const marks = [];
    for (const { held } of retry) {
      if (held.subscribing !== null) continue;
      const done = deferred();
      held.subscribing = done.promise;
      held.settle = done.resolve;
      marks.push([held, done.resolve]);
    }
    let failures = 1;
    try {
      while (retry.length) {
        let timer = null;
        const delay = this._reconnect.delay(failures - 1);
        await Promise.race([
          conn.done.promise,
          new Promise((resolve) => {
            timer = this._setTimer(resolve, delay);
          }),
        ]);
        this._clearTimer(timer);
        if (conn.closeInfo !== null || this._closeInfo !== null) return;
        // Not those whose subscriptions were all unsubscribed meanwhile.
        const wanted = retry.filter(
          ({ held }) => held.users && held.conn !== conn && this._held.get(held.pattern) === held,
        );
        failures += 1;
        retry = await this._sendResubscriptions(conn, wanted, reconnected, failures);
      }
    } finally {
      for (const [held, resolve] of marks) {
        if (held.settle === resolve) settle(held);
        resolve();
      }
    }
  }

  // -- the connection loop -------------------------------------------------------------

  async _start() {
    if (typeof window !== "undefined") {
      window.addEventListener("online", this._onOnline);
      window.addEventListener("offline", this._onOffline);
      if (globalThis.document) document.addEventListener("visibilitychange", this._onVisibility);
      this._offline = globalThis.navigator && navigator.onLine === false;
    }
    let conn;
    try {
      conn = await this._open(0);
    } catch (error) {
      this._finish({ code: null, reason: error.message || String(error) });
      throw error;
    }
    if (conn === null) throw this._disconnected(); // closed or lost at once
    this._loop(conn).catch((error) => {
      this._report(error, "the connection loop failed");
      this._finish({ code: null, reason: String(error) });
    });
  }

  async _loop(conn) {
    const reconnect = this._reconnect;
    let failures = 0;
    let error = null;
    for (;;) {
      if (conn !== null) {
        await conn.done.promise;
        conn = null;
      }
      if (this._closeInfo !== null || reconnect === null) return;
      if (error !== null && reconnect.givesUp(failures)) {
        this._gaveUp = { error, attempts: failures };
        this._finish(this._lost);
        return;
      }
      const delay = reconnect.delay(failures);
      this._emit("reconnecting", { attempt: failures + 1, delay, error });
      await this._backoff(delay);
      if (this._closeInfo !== null) return;
      try {
        conn = await this._open(failures + 1);
        if (conn !== null) {
          failures = 0;
          error = null;
          continue;
        }
        const { code, reason } = this._lost;
        error = new ConnectError(null, `lost before resubscribing (${code}): ${reason}`);
      } catch (e) {
        if (!(e instanceof ConnectError)) throw e;
        error = e;
      }
      failures += 1;
    }
  }

  /** Wait `seconds`, or less when the network comes back or the page is shown
   * again; while the browser says it is offline, until it is online. */
  async _backoff(seconds) {
    const woken = new Promise((resolve) => {
      this._wake = resolve;
    });
    let timer = null;
    if (!this._offline) timer = this._setTimer(this._wake, seconds);
    await woken;
    this._clearTimer(timer);
    this._wake = null;
  }

  _networkChanged(online) {
    this._offline = !online;
    if (online) this._resumed();
    else if (this._conn !== null && this._conn.ready) this._checkAlive(this._conn);
  }

  /** The network is back or the page is visible again: reconnect now if
   * waiting, else make sure the connection still answers. */
  _resumed() {
    if (this._closeInfo !== null) return;
    if (this._wake !== null && !this._offline) this._wake();
    else if (this._conn !== null && this._conn.ready) this._checkAlive(this._conn);
  }

  /** A ping answered within pingTimeout, or the connection is taken for lost. */
  _checkAlive(conn) {
    if (conn.checking || conn.closeInfo !== null) return;
    conn.checking = true;
    const timer = this._setTimer(
      () => this._abandon(conn, `no answer to a ping within ${this._pingTimeout}s`),
      this._pingTimeout,
    );
    this._requestOn(conn, (id) => ({ op: "ping", id }))
      .catch(() => {}) // lost: handled by the close
      .finally(() => {
        this._clearTimer(timer);
        conn.checking = false;
      });
  }

  /** Give up on `conn` without waiting for the browser to notice (1006). */
  _abandon(conn, reason) {
    if (conn.closeInfo !== null) return;
    const ws = conn.ws;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(1000, CLOSED_BY_CLIENT);
    } catch {
      // already closed
    }
    this._connectionLost(conn, { code: 1006, reason });
  }

  _connectUrl(token) {
    const url = new URL(this.url);
    if (token !== null) url.searchParams.set("token", token);
    return url.href;
  }

  /** One connection: resolves to it once ready (after a reconnect,
   * resubscribed), to null if it was lost or the client closed first;
   * rejects with ConnectError if it could not be opened. */
  async _open(attempts) {
    let token = this._token;
    if (this._getToken !== null) {
      try {
        token = await this._getToken();
        checkToken(token);
      } catch (error) {
        if (!attempts) throw error;
        throw new ConnectError(null, `getToken failed: ${error}`);
      }
    }
    if (this._closeInfo !== null || this._closing) return null;
    const subprotocol = SUBPROTOCOLS[this.encoding];
    const ws = new WebSocket(this._connectUrl(token), [subprotocol]);
    ws.binaryType = "arraybuffer";
    this._connecting = ws;
    const opened = await new Promise((resolve) => {
      const timer = this._setTimer(() => resolve("timeout"), this._connectTimeout);
      ws.onopen = () => {
        this._clearTimer(timer);
        resolve("open");
      };
      ws.onclose = (e) => {
        this._clearTimer(timer);
        resolve(e);
      };
    });
    this._connecting = null;
    if (opened !== "open") {
      ws.onopen = ws.onclose = null;
      if (opened === "timeout") ws.close();
      if (this._closing) return null;
      const reachable = await this._probe();
      let reason;
      if (opened === "timeout") {
        reason = `the WebSocket handshake with ${this.url} timed out after ${this._connectTimeout}s`;
      } else if (reachable) {
        reason =
          `the broker at ${this.url} refused the WebSocket handshake ` +
          "(the browser does not say why: bad or expired token 401, origin or identity 403, " +
          "wrong path 404, too many connections 429/503; the broker's log names it)";
      } else {
        reason = `could not reach the broker at ${this.url} (close ${opened.code})`;
      }
      throw new ConnectError(null, reason, reachable);
    }
    if (ws.protocol !== subprotocol) {
      ws.close(1000, CLOSED_BY_CLIENT);
      throw new ConnectError(null, `the server did not accept subprotocol ${subprotocol}`);
    }
    const conn = new Connection(ws);
    this._conn = conn;
    ws.onmessage = (e) => this._onFrame(conn, e.data);
    ws.onclose = (e) => this._connectionLost(conn, { code: e.code, reason: e.reason || closeName(e.code) });
    ws.onerror = null;
    if (this._closing) {
      ws.close(1000, CLOSED_BY_CLIENT);
      return null;
    }
    if (attempts) {
      const reconnected = { type: "reconnected", attempts };
      const retry = await this._resubscribe(conn, reconnected);
      if (conn.closeInfo !== null || this._closeInfo !== null) return null;
      // Those answered `unavailable` are retried on this connection, which
      // is ready meanwhile; the retry ends with it (conn.done).
      if (retry.length) {
        this._retryResubscriptions(conn, retry, reconnected).catch((error) =>
          this._report(error, "retrying resubscriptions failed"),
        );
      }
    }
    if (conn.closeInfo !== null || this._closeInfo !== null) return null;
    conn.ready = true;
    this._upSet = true;
    this._up.resolve();
    if (attempts) this.reconnects += 1;
    this._emit("connected", { attempts });
    this._scheduleRefresh(token);
    this._scheduleKeepalive(conn);
    return conn;
  }

  /** Does the broker answer plain HTTP at the WebSocket's address? (A
   * refused handshake and an unreachable broker look alike to a page.) */
  async _probe() {
    if (typeof fetch !== "function") return null;
    const url = new URL(this.url);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    url.search = "";
    const controller = typeof AbortController === "function" ? new AbortController() : null;
    const timer = this._setTimer(() => controller && controller.abort(), 3);
    // close() aborts it too: it clears the timer, and a route that hangs
    // would keep the request (and its connection) open long after.
    this._probing = controller;
    try {
      await fetch(url.href, { mode: "no-cors", cache: "no-store", signal: controller?.signal });
      return true;
    } catch {
      return false;
    } finally {
      this._clearTimer(timer);
      this._probing = null;
    }
  }

  _scheduleRefresh(token) {
    this._clearTimer(this._refreshTimer);
    this._refreshTimer = null;
    if (this._getToken === null || this._closeInfo !== null) return;
    const remaining = tokenTimeLeft(token);
    if (remaining === null) return;
    // When it expires, on this page's monotonic clock (immune to its wall
    // clock being off or set while the page runs).
    const expiry = now() + remaining;
    // Refresh ahead: half the remaining time for short tokens, at most 30 s
    // before expiry, but never later than 90% of what is left; and never
    // sooner than MIN_REFRESH_INTERVAL after the last refresh, so that a
    // token source handing out nearly expired tokens cannot make a storm.
    const lead = Math.max(remaining * 0.1, Math.min(30, remaining / 2));
    let delay = Math.max(0, remaining - lead);
    if (this._refreshedAt !== null) delay = Math.max(delay, this._refreshedAt + MIN_REFRESH_INTERVAL - now());
    this._refreshTimer = this._setTimer(() => this._refreshNow(expiry), delay);
  }

  async _refreshNow(expiry) {
    this._refreshTimer = null;
    const conn = this._conn;
    if (conn === null || !conn.ready || this._closeInfo !== null) return;
    this._refreshedAt = now();
    try {
      const token = await this._getToken();
      if (conn !== this._conn || !conn.ready) return; // a reconnect took a fresh one
      await this.refresh(token);
    } catch (error) {
      if (this._closeInfo !== null || conn !== this._conn || conn.closeInfo !== null) return;
      this._report(error, "refreshing the token failed");
      // Try again while the identity lasts.
      const remaining = expiry - now();
      if (remaining > 1) this._refreshTimer = this._setTimer(() => this._refreshNow(expiry), Math.min(5, remaining / 4));
    }
  }

  _scheduleKeepalive(conn) {
    if (!(this._keepalive > 0)) return;
    const tick = () => {
      if (conn.closeInfo !== null || this._closeInfo !== null) return;
      const idle = now() - conn.lastReceived;
      if (idle >= this._keepalive) {
        this._checkAlive(conn);
        this._setTimer(tick, this._keepalive);
      } else {
        this._setTimer(tick, this._keepalive - idle);
      }
    };
    this._setTimer(tick, this._keepalive);
  }

  _connectionLost(conn, details) {
    if (conn.closeInfo !== null) return;
    conn.closeInfo = details;
    const wasReady = conn.ready;
    conn.ready = false;
    const final = this._closing || this._reconnect === null || !reconnectAfterClose(details.code);
    if (this._conn === conn) {
      this._lost = details;
      this._clearTimer(this._refreshTimer);
      this._refreshTimer = null;
      if (this._upSet) {
        this._up = deferred();
        this._upSet = false;
      }
    }
    const interrupted = { type: "interrupted", code: details.code, reason: details.reason };
    for (const held of this._held.values()) {
      if (held.sent === conn) {
        held.sent = null;
        held.early.length = 0;
      }
      if (held.conn === conn) {
        held.conn = null;
        if (!final) for (const subscription of [...held.blocks]) subscription._deliver(interrupted);
      }
    }
    if (wasReady) this._emit("disconnected", { ...details, reconnecting: !final });
    if (final) this._finish(details);
    for (const reply of conn.pending.values()) reply.done.resolve();
    conn.done.resolve();
  }

  _finish(details) {
    if (this._closeInfo !== null) return;
    this._closeInfo = details;
    this._closing = true;
    this._upSet = true;
    this._up.resolve();
    if (this._wake) this._wake();
    for (const handle of this._timers) clearTimeout(handle);
    this._timers.clear();
    this._refreshTimer = null;
    if (this._probing !== null) this._probing.abort();
    if (typeof window !== "undefined") {
      window.removeEventListener("online", this._onOnline);
      window.removeEventListener("offline", this._onOffline);
      if (globalThis.document) document.removeEventListener("visibilitychange", this._onVisibility);
    }
    const error = this._disconnected();
    for (const held of this._held.values()) {
      for (const subscription of [...held.blocks]) subscription._end(this._disconnected());
    }
    const conn = this._conn;
    if (conn !== null) for (const reply of conn.pending.values()) reply.done.resolve();
    this._emit("closed", { code: details.code, reason: details.reason, error });
  }

  // -- the reader ---------------------------------------------------------------------

  _onFrame(conn, data) {
    if (conn.closeInfo !== null) return;
    conn.lastReceived = now();
    let event;
    try {
      event = this._codec.decode(data);
      if (event === null || typeof event !== "object" || typeof event.op !== "string") {
        throw new TypeError("not an object with an op");
      }
    } catch (error) {
      // A newer broker may send what this client does not know.
      this._report(error, "ignoring a frame from the broker");
      return;
    }
    switch (event.op) {
      case "msg":
        this._onMsg(conn, event);
        break;
      case "dropped":
        this._onDropped(conn, { type: "dropped", topic: event.topic, count: event.count });
        break;
      case "join":
      case "leave":
        this._onMember(conn, { type: event.op, topic: event.topic, member: event.member });
        break;
      case "ok":
      case "err":
      case "pong":
        this._answer(conn, event);
        break;
      default:
        this._report(new ClientError(`unknown op '${event.op}'`), "ignoring a frame from the broker");
    }
  }

  _onMsg(conn, event) {
    const msg = {
      topic: event.topic,
      seq: event.seq,
      data: event.data,
      key: event.key ?? null,
      epoch: event.epoch ?? null,
      snapshot: event.snapshot === true,
    };
    let item = null;
    for (const held of [...this._held.values()]) {
      if (held.conn !== conn || !patternMatches(held.pattern, msg.topic)) continue;
      const [deliver, notice] = held.positions.accept(msg);
      const blocks = [...held.blocks];
      if (notice !== null) {
        for (const subscription of blocks) subscription._deliver(notice);
        this._emit("resync", { ...notice, pattern: held.pattern });
      }
      if (deliver) {
        if (item === null) item = message(msg);
        for (const subscription of blocks) subscription._deliver(item);
      }
    }
  }

  _onDropped(conn, item) {
    this._emit("dropped", { topic: item.topic, count: item.count });
    const everyone = item.topic === OTHER_TOPICS;
    for (const held of [...this._held.values()]) {
      if (!everyone && !patternMatches(held.pattern, item.topic)) continue;
      if (held.conn === conn) {
        for (const subscription of [...held.blocks]) subscription._deliver(item);
      } else if (held.sent === conn) {
        // Its sub awaits the ok: the drops may be of its replay (history or
        // snapshot) that overflowed the queue; it gets them after the ok.
        held.early.push(item);
      }
    }
  }

  _onMember(conn, item) {
    for (const held of [...this._held.values()]) {
      if (held.conn === conn && patternMatches(held.pattern, item.topic)) {
        for (const subscription of [...held.blocks]) {
          if (subscription.presence) subscription._deliver(item);
        }
      }
    }
  }

  _answer(conn, event) {
    const id = event.id;
    const reply = Number.isInteger(id) ? conn.pending.get(id) : undefined;
    if (reply !== undefined) {
      conn.pending.delete(id);
      if (reply.handler !== null && event.op !== "pong") reply.handler(event);
      reply.event = event;
      reply.done.resolve();
    } else if (event.op === "err") {
      const context = id == null ? "broker error" : `broker error for request ${id} (no longer awaited)`;
      this._report(serverError(event.code, event.message), context);
    }
  }
}

function closeName(code) {
  const names = {
    1000: "normal closure",
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1005: "no status received",
    1006: "abnormal closure",
    1007: "invalid payload",
    1008: "policy violation",
    1009: "message too big",
    1011: "internal error",
    1012: "service restart",
  };
  return names[code] || "connection closed";
}

/**
 * Connect to the broker at `url` (ws://, wss://, or a path resolved against
 * the page). Resolves to the connected Client once the first connection is
 * up; rejects with ConnectError if it cannot be made (not retried). Later
 * losses are reconnected in the background (see Reconnect).
 *
 * Options: token (sent as ?token=, browsers cannot set headers), getToken
 * (instead of token: called before every connection attempt and before a
 * JWT's exp, then presented with `auth`), encoding ("json" or "msgpack"),
 * msgpack (the @msgpack/msgpack module), connectTimeout (seconds, 10),
 * reconnect (true, false, or Reconnect options), keepalive (seconds without
 * a frame before a ping checks the connection, 30; 0: off), pingTimeout
 * (seconds that ping may take, 10).
 */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client._start();
  return client;
}
