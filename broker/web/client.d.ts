// Type declarations of client.js, trio-broker's JavaScript client (docs/browser.md).

export declare const VERSION: string;
export declare const SUBPROTOCOLS: Readonly<{ json: "broker.v1.json"; msgpack: "broker.v1.msgpack" }>;
export declare const MAX_TOPICS: number;
export declare const MAX_HISTORY_REQUEST: number;
export declare const FINAL_CLOSE_CODES: readonly number[];
export declare const CLOSED_BY_CLIENT: string;

/** Any JSON value: what a message carries. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

// -- errors -------------------------------------------------------------------

export declare class ClientError extends Error {}

/** The first connection could not be made (a browser never sees the HTTP status: `status` is null). */
export declare class ConnectError extends ClientError {
  constructor(status: number | null, reason: string, reachable?: boolean | null);
  readonly status: number | null;
  readonly reason: string;
  /** The broker answered plain HTTP at that address (so it refused the handshake), or not; null: unknown. */
  readonly reachable: boolean | null;
}

export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "invalid"
  | "too_large"
  | "rate_limited"
  | "limit"
  | "internal";

/** The broker answered `err`. */
export declare class ServerError extends ClientError {
  constructor(code: string, message: string);
  readonly code: ErrorCode | string;
  /** The broker's explanation. */
  readonly serverMessage: string;
}
export declare class BadRequest extends ServerError {}
export declare class Unauthorized extends ServerError {}
export declare class Forbidden extends ServerError {}
export declare class Invalid extends ServerError {}
export declare class TooLarge extends ServerError {}
export declare class RateLimited extends ServerError {}
export declare class LimitExceeded extends ServerError {}
export declare class InternalError extends ServerError {}
export declare class Unavailable extends ServerError {}
export declare function serverError(code: string, message: string): ServerError;

/** The client is closed for good. */
export declare class Disconnected extends ClientError {
  constructor(code: number | null, reason: string);
  readonly code: number | null;
  readonly reason: string;
}
/** The connection was lost under this request (or not back within waitTimeout); the client is reconnecting. */
export declare class ConnectionLost extends Disconnected {}
/** Reconnecting gave up after `attempts` failed attempts. */
export declare class ReconnectFailed extends Disconnected {
  readonly error: ConnectError;
  readonly attempts: number;
}

// -- topics ---------------------------------------------------------------------

export declare function validateTopic(topic: string): string;
export declare function validatePattern(pattern: string): string;
export declare function patternMatches(pattern: string, topic: string): boolean;
export declare function reconnectAfterClose(code: number | null): boolean;
/** The `exp` claim of a JWT, in seconds since the epoch; null for other tokens. */
export declare function tokenExpiry(token: string): number | null;

// -- what a subscription's handler receives -----------------------------------------

export interface MessageItem {
  type: "message";
  topic: string;
  seq: number;
  data: Json;
  key: string | null;
  /** Set on the first message of an epoch (seq 1). */
  epoch: string | null;
  /** Part of a snapshot (the latest per topic and key), not live. */
  snapshot: boolean;
}
/**
 * The broker dropped `count` messages of `topic` for this connection: the
 * page read too slowly, or this subscription's replay (history, snapshot)
 * did not fit the queue (then it comes first, before the replay).
 */
export interface DroppedItem {
  type: "dropped";
  /** The topic, or ">" for topics the broker no longer reports apart. */
  topic: string;
  count: number;
}
export interface Member {
  subject: string;
  connections: number;
  [field: string]: Json;
}
export interface JoinItem {
  type: "join";
  topic: string;
  member: Member;
}
export interface LeaveItem {
  type: "leave";
  topic: string;
  member: Member;
}
export interface InterruptedItem {
  type: "interrupted";
  code: number | null;
  reason: string;
}
export interface ReconnectedItem {
  type: "reconnected";
  attempts: number;
}
export type ResyncReason = "not_recovered" | "no_history" | "too_many_topics" | "epoch_changed";
export interface ResyncItem {
  type: "resync";
  /** The topic, or the subscription's pattern when it is about every topic under it. */
  topic: string;
  epoch: string | null;
  /** The stream continues after this seq, when known. */
  seq: number | null;
  /** For a pattern: the topics whose missed messages could not be replayed. */
  lost: string[];
  /** For a pattern: topics the broker forgot may have had messages. */
  unknown: boolean;
  reason: ResyncReason;
}
/** The last item: the client closed for good, or the broker refused to resubscribe
 * (an `unavailable` answer is retried first). */
export interface ClosedItem {
  type: "closed";
  error: Disconnected | ServerError;
}
export type Item =
  | MessageItem
  | DroppedItem
  | JoinItem
  | LeaveItem
  | InterruptedItem
  | ReconnectedItem
  | ResyncItem
  | ClosedItem;

