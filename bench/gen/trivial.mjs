// CALIBRATION SERVER ("trivial"): shows what the load generator itself can
// do, so that no broker's number is mistaken for the generator's limit.
// Not a broker: no limits, no validation, unbounded buffers.
//
//   node bench/gen/trivial.mjs --port P --mode stream --format broker|broker-msgpack|nats|mqtt --expect N
//       After the handshake and a first frame from each of N clients, writes
//       pre-built delivery frames to every client as fast as its socket takes
//       them (64 KiB writes): ~zero cost per delivery, so the rate the
//       generator counts is its own ceiling for that format.
//   node bench/gen/trivial.mjs --port P --mode route
//       A minimal router for our JSON protocol (sub/pub/ping, ok/pong/msg)
//       that writes every delivery with its own socket write, as a simple
//       broker does: the generator's ceiling against a one-write-per-delivery
//       server, and a floor for latency.
//
// Listens on 127.0.0.1 only and exits by itself after --lifetime seconds.

import net from 'node:net';
import { createHash } from 'node:crypto';

const opt = { port: 0, mode: 'route', format: 'broker', expect: 1, lifetime: 600 };
for (let i = 2; i < process.argv.length; i += 2) opt[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const PORT = Number(opt.port);
const EXPECT = Number(opt.expect);

function serverFrame(opcode, body) {
  const n = body.length;
  const head = n < 126 ? Buffer.from([0x80 | opcode, n]) : n < 65536 ? Buffer.from([0x80 | opcode, 126, n >> 8, n & 0xff]) : null;
  if (head === null) throw new Error('frame too large');
  return Buffer.concat([head, body]);
}

// ------------------------------------------------------------ stream mode
const DATA = '@T' + '0'.repeat(16) + '#' + 'x'.repeat(81); // 100 bytes, like the generator's

function streamBatch(format) {
  let frame;
  if (format === 'broker') {
    frame = serverFrame(1, Buffer.from(`{"op":"msg","topic":"t0","seq":1,"data":"${DATA}"}`));
  } else if (format === 'broker-msgpack') {
    const s = (x) => Buffer.concat([Buffer.from([0xa0 | x.length]), Buffer.from(x)]);
    const body = Buffer.concat([Buffer.from([0x84]), s('op'), s('msg'), s('topic'), s('t0'), s('seq'), Buffer.from([1]), s('data'), Buffer.from([0xd9, DATA.length]), Buffer.from(DATA)]);
    frame = serverFrame(2, body);
  } else if (format === 'nats') {
    // NATS packs many MSGs into one WebSocket frame; ~8 KiB frames
    const one = Buffer.from(`MSG t0 1 ${DATA.length}\r\n${DATA}\r\n`);
    const count = Math.floor(8192 / one.length);
    return { buf: Buffer.concat(Array(Math.floor(65536 / (count * one.length + 4))).fill(serverFrame(2, Buffer.concat(Array(count).fill(one))))) };
  } else if (format === 'mqtt') {
    const body = Buffer.concat([Buffer.from([0, 2]), Buffer.from('t0'), Buffer.from(DATA)]);
    frame = serverFrame(2, Buffer.concat([Buffer.from([0x30, body.length]), body]));
  } else {
    throw new Error(`unknown format ${format}`);
  }
  return { buf: Buffer.concat(Array(Math.floor(65536 / frame.length)).fill(frame)) };
}

const waiting = [];
function startStreaming(sock, batch) {
  const more = () => {
    while (!sock.destroyed) if (!sock.write(batch.buf)) return void sock.once('drain', more);
  };
  more();
}

// ------------------------------------------------------------ route mode
const topics = new Map(); // topic -> Set of sockets
const seqs = new Map();

function handleCommand(sock, state, text) {
  let cmd;
  try {
    cmd = JSON.parse(text);
  } catch {
    return sock.write(serverFrame(1, Buffer.from('{"op":"err","code":"bad_request","message":"malformed JSON"}')));
  }
  const idPart = cmd.id === undefined || cmd.id === null ? '' : `,"id":${JSON.stringify(cmd.id)}`;
  if (cmd.op === 'sub') {
    let set = topics.get(cmd.topic);
    if (!set) topics.set(cmd.topic, (set = new Set()));
    set.add(sock);
    state.topics.add(cmd.topic);
    if (idPart) sock.write(serverFrame(1, Buffer.from(`{"op":"ok"${idPart}}`)));
  } else if (cmd.op === 'pub') {
    const seq = (seqs.get(cmd.topic) || 0) + 1;
    seqs.set(cmd.topic, seq);
    const set = topics.get(cmd.topic);
    if (set) {
      const frame = serverFrame(1, Buffer.from(`{"op":"msg","topic":"${cmd.topic}","seq":${seq},"data":${JSON.stringify(cmd.data)}}`));
      for (const s of set) s.write(frame); // one write per delivery
    }
    if (idPart) sock.write(serverFrame(1, Buffer.from(`{"op":"ok"${idPart},"seq":${seq}}`)));
  } else if (cmd.op === 'ping') {
    sock.write(serverFrame(1, Buffer.from(`{"op":"pong"${idPart}}`)));
  }
}

// ------------------------------------------------------------ server
const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const batch = opt.mode === 'stream' ? streamBatch(opt.format) : null;

const server = net.createServer((sock) => {
  sock.setNoDelay(true);
  sock.on('error', () => {});
  const state = { upgraded: false, head: Buffer.alloc(0), carry: null, topics: new Set(), started: false };
  sock.on('close', () => {
    for (const t of state.topics) topics.get(t)?.delete(sock);
  });
  sock.on('data', (chunk) => {
    let buf = chunk;
    if (!state.upgraded) {
      state.head = Buffer.concat([state.head, chunk]);
      const blank = state.head.indexOf('\r\n\r\n');
      if (blank < 0) return;
      const req = state.head.toString('latin1', 0, blank);
      const key = /^sec-websocket-key:\s*(\S+)/im.exec(req)?.[1] ?? '';
      const proto = /^sec-websocket-protocol:\s*([^,\r\n]+)/im.exec(req)?.[1]?.trim();
      const accept = createHash('sha1').update(key + GUID).digest('base64');
      sock.write(
        'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
          `Sec-WebSocket-Accept: ${accept}\r\n` +
          (proto ? `Sec-WebSocket-Protocol: ${proto}\r\n` : '') +
          '\r\n',
      );
      state.upgraded = true;
      buf = state.head.subarray(blank + 4);
      state.head = null;
      if (buf.length === 0) return;
    }
    if (batch !== null) {
      // stream mode: the first frame from the client (its hello or subscribe)
      // makes it ready; streaming starts once EXPECT clients are ready
      if (state.started) return;
      state.started = true;
      waiting.push(sock);
      if (waiting.length >= EXPECT) for (const s of waiting.splice(0)) startStreaming(s, batch);
      return;
    }
    if (state.carry !== null) {
      buf = Buffer.concat([state.carry, buf]);
      state.carry = null;
    }
    let pos = 0;
    while (buf.length - pos >= 2) {
      const op = buf[pos] & 0x0f;
      let len = buf[pos + 1] & 0x7f;
      let at = pos + 2;
      if (len === 126) {
        if (buf.length - pos < 4) break;
        len = buf.readUInt16BE(pos + 2);
        at = pos + 4;
      } else if (len === 127) {
        if (buf.length - pos < 10) break;
        len = buf.readUInt32BE(pos + 6);
        at = pos + 10;
      }
      if (buf.length < at + 4 + len) break;
      const mask = buf.subarray(at, at + 4);
      const body = Buffer.allocUnsafe(len);
      for (let i = 0; i < len; i++) body[i] = buf[at + 4 + i] ^ mask[i & 3];
      pos = at + 4 + len;
      if (op === 1) handleCommand(sock, state, body.toString('utf8'));
      else if (op === 9) sock.write(serverFrame(10, body));
      else if (op === 8) {
        sock.end(serverFrame(8, body.subarray(0, 2)));
        return;
      }
    }
    if (pos < buf.length) state.carry = Buffer.from(buf.subarray(pos));
  });
});
server.maxConnections = 30000;
server.listen(PORT, '127.0.0.1', () => console.error(`trivial ${opt.mode}${batch ? ' ' + opt.format : ''} on 127.0.0.1:${server.address().port}`));
setTimeout(() => process.exit(0), Number(opt.lifetime) * 1000).unref();
process.on('SIGTERM', () => process.exit(0));
