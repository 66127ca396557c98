// Protocol adapters: how the load generator talks to each broker over a
// WebSocket (a WsConn from ws.mjs).
//
// Every adapter has
//   path, subprotocol       default request path and Sec-WebSocket-Protocol
//   hello(c, idx)           sends the protocol's connect step; returns how many
//                           acks to wait for before the connection is usable
//   subscribe(c, topic)     one subscription; the broker answers with ONE ack
//   ping(c)                 one protocol-level ping; answered with ONE ack
//   publish(c, topic, p)    one publish, fire and forget (no reply asked for);
//                           p is a Buffer the caller reuses: it is copied
//                           (masked) into the frame before this returns
//   reader(c, sink)         returns the WsConn.onmessage handler; it calls
//                             sink.msg(buf, start, end) once per delivery
//                               (the range holds the payload)
//                             sink.ack()                per ack
//                             sink.dropped(n)           broker says n were dropped
//                             sink.error(text)          protocol-level error
//
// Adapters: broker (our JSON protocol), broker-msgpack (same, msgpack
// subprotocol), nats (NATS client protocol), mqtt (MQTT 3.1.1, QoS 0).

const enc = (s) => Buffer.from(s, 'latin1');
const CRLF = enc('\r\n');

// Per-(topic, length) constant headers are built once and reused.
function memo(fn) {
  const cache = new Map();
  return (topic, len) => {
    const k = len === undefined ? topic : `${topic}\u0000${len}`;
    let v = cache.get(k);
    if (v === undefined) {
      v = fn(topic, len);
      cache.set(k, v);
    }
    return v;
  };
}

function nextId(c) {
  c.p.id = (c.p.id || 0) + 1;
  return c.p.id;
}

function readDigits(buf, at, end) {
  let v = 0;
  while (at < end && buf[at] >= 0x30 && buf[at] <= 0x39) v = v * 10 + (buf[at++] - 0x30);
  return v;
}

// ------------------------------------------------------------- broker (JSON)
// client: {"op":"sub","id":N,"topic":T}  {"op":"pub","topic":T,"data":"..."}
//         {"op":"ping","id":N}
// server: {"op":"msg",...} {"op":"ok","id":N} {"op":"pong","id":N}
//         {"op":"dropped","topic":T,"count":N} {"op":"err",...}
// Replies start with {"op":" and the op name, so the op is read at a fixed
// offset (7) instead of parsing JSON.
const J_PUB_HEAD = memo((topic) => enc(`{"op":"pub","topic":"${topic}","data":"`));
const J_PUB_TAIL = enc('"}');
const J_COUNT = enc('"count":');

function jsonOp(buf, s, e) {
  // returns the first letter of the op ('m','o','p','d','e') or 0
  if (e - s < 10 || buf[s] !== 0x7b || buf[s + 2] !== 0x6f || buf[s + 3] !== 0x70) return 0;
  return buf[s + 7];
}

const broker = {
  path: '/ws',
  subprotocol: null, // no subprotocol offered: the broker speaks JSON
  hello() {
    return 0;
  },
  subscribe(c, topic) {
    c.text(enc(`{"op":"sub","id":${nextId(c)},"topic":"${topic}"}`));
  },
  ping(c) {
    c.text(enc(`{"op":"ping","id":${nextId(c)}}`));
  },
  publish(c, topic, payload) {
    c.text(J_PUB_HEAD(topic), payload, J_PUB_TAIL);
  },
  reader(c, sink) {
    return (buf, s, e) => {
      const op = jsonOp(buf, s, e);
      if (op === 0x6d && buf[s + 8] === 0x73 && buf[s + 9] === 0x67 && buf[s + 10] === 0x22) {
        sink.msg(buf, s, e); // "msg"
      } else if (op === 0x6f || op === 0x70) {
        sink.ack(buf, s, e); // "ok" or "pong"
      } else if (op === 0x64) {
        const at = buf.subarray(s, e).indexOf(J_COUNT);
        sink.dropped(at < 0 ? 1 : readDigits(buf, s + at + J_COUNT.length, e));
      } else {
        sink.error(buf.toString('utf8', s, Math.min(e, s + 300)));
      }
    };
  },
};

