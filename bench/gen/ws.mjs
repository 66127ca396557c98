// A small RFC 6455 client on raw TCP sockets, built for the load generator.
//
// Why not a library: the generator must stay far below the brokers' cost per
// delivery, so this client
//   * reads every socket into ONE shared buffer (net `onread`): no Buffer is
//     allocated per read, frames are parsed where they lie and handed to the
//     protocol reader as (buf, start, end, opcode) views;
//   * masks outgoing frames straight into a per-connection output area (a bump
//     allocator: consecutive frames share one Buffer) and writes each
//     connection at most once per tick;
//   * never offers extensions (no permessage-deflate), so every broker is
//     measured uncompressed.
// It answers pings, handles close frames and reassembles fragmented messages
// (rare: none of the measured brokers fragments small messages).

import net from 'node:net';
import tls from 'node:tls';
import { createHash, randomBytes, randomFillSync } from 'node:crypto';

const ACCEPT_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

// Every socket reads into this buffer; its bytes are only valid during the
// synchronous parse that follows the read.
const SHARED_READ = Buffer.allocUnsafe(256 * 1024);

// Masking keys come from a pool of random bytes, refilled when used up.
const MASK_POOL = randomBytes(64 * 1024);
let maskAt = 0;

const OUT_MAX_CHUNK = 64 * 1024;
const OUT_FIRST_CHUNK = 512; // idle connections send one small frame: keep them cheap

// Connections with unwritten output; flushed together once per tick.
const pendingFlush = [];
let flushQueued = false;
function flushAll() {
  flushQueued = false;
  for (let i = 0; i < pendingFlush.length; i++) pendingFlush[i]._flush();
  pendingFlush.length = 0;
}

function frameSize(len) {
  return (len < 126 ? 2 : len < 65536 ? 4 : 10) + 4 + len;
}

// Encode one masked frame whose payload is the concatenation of `parts` into
// `out` at `at`; returns the offset after it.
function putFrame(out, at, opcode, parts, len) {
  out[at++] = 0x80 | opcode;
  if (len < 126) {
    out[at++] = 0x80 | len;
  } else if (len < 65536) {
    out[at++] = 0x80 | 126;
    out[at++] = len >>> 8;
    out[at++] = len & 0xff;
  } else {
    out[at++] = 0x80 | 127;
    out.writeUInt32BE(Math.floor(len / 0x100000000), at);
    out.writeUInt32BE(len >>> 0, at + 4);
    at += 8;
  }
  if (maskAt + 4 > MASK_POOL.length) {
    randomFillSync(MASK_POOL);
    maskAt = 0;
  }
  const k0 = MASK_POOL[maskAt];
  const k1 = MASK_POOL[maskAt + 1];
  const k2 = MASK_POOL[maskAt + 2];
  const k3 = MASK_POOL[maskAt + 3];
  maskAt += 4;
  out[at] = k0;
  out[at + 1] = k1;
  out[at + 2] = k2;
  out[at + 3] = k3;
  at += 4;
  let j = 0;
  for (let p = 0; p < parts.length; p++) {
    const part = parts[p];
    const n = part.length;
    for (let i = 0; i < n; i++, j++) {
      const r = j & 3;
      out[at + j] = part[i] ^ (r === 0 ? k0 : r === 1 ? k1 : r === 2 ? k2 : k3);
    }
  }
  return at + len;
}

export class WsConn {
  constructor(socket) {
    this.socket = socket;
    this.closed = false;
    this.closeCode = null; // close code received (or 1006 for a dropped TCP connection)
    this.closeSent = false;
    this.onmessage = null; // (buf, start, end, opcode) => void
    this.onclose = null; // (code) => void
    // unparsed tail of the previous read (an owned copy)
    this.carry = null;
    // fragmented message being reassembled
    this.fragOpcode = 0;
    this.fragParts = null;
    // output: out[outStart..outEnd) is encoded but not yet handed to the socket
    this.out = null;
    this.outStart = 0;
    this.outEnd = 0;
    this.outNext = OUT_FIRST_CHUNK;
    this.queued = false;
    // protocol adapters keep their per-connection state here
    this.p = {};
  }

  get buffered() {
    return this.socket.writableLength + (this.outEnd - this.outStart);
  }

  // -- output ---------------------------------------------------------------