// -- results ----------------------------------------------------------------------

export interface Position {
  epoch: string;
  seq: number;
}
export interface History {
  topic: string;
  epoch: string | null;
  seq: number | null;
  messages: MessageItem[];
  more: boolean;
  recovered: boolean | null;
}
export interface Presence {
  count: number;
  connections: number;
  members: Member[] | null;
}

// -- options and events ---------------------------------------------------------------

export interface ReconnectOptions {
  /** Seconds: the ceiling of the first delay (0.1). */
  initialDelay?: number;
  /** Seconds: the ceiling of every delay (30). */
  maxDelay?: number;
  /** Growth of the ceiling per failed attempt (2). */
  factor?: number;
  /** Failed attempts in a row before giving up, and `unavailable` answers in a row
   * before a resubscription gives up; null: never (null). */
  maxAttempts?: number | null;
  /** Seconds a request made while reconnecting waits for the connection (10). */
  waitTimeout?: number;
}

export declare class Reconnect {
  constructor(options?: ReconnectOptions);
  readonly initialDelay: number;
  readonly maxDelay: number;
  readonly factor: number;
  readonly maxAttempts: number | null;
  readonly waitTimeout: number;
  ceiling(attempt: number): number;
  delay(attempt: number, random?: () => number): number;
  givesUp(failures: number): boolean;
}

export interface MessagePackLike {
  encode(value: unknown, options?: { ignoreUndefined?: boolean }): Uint8Array;
  decode(data: Uint8Array): unknown;
}

export interface ConnectOptions {
  /** Sent as `?token=` (browsers cannot set headers on a WebSocket). */
  token?: string | null;
  /** Instead of token: called before every connection attempt, and before a JWT's exp (then sent with `auth`). */
  getToken?: (() => string | Promise<string>) | null;
  encoding?: "json" | "msgpack";
  /** The @msgpack/msgpack module (default: the global MessagePack of its UMD build). */
  msgpack?: MessagePackLike | null;
  /** Seconds for the WebSocket handshake (10). */
  connectTimeout?: number;
  /** true (default settings), false (a lost connection closes the client), or settings. */
  reconnect?: boolean | ReconnectOptions;
  /** Seconds without a frame from the broker before a ping checks the connection (30); 0: off. */
  keepalive?: number;
  /** Seconds a liveness ping may take before the connection is taken for lost (10). */
  pingTimeout?: number;
}

export interface SubscribeOptions {
  /** First replay up to that many stored messages (1 to 1000). */
  history?: number | null;
  /** First the latest message per topic and key (again after a resync). */
  snapshot?: boolean;
  /** Also join/leave items (an exact topic with a presence rule). */
  presence?: boolean;
}

export interface ClientEvents {
  connected: { attempts: number };
  disconnected: { code: number | null; reason: string; reconnecting: boolean };
  reconnecting: { attempt: number; delay: number; error: ConnectError | null };
  dropped: { topic: string; count: number };
  resync: ResyncItem & { pattern: string };
  error: Error;
  closed: { code: number | null; reason: string; error: Disconnected };
}

export declare class Subscription {
  readonly pattern: string;
  readonly presence: boolean;
  readonly active: boolean;
  unsubscribe(): Promise<void>;
}

export declare class Client {
  constructor(url: string, options?: ConnectOptions);
  readonly url: string;
  readonly encoding: "json" | "msgpack";
  readonly reconnects: number;
  readonly connected: boolean;
  readonly closed: boolean;
  on<E extends keyof ClientEvents>(event: E, listener: (detail: ClientEvents[E]) => void): () => void;
  off<E extends keyof ClientEvents>(event: E, listener: (detail: ClientEvents[E]) => void): void;
  publish(topic: string, data: Json, options?: { key?: string | null; ack?: true }): Promise<number>;
  publish(topic: string, data: Json, options: { key?: string | null; ack: false }): Promise<undefined>;
  subscribe(pattern: string, handler: (item: Item) => void): Promise<Subscription>;
  subscribe(pattern: string, options: SubscribeOptions, handler: (item: Item) => void): Promise<Subscription>;
  history(
    topic: string,
    options?: { since?: Position | [string, number] | null; limit?: number },
  ): Promise<History>;
  presence(topic: string): Promise<Presence>;
  ping(): Promise<number>;
  refresh(token: string): Promise<void>;
  close(): Promise<void>;
}

export declare class Positions {
  constructor(pattern: string, maxTopics?: number);
  readonly pattern: string;
  cursor: string | null;
  resumable: boolean;
  overflowed: boolean;
  readonly size: number;
}

export declare function connect(url: string, options?: ConnectOptions): Promise<Client>;