// ---------------------------------------------------- broker (msgpack)
// Same messages as msgpack maps in binary frames (subprotocol
// broker.v1.msgpack). Only the few encodings needed are written by hand:
// fixmap, fixstr/str8/str16, positive fixint/uint8/16/32.
function mpStr(s) {
  const b = Buffer.from(s, 'utf8');
  const n = b.length;
  if (n < 32) return Buffer.concat([Buffer.from([0xa0 | n]), b]);
  if (n < 256) return Buffer.concat([Buffer.from([0xd9, n]), b]);
  return Buffer.concat([Buffer.from([0xda, n >> 8, n & 0xff]), b]);
}
function mpStrHead(n) {
  if (n < 32) return Buffer.from([0xa0 | n]);
  if (n < 256) return Buffer.from([0xd9, n]);
  if (n < 65536) return Buffer.from([0xda, n >> 8, n & 0xff]);
  return Buffer.from([0xdb, (n >>> 24) & 0xff, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);
}
function mpUint(n) {
  if (n < 128) return Buffer.from([n]);
  if (n < 256) return Buffer.from([0xcc, n]);
  if (n < 65536) return Buffer.from([0xcd, n >> 8, n & 0xff]);
  return Buffer.from([0xce, (n >>> 24) & 0xff, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff]);
}
function mpMap(pairs) {
  const parts = [Buffer.from([0x80 | pairs.length])];
  for (const [k, v] of pairs) parts.push(mpStr(k), v);
  return Buffer.concat(parts);
}
function mpReadUint(buf, at) {
  const b = buf[at];
  if (b < 0x80) return b;
  if (b === 0xcc) return buf[at + 1];
  if (b === 0xcd) return buf.readUInt16BE(at + 1);
  if (b === 0xce) return buf.readUInt32BE(at + 1);
  if (b === 0xcf) return Number(buf.readBigUInt64BE(at + 1));
  return 1;
}
const MP_PUB_HEAD = memo((topic, len) =>
  Buffer.concat([Buffer.from([0x83]), mpStr('op'), mpStr('pub'), mpStr('topic'), mpStr(topic), mpStr('data'), mpStrHead(len)]),
);
const MP_COUNT_KEY = mpStr('count');

const brokerMsgpack = {
  path: '/ws',
  subprotocol: 'broker.v1.msgpack',
  hello() {
    return 0;
  },
  subscribe(c, topic) {
    c.binary(mpMap([['op', mpStr('sub')], ['id', mpUint(nextId(c))], ['topic', mpStr(topic)]]));
  },
  ping(c) {
    c.binary(mpMap([['op', mpStr('ping')], ['id', mpUint(nextId(c))]]));
  },
  publish(c, topic, payload) {
    c.binary(MP_PUB_HEAD(topic, payload.length), payload);
  },
  reader(c, sink) {
    // every server map starts with the key "op" (a2 6f 70), then the op as a
    // fixstr: a3 "msg" / a2 "ok" / a4 "pong" / a7 "dropped" / a3 "err"
    return (buf, s, e) => {
      if (e - s >= 8 && (buf[s] & 0xf0) === 0x80 && buf[s + 1] === 0xa2 && buf[s + 2] === 0x6f && buf[s + 3] === 0x70) {
        const t = buf[s + 4];
        const c0 = buf[s + 5];
        if (t === 0xa3 && c0 === 0x6d && buf[s + 6] === 0x73 && buf[s + 7] === 0x67) return sink.msg(buf, s, e);
        if ((t === 0xa2 && c0 === 0x6f) || (t === 0xa4 && c0 === 0x70)) return sink.ack();
        if (t === 0xa7 && c0 === 0x64) {
          const at = buf.subarray(s, e).indexOf(MP_COUNT_KEY);
          return sink.dropped(at < 0 ? 1 : mpReadUint(buf, s + at + MP_COUNT_KEY.length));
        }
      }
      sink.error(`msgpack frame ${buf.toString('hex', s, Math.min(e, s + 64))}`);
    };
  },
};

// --------------------------------------------------------------------- nats
// NATS client protocol as a byte stream in binary WebSocket frames: a frame
// may hold several protocol lines, and a MSG may span frames.
//   client: CONNECT {...}  SUB <subject> <sid>  PUB <subject> <#bytes>  PING/PONG
//   server: INFO  MSG <subject> <sid> [reply] <#bytes>\r\n<payload>\r\n  PING/PONG  +OK  -ERR
// With verbose false there is no +OK, so a SUB is followed by a PING whose
// PONG is the subscribe ack (NATS handles a connection's commands in order).
const N_PUB_HEAD = memo((topic, len) => enc(`PUB ${topic} ${len}\r\n`));
const N_PONG = enc('PONG\r\n');
const N_PING = enc('PING\r\n');

function natsReader(c, sink) {
  let carry = null;
  return (frame, fs, fe) => {
    let buf = frame;
    let pos = fs;
    let end = fe;
    if (carry !== null) {
      buf = Buffer.concat([carry, frame.subarray(fs, fe)]);
      carry = null;
      pos = 0;
      end = buf.length;
    }
    while (pos < end) {
      let eol = pos;
      while (eol < end && buf[eol] !== 0x0d) eol++;
      if (eol + 1 >= end) break; // incomplete line
      const c0 = buf[pos];
      if (c0 === 0x4d /* M */) {
        // the byte count is the last token of the line
        let sp = eol - 1;
        while (sp > pos && buf[sp] !== 0x20) sp--;
        const size = readDigits(buf, sp + 1, eol);
        const body = eol + 2;
        if (body + size + 2 > end) break; // payload not complete yet
        sink.msg(buf, body, body + size);
        pos = body + size + 2;
        continue;
      }
      if (c0 === 0x50 /* P */) {
        if (buf[pos + 1] === 0x49 /* PING */) c.binary(N_PONG);
        else sink.ack(); // PONG
      } else if (c0 === 0x2d /* -ERR */) {
        sink.error(buf.toString('latin1', pos, eol));
      } // INFO, +OK: nothing to do
      pos = eol + 2;
    }
    if (pos < end) carry = Buffer.from(buf.subarray(pos, end));
  };
}

const nats = {
  path: '/',
  subprotocol: null,
  hello(c, idx) {
    const opts = { verbose: false, pedantic: false, protocol: 1, headers: false, name: `bench-${idx}`, lang: 'node', version: '1' };
    c.binary(enc(`CONNECT ${JSON.stringify(opts)}\r\nPING\r\n`));
    return 1;
  },
  subscribe(c, topic) {
    c.binary(enc(`SUB ${topic} ${nextId(c)}\r\nPING\r\n`));
  },
  ping(c) {
    c.binary(N_PING);
  },
  publish(c, topic, payload) {
    c.binary(N_PUB_HEAD(topic, payload.length), payload, CRLF);
  },
  reader: natsReader,
};

// --------------------------------------------------------------------- mqtt
// MQTT 3.1.1 over binary WebSocket frames, subprotocol "mqtt", QoS 0 only.
//   CONNECT (clean session, keep-alive off) -> CONNACK (the hello ack)
//   SUBSCRIBE (QoS 0)                       -> SUBACK
//   PUBLISH QoS 0                              (no reply)
//   PINGREQ                                 -> PINGRESP
function varLen(n) {
  const out = [];
  do {
    let b = n & 0x7f;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
}
function u16Str(s) {
  const b = Buffer.from(s, 'utf8');
  return Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
}
function mqttPacket(type, body) {
  return Buffer.concat([Buffer.from([type]), varLen(body.length), body]);
}
const M_PUB_HEAD = memo((topic, len) => {
  const t = u16Str(topic);
  return Buffer.concat([Buffer.from([0x30]), varLen(t.length + len), t]);
});
const M_PINGREQ = Buffer.from([0xc0, 0x00]);

function mqttReader(c, sink) {
  let carry = null;
  return (frame, fs, fe) => {
    let buf = frame;
    let pos = fs;
    let end = fe;
    if (carry !== null) {
      buf = Buffer.concat([carry, frame.subarray(fs, fe)]);
      carry = null;
      pos = 0;
      end = buf.length;
    }
    while (end - pos >= 2) {
      const first = buf[pos];
      let len = 0;
      let mul = 1;
      let at = pos + 1;
      let complete = false;
      while (at < end && at <= pos + 4) {
        const b = buf[at++];
        len += (b & 0x7f) * mul;
        mul *= 128;
        if ((b & 0x80) === 0) {
          complete = true;
          break;
        }
      }
      if (!complete || at + len > end) break;
      const type = first >> 4;
      if (type === 3) {
        let body = at + 2 + ((buf[at] << 8) | buf[at + 1]);
        if ((first & 0x06) !== 0) body += 2; // packet id (QoS > 0)
        sink.msg(buf, body, at + len);
      } else if (type === 2) {
        if (buf[at + 1] === 0) sink.ack();
        else sink.error(`CONNACK refused, code ${buf[at + 1]}`);
      } else if (type === 9) {
        if (buf[at + 2] === 0x80) sink.error('SUBACK: subscription refused');
        else sink.ack();
      } else if (type === 13) {
        sink.ack(); // PINGRESP
      }
      pos = at + len;
    }
    if (pos < end) carry = Buffer.from(buf.subarray(pos, end));
  };
}

const mqtt = {
  path: '/mqtt',
  subprotocol: 'mqtt',
  hello(c, idx) {
    // protocol name, level 4, flags: clean session; keep-alive 0 (off)
    const head = Buffer.concat([u16Str('MQTT'), Buffer.from([4, 0x02, 0, 0])]);
    c.binary(mqttPacket(0x10, Buffer.concat([head, u16Str(`bench-${process.pid}-${idx}`)])));
    return 1;
  },
  subscribe(c, topic) {
    const id = (nextId(c) % 65535) + 1;
    c.binary(mqttPacket(0x82, Buffer.concat([Buffer.from([id >> 8, id & 0xff]), u16Str(topic), Buffer.from([0])])));
  },
  ping(c) {
    c.binary(M_PINGREQ);
  },
  publish(c, topic, payload) {
    c.binary(M_PUB_HEAD(topic, payload.length), payload);
  },
  reader: mqttReader,
};

export const protocols = { broker, 'broker-msgpack': brokerMsgpack, nats, mqtt };