  _reserve(size) {
    if (this.out !== null && this.outEnd + size <= this.out.length) return;
    this._flush();
    const cap = Math.max(size, this.outNext);
    this.outNext = Math.min(OUT_MAX_CHUNK, this.outNext * 2);
    this.out = Buffer.allocUnsafe(cap);
    this.outStart = 0;
    this.outEnd = 0;
  }

  _flush() {
    this.queued = false;
    if (this.outEnd === this.outStart) return;
    // The socket keeps a reference to this slice until it is written; the
    // next frames go after it in the same Buffer (never overwriting it).
    const chunk = this.out.subarray(this.outStart, this.outEnd);
    this.outStart = this.outEnd;
    if (!this.closed) this.socket.write(chunk);
  }

  _schedule() {
    if (this.queued) return;
    this.queued = true;
    pendingFlush.push(this);
    if (!flushQueued) {
      flushQueued = true;
      process.nextTick(flushAll);
    }
  }

  sendFrame(opcode, parts) {
    if (this.closed || this.closeSent) return;
    let len = 0;
    for (let i = 0; i < parts.length; i++) len += parts[i].length;
    this._reserve(frameSize(len));
    this.outEnd = putFrame(this.out, this.outEnd, opcode, parts, len);
    this._schedule();
  }

  text(...parts) {
    this.sendFrame(1, parts);
  }

  binary(...parts) {
    this.sendFrame(2, parts);
  }

  // -- input ----------------------------------------------------------------

  _feed(src, from, to) {
    let buf = src;
    let pos = from;
    let end = to;
    if (this.carry !== null) {
      buf = Buffer.concat([this.carry, src.subarray(from, to)]);
      this.carry = null;
      pos = 0;
      end = buf.length;
    }
    while (end - pos >= 2) {
      const b0 = buf[pos];
      const b1 = buf[pos + 1];
      let len = b1 & 0x7f;
      let head = 2;
      if (len === 126) {
        if (end - pos < 4) break;
        len = (buf[pos + 2] << 8) | buf[pos + 3];
        head = 4;
      } else if (len === 127) {
        if (end - pos < 10) break;
        len = buf.readUInt32BE(pos + 2) * 0x100000000 + buf.readUInt32BE(pos + 6);
        head = 10;
      }
      const masked = (b1 & 0x80) !== 0; // a server must not mask; unmask anyway
      if (masked) head += 4;
      if (end - pos < head + len) break;
      const start = pos + head;
      const stop = start + len;
      if (masked) {
        for (let i = 0; i < len; i++) buf[start + i] ^= buf[start - 4 + (i & 3)];
      }
      pos = stop;
      const opcode = b0 & 0x0f;
      if (opcode >= 8) {
        this._control(opcode, buf, start, stop);
        if (this.closed) return;
        continue;
      }
      const fin = (b0 & 0x80) !== 0;
      if (fin && opcode !== 0) {
        if (this.onmessage !== null) this.onmessage(buf, start, stop, opcode);
        continue;
      }
      // fragment: first (opcode != 0, !fin), middle or last (opcode 0)
      if (opcode !== 0) {
        this.fragOpcode = opcode;
        this.fragParts = [];
      }
      if (this.fragParts === null) continue; // stray continuation
      this.fragParts.push(Buffer.from(buf.subarray(start, stop)));
      if (fin) {
        const whole = Buffer.concat(this.fragParts);
        this.fragParts = null;
        if (this.onmessage !== null) this.onmessage(whole, 0, whole.length, this.fragOpcode);
      }
    }
    if (pos < end) this.carry = Buffer.from(buf.subarray(pos, end));
  }

  _control(opcode, buf, start, stop) {
    if (opcode === 9) {
      this.sendFrame(10, [Buffer.from(buf.subarray(start, stop))]);
    } else if (opcode === 8) {
      this.closeCode = stop - start >= 2 ? (buf[start] << 8) | buf[start + 1] : 1005;
      if (!this.closeSent) this._sendClose(1000);
      this._flush();
      this.socket.end();
      this._gone(this.closeCode);
    }
  }

  _sendClose(code) {
    const body = Buffer.from([code >> 8, code & 0xff]);
    this.sendFrame(8, [body]);
    this.closeSent = true;
  }

  _gone(code) {
    if (this.closed) return;
    this.closed = true;
    if (this.closeCode === null) this.closeCode = code;
    if (this.onclose !== null) this.onclose(this.closeCode);
  }

  // -- control --------------------------------------------------------------

  pause() {
    this.socket.pause(); // with `onread`, this stops reading at the libuv level
  }

  resume() {
    this.socket.resume();
  }

  // Closing handshake; resolves when the TCP connection is gone (or after
  // `timeoutMs`, when it is destroyed).
  close(timeoutMs = 2000) {
    return new Promise((resolve) => {
      if (this.socket.destroyed) return resolve();
      this.socket.once('close', () => resolve());
      if (!this.closed && !this.closeSent) {
        this._sendClose(1000);
        this._flush();
      }
      setTimeout(() => this.socket.destroy(), timeoutMs).unref();
    });
  }

  destroy() {
    this.socket.destroy();
  }
}

// Open a WebSocket connection; resolves with a WsConn once the server's 101
// response has been checked.
export function wsConnect({ host, port, path, subprotocol = null, timeoutMs = 15000, useTls = false }) {
  return new Promise((resolve, reject) => {
    const key = randomBytes(16).toString('base64');
    const expectAccept = createHash('sha1').update(key + ACCEPT_GUID).digest('base64');
    let conn = null;
    let head = null; // response bytes until the blank line
    let settled = false;
    // wss:// (the benchmark's throw-away certificate is not verified) reads
    // into the same shared buffer: tls.connect takes `onread` as net.connect
    // does, so a TLS chunk costs no Buffer and no 'data' event either (with
    // 'data' events the generator spent 1.4 times the CPU per delivery in
    // fanout-1000 over wss:// and bounded the broker's figure).
    const onread = {
      buffer: SHARED_READ,
      callback(nread, buf) {
        if (conn !== null) conn._feed(buf, 0, nread);
        else onResponseBytes(buf, nread);
      },
    };
    const socket = useTls
      ? tls.connect({ host, port, rejectUnauthorized: false, onread })
      : net.connect({ host, port, onread });
    const timer = setTimeout(() => fail(new Error('handshake timeout')), timeoutMs);
    function fail(err) {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    }
    socket.on('error', (err) => {
      if (conn !== null) conn._gone(1006);
      else fail(err);
    });
    socket.on('close', () => {
      if (conn !== null) conn._gone(1006);
      else fail(new Error('connection closed during the handshake'));
    });
    socket.on(useTls ? 'secureConnect' : 'connect', () => {
      socket.setNoDelay(true);
      let req =
        `GET ${path} HTTP/1.1\r\nHost: ${host}:${port}\r\n` +
        'Upgrade: websocket\r\nConnection: Upgrade\r\n' +
        `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n`;
      if (subprotocol) req += `Sec-WebSocket-Protocol: ${subprotocol}\r\n`;
      socket.write(req + '\r\n');
    });
    function onResponseBytes(buf, nread) {
      if (settled) return;
      const bytes = Buffer.from(buf.subarray(0, nread));
      head = head === null ? bytes : Buffer.concat([head, bytes]);
      const blank = head.indexOf('\r\n\r\n');
      if (blank < 0) {
        if (head.length > 8192) fail(new Error('handshake response too long'));
        return;
      }
      const lines = head.toString('latin1', 0, blank).split('\r\n');
      if (!/^HTTP\/1\.1 101 /.test(lines[0] + ' ')) return fail(new Error(`handshake refused: ${lines[0]}`));
      const headers = new Map();
      for (const line of lines.slice(1)) {
        const colon = line.indexOf(':');
        if (colon > 0) headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
      }
      if (headers.get('sec-websocket-accept') !== expectAccept) return fail(new Error('bad Sec-WebSocket-Accept'));
      if (subprotocol && headers.get('sec-websocket-protocol') !== subprotocol)
        return fail(new Error(`server did not accept subprotocol ${subprotocol}`));
      settled = true;
      clearTimeout(timer);
      conn = new WsConn(socket);
      resolve(conn);
      const rest = head.subarray(blank + 4);
      // Frames that came with the response are parsed once the caller has
      // installed its handlers (its promise continuations run before the
      // check phase; no other read can happen before it).
      if (rest.length > 0) setImmediate(() => conn._feed(rest, 0, rest.length));
    }
  });
}
