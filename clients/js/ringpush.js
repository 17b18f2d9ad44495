// ringpush.js: the reference browser client for ringpush (PROTOCOL.md, v1).
//
// One ES module, no dependencies. It does what every client of the protocol must do:
// - connects with a token (asked again before every connection, since tokens expire),
//   and reconnects with jittered exponential backoff;
// - tracks the last seq seen per conversation, `sync`s every tracked conversation after
//   every `hello`, and again on a `gap` or when a seq is missing;
// - hands the application each conversation's messages exactly once and in seq order
//   (a message whose seq is not above the last one seen is dropped), its own sends
//   included once acknowledged, so every device of a user shows the same list;
// - sends idempotently: each `send` carries a client-made `cid`, and is sent again with
//   the same `cid` after `unavailable` or `rate_limited` and after a reconnect, until it
//   is acknowledged (the server answers a repeat with the seq it first assigned);
// - keeps each conversation's unread count: the last seq it knows (from `msg`, `ack`,
//   `gap` and `synced.last`) and the user's read mark (from `synced.read`, the `read`
//   frames of the user's other devices and its own `read()` calls), which only goes up;
//   `read()` moves it at once and tells the server (after the next hello if offline);
// - sends ephemeral `signal`s (typing, ...) to the members online now.
//
// Usage:
//   import { RingpushClient } from './ringpush.js';
//   const client = new RingpushClient({
//     url: 'wss://push.example.com/ws',
//     token: () => fetch('/my-backend/ringpush-token').then((r) => r.text()),
//     lastSeq: { c1: 41 },            // where this device stopped (e.g. from localStorage)
//   });
//   client.on('msg', (m) => render(m.conv, m.seq, m.from, m.body));
//   client.on('state', (s) => showStatus(s.state));
//   client.connect();
//   const ack = await client.send('c1', { text: 'hi' });   // { conv, cid, seq, ts }
//   client.on('unread', (u) => badge(u.conv, u.unread));     // { conv, unread, read, last }
//   client.read('c1');                                       // read up to the last seq known
//   client.on('signal', (s) => showTyping(s.conv, s.from, s.body));
//   client.signal('c1', { typing: true });

/**
 * Reconnect timing: attempt n waits `min(maxMs, initialMs * factor^n)`, of which the
 * fraction `jitter` is random, so a fleet of clients that lost the server together does
 * not come back together.
 * @typedef {object} Backoff
 * @property {number} initialMs  first delay (default 500)
 * @property {number} maxMs      cap (default 30000)
 * @property {number} factor     growth per attempt (default 2)
 * @property {number} jitter     0..1, the random share of each delay (default 0.5)
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} url  the server's `/ws` endpoint, `ws://` or `wss://`
 * @property {string | (() => string | Promise<string>)} token  a client token, or a
 *   function asked for one before every connection attempt
 * @property {string[]} [convs]  conversations to sync from seq 0 (their whole history
 *   window) unless `lastSeq` says where this device stopped
 * @property {Record<string, number>} [lastSeq]  the last seq this device has of each
 *   conversation; these are tracked and synced from there
 * @property {Partial<Backoff>} [backoff]  reconnect timing
 * @property {Partial<Backoff>} [retry]  timing of a send's retries after `unavailable`
 *   or `rate_limited` (default 250 ms doubling to 5 s)
 * @property {boolean} [watchNetwork]  in a browser, drop the connection on the window's
 *   `offline` event and reconnect at once on `online` (default true where available)
 * @property {number} [connectTimeoutMs]  an attempt that has not had the server's
 *   `hello` after this long is dropped and retried (default 10000)
 * @property {typeof WebSocket} [WebSocket]  the WebSocket class (default the global one)
 */

/**
 * A conversation message, as the server sent it or, for this connection's own sends,
 * as made from the `ack` (`own: true`).
 * @typedef {object} Message
 * @property {string} conv
 * @property {number} seq
 * @property {string} from
 * @property {string | null} dev
 * @property {string | null} cid
 * @property {number} ts
 * @property {any} body
 * @property {boolean} own  sent by this client (made from its `ack`)
 * @property {boolean} replayed  arrived in a `sync` replay rather than live
 */

/**
 * @typedef {object} Ack
 * @property {string} conv
 * @property {string} cid
 * @property {number} seq
 * @property {number} ts
 */

/**
 * A conversation's unread state, as the `unread` event carries it: `unread` is
 * `last - read` (never below 0).
 * @typedef {object} Unread
 * @property {string} conv
 * @property {number} unread  messages above the read mark
 * @property {number} read  the user's read mark: seqs up to it are read (0: none)
 * @property {number} last  the last seq this client knows of (0: none)
 */

/**
 * Connection states, in the order a client usually goes through them:
 * `idle` (never connected), `connecting`, `open` (the server said `hello`),
 * `reconnecting` (waiting `delayMs` before attempt `attempt`), `offline` (the browser
 * says there is no network; reconnects when it returns), `closed` (`disconnect()` was
 * called, or the server closed with 4001, disconnected through the API).
 * @typedef {'idle' | 'connecting' | 'open' | 'reconnecting' | 'offline' | 'closed'} State
 */

/** @type {Backoff} */
export const DEFAULT_BACKOFF = Object.freeze({ initialMs: 500, maxMs: 30000, factor: 2, jitter: 0.5 });

/** @type {Backoff} */
export const DEFAULT_RETRY = Object.freeze({ initialMs: 250, maxMs: 5000, factor: 2, jitter: 0.5 });

/** Error codes after which a send is given up (the others are retried). */
const FATAL_SEND_CODES = new Set(['bad_request', 'unknown_op', 'not_member']);

/** Close code of a disconnect through the API: the client does not come back on its own. */
const CLOSE_KICKED = 4001;

/** Syncs in a row that leave the same hole before the client stops asking and skips it. */
const MAX_FRUITLESS_SYNCS = 2;

/**
 * `read` and `signal` requests remembered by cid, so that an error names its
 * conversation; they get no answer on success, so only the latest are kept.
 */
const MAX_REMEMBERED_REQUESTS = 256;

/**
 * The `reconnect_after_ms=N` hint of a 1001 close reason (a draining server), or null.
 * @param {string} reason
 * @returns {number | null}
 */
export function reconnectHint(reason) {
  const m = /reconnect_after_ms=(\d+)/.exec(reason ?? '');
  return m ? Math.min(Number(m[1]), 300000) : null;
}

/**
 * The delay before reconnect attempt `attempt` (0 for the first retry).
 * @param {number} attempt
 * @param {Backoff} [backoff]
 * @param {() => number} [random]  a source of numbers in [0, 1)
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, backoff = DEFAULT_BACKOFF, random = Math.random) {
  const exp = backoff.initialMs * Math.pow(backoff.factor, Math.max(0, attempt));
  const base = Math.min(backoff.maxMs, exp);
  const jitter = Math.min(1, Math.max(0, backoff.jitter));
  return Math.round(base * (1 - jitter * random()));
}

/**
 * A fresh idempotency key for a `send`: 24 hex digits from the platform's CSPRNG
 * (`crypto.getRandomValues`, available in insecure contexts too), so two devices of one
 * user never pick the same one.
 * @returns {string}
 */
export function newCid() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** A send the server refused for good (`not_member`, `bad_request`), or dropped by `close()`. */
export class RingpushError extends Error {
  /**
   * @param {string} code  the protocol's error code, or `closed`
   * @param {string} message
   * @param {{cid?: string, conv?: string}} [where]
   */
  constructor(code, message, where = {}) {
    super(message);
    this.name = 'RingpushError';
    this.code = code;
    this.cid = where.cid ?? null;
    this.conv = where.conv ?? null;
  }
}

/**
 * The per-conversation state.
 * @typedef {object} ConvState
 * @property {number | null} last  the last seq handed to the application; null until
 *   the first message of a conversation the client was not told about
 * @property {Map<number, Message>} ahead  messages above `last + 1`, waiting for the hole
 * @property {number} syncing  syncs of this conversation in flight on this connection
 * @property {number} fruitless  syncs in a row that left `last` where it was with a hole
 * @property {number} top  the highest seq known to exist (msg, ack, gap, synced.last,
 *   where the device stopped); 0 when none
 * @property {number} read  the user's read mark, as far as this client knows; only goes up
 * @property {boolean} readOwed  this client moved `read` and the server has not been told
 */

/**
 * @typedef {object} PendingSend
 * @property {string} conv
 * @property {string} cid
 * @property {any} body
 * @property {number} attempts  transmissions so far
 * @property {ReturnType<typeof setTimeout> | null} timer  a retry waiting
 * @property {Promise<Ack>} promise
 * @property {(ack: Ack) => void} resolve
 * @property {(err: RingpushError) => void} reject
 */

/**
 * @param {number | null} last
 * @returns {ConvState}
 */
function newConvState(last) {
  return { last, ahead: new Map(), syncing: 0, fruitless: 0, top: last ?? 0, read: 0, readOwed: false };
}

export class RingpushClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    if (!options || !options.url) throw new TypeError('RingpushClient: options.url is required');
    if (!options.token) throw new TypeError('RingpushClient: options.token is required');
    this.url = options.url;
    this._token = options.token;
    /** @type {Backoff} */
    this.backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    /** @type {Backoff} */
    this.retry = { ...DEFAULT_RETRY, ...(options.retry ?? {}) };
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== 'function') {
      throw new TypeError('RingpushClient: no WebSocket class (pass options.WebSocket)');
    }
    /** @type {State} */
    this.state = 'idle';
    /** The server's `hello` on the current connection, or null. */
    this.hello = null;
    /** @type {Map<string, ConvState>} */
    this._convs = new Map();
    for (const conv of options.convs ?? []) this.track(conv, 0);
    for (const [conv, seq] of Object.entries(options.lastSeq ?? {})) this.track(conv, seq);
    /** @type {Map<string, PendingSend>} unacknowledged sends, oldest first */
    this._outbox = new Map();
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    /** @type {WebSocket | null} */
    this._ws = null;
    this._wanted = false;
    this._attempt = 0;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this._timer = null;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this._helloTimer = undefined;
    /** @type {Map<string, {conv: string, after: number}>} sync cid -> what it asked */
    this._syncs = new Map();
    this._syncSeq = 0;
    /** @type {Map<string, {op: 'read' | 'signal', conv: string}>} read/signal cid -> what it was */
    this._requests = new Map();
    this._requestSeq = 0;
    /** @type {ReturnType<typeof setTimeout> | null} a retry of owed read marks waiting */
    this._readTimer = null;
    const watch = (options.watchNetwork ?? true) && typeof globalThis.addEventListener === 'function'
      && typeof navigator !== 'undefined' && 'onLine' in navigator;
    /** Whether the browser says there is no network (then no attempt is made). */
    this._offline = watch && navigator.onLine === false;
    if (watch) {
      this._onOffline = () => this._networkLost();
      this._onOnline = () => this._networkBack();
      globalThis.addEventListener('offline', this._onOffline);
      globalThis.addEventListener('online', this._onOnline);
    }
  }

  // ---- events -----------------------------------------------------------------------

  /**
   * Listens for an event; returns a function that stops listening. Events:
   * - `state` `{state, attempt?, delayMs?, code?, reason?}`: see {@link State}
   * - `hello` the server's hello frame
   * - `msg` a {@link Message}: each seq of a conversation once, in order
   * - `ack` an {@link Ack} for one of this client's sends
   * - `push` `{body}`: a push (not sequenced, not stored)
   * - `synced` the server's `synced` frame
   * - `gap` the server's `gap` frame (the client syncs by itself)
   * - `incomplete` `{conv, after, first}`: history no longer reaches back to `after`;
   *   seqs `after + 1 .. first - 1` must be fetched from the backend
   * - `read` `{conv, seq, dev}`: the user's read mark moved on another of their
   *   connections (`dev` is that device, null for a read through the backend's API)
   * - `unread` an {@link Unread}: a conversation's read mark or last known seq moved
   * - `signal` `{conv, from, dev, body}`: an ephemeral signal of another connection of
   *   a member (this client's own signals do not come back)
   * - `error` `{code, message, cid, conv, op}`: an error frame (`op` is the request it
   *   answers when the client knows it: `send`, `sync`, `read` or `signal`), or a send
   *   given up
   * - `close` `{code, reason}`: the connection ended (a reconnect may follow)
   * - `frame` `{dir: 'in' | 'out', frame}`: every frame, for logs and debugging
   * @param {string} type
   * @param {(event: any) => void} fn
   * @returns {() => void}
   */
  on(type, fn) {
    let set = this._listeners.get(type);
    if (!set) this._listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  /**
   * @param {string} type
   * @param {(event: any) => void} fn
   */
  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  /**
   * @param {string} type
   * @param {any} event
   */
  _emit(type, event) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(event);
      } catch (err) {
        // A listener's bug must not break the protocol state machine.
        setTimeout(() => { throw err; });
      }
    }
  }

  /**
   * @param {State} state
   * @param {object} [detail]
   */
  _setState(state, detail = {}) {
    this.state = state;
    this._emit('state', { state, ...detail });
  }

  // ---- connection -------------------------------------------------------------------

  /** Connects (and keeps reconnecting until `disconnect()`). */
  connect() {
    this._wanted = true;
    if (this._ws || this._timer) return;
    if (this._offline) return this._setState('offline');
    this._open();
  }

  /**
   * Closes the connection and stops reconnecting. Unacknowledged sends stay queued and
   * go out on the next `connect()`.
   */
  disconnect() {
    this._wanted = false;
    this._clearTimer();
    this._drop(1000, 'client disconnect');
    this._setState('closed');
  }

  /** `disconnect()`, forgetting queued sends (their promises reject with `closed`). */
  close() {
    this.disconnect();
    for (const entry of this._outbox.values()) {
      if (entry.timer) clearTimeout(entry.timer);
      entry.reject(new RingpushError('closed', 'client closed before the send was acknowledged', entry));
    }
    this._outbox.clear();
    if (this._readTimer) clearTimeout(this._readTimer);
    this._readTimer = null;
    if (this._onOffline) {
      globalThis.removeEventListener('offline', this._onOffline);
      globalThis.removeEventListener('online', this._onOnline);
    }
  }

  async _open() {
    this._setState('connecting', { attempt: this._attempt });
    let token;
    try {
      token = typeof this._token === 'function' ? await this._token() : this._token;
    } catch (err) {
      this._emit('error', { code: 'token', message: `could not get a token: ${err?.message ?? err}` });
      return this._scheduleReconnect(0, 'no token');
    }
    if (!this._wanted || this._ws) return;
    const url = new URL(this.url, globalThis.location?.href);
    url.searchParams.set('token', token);
    let ws;
    try {
      ws = new this._WebSocket(url.toString());
    } catch (err) {
      this._emit('error', { code: 'connect', message: String(err?.message ?? err) });
      return this._scheduleReconnect(0, 'connect failed');
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = () => { opened = true; };
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(typeof event.data === 'string' ? event.data : String(event.data));
      } catch {
        return this._emit('error', { code: 'bad_frame', message: 'a frame that is not JSON' });
      }
      this._emit('frame', { dir: 'in', frame });
      this._onFrame(frame);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._closed(event.code, event.reason);
    };
    // Once open, an error is followed by a close, which decides what happens next. A
    // connection that fails before it opens is over at once (some WebSocket
    // implementations never follow that error with a close).
    ws.onerror = () => {
      if (this._ws === ws && !opened) this._closed(1006, 'connection failed');
    };
    // A server that takes the connection but never says hello is given up on too.
    this._helloTimer = setTimeout(() => {
      if (this._ws === ws && !this.hello) this._closed(1006, 'no hello in time');
    }, this.connectTimeoutMs);
  }

  /**
   * Lets go of the current socket at once (its late events are ignored).
   * @param {number} code
   * @param {string} reason
   */
  _drop(code, reason) {
    const ws = this._ws;
    if (!ws) return;
    this._ws = null;
    try {
      ws.close(code, reason);
    } catch {
      // Already closing or never opened: nothing to tell the server.
    }
    this._afterClose(code, reason);
  }

  /**
   * The server or the network ended the connection.
   * @param {number} code
   * @param {string} reason
   */
  _closed(code, reason) {
    const ws = this._ws;
    this._ws = null;
    if (ws && ws.readyState < 2) {
      try {
        ws.close();
      } catch {
        // Never opened: nothing to close.
      }
    }
    this._afterClose(code, reason);
    if (code === CLOSE_KICKED) {
      this._wanted = false;
      return this._setState('closed', { code, reason });
    }
    if (!this._wanted) return this._setState('closed', { code, reason });
    if (this._offline) return this._setState('offline', { code, reason });
    this._scheduleReconnect(code, reason);
  }

  /**
   * What every end of a connection resets: in-flight syncs (asked again after the next
   * hello) and retry timers (every unacknowledged send goes again after the next hello).
   * @param {number} code
   * @param {string} reason
   */
  _afterClose(code, reason) {
    this.hello = null;
    clearTimeout(this._helloTimer);
    this._syncs.clear();
    this._requests.clear();
    for (const c of this._convs.values()) c.syncing = 0;
    for (const entry of this._outbox.values()) {
      if (entry.timer) clearTimeout(entry.timer);
      entry.timer = null;
    }
    this._emit('close', { code, reason });
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  _scheduleReconnect(code, reason) {
    if (!this._wanted) return this._setState('closed');
    // A draining server (1001) says when to come back, spread over its clients.
    const hinted = code === 1001 ? reconnectHint(reason) : null;
    const delayMs = hinted ?? backoffDelay(this._attempt, this.backoff);
    this._attempt += 1;
    this._setState('reconnecting', { attempt: this._attempt, delayMs, code, reason });
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this._wanted && !this._ws) this._open();
    }, delayMs);
  }

  _clearTimer() {
    if (this._timer) clearTimeout(this._timer);
    this._timer = null;
  }

  _networkLost() {
    this._offline = true;
    this._clearTimer();
    if (this._wanted) {
      this._drop(1000, 'network offline');
      this._setState('offline');
    }
  }

  _networkBack() {
    this._offline = false;
    if (this._wanted && !this._ws) {
      this._clearTimer();
      this._attempt = 0;
      this._open();
    }
  }

  /** @param {object} frame */
  _send(frame) {
    const ws = this._ws;
    if (!ws || this.state !== 'open') return false;
    try {
      ws.send(JSON.stringify(frame));
    } catch {
      return false;
    }
    this._emit('frame', { dir: 'out', frame });
    return true;
  }

  // ---- conversations ----------------------------------------------------------------

  /**
   * Tracks a conversation: it is synced from `after` now (when connected) and after
   * every reconnect. Tracking one already tracked changes nothing.
   * @param {string} conv
   * @param {number} [after]  the last seq this device has (0: none)
   */
  track(conv, after = 0) {
    const c = this._convs.get(conv);
    if (c && c.last !== null) return;
    if (c) c.last = after;
    else this._convs.set(conv, newConvState(after));
    this._moved(conv, after, 0);
    if (this.state === 'open') this._sync(conv, after);
  }

  /**
   * Stops tracking a conversation (no more syncs; its messages are still delivered while
   * the user is a member). Its unread state is forgotten too.
   * @param {string} conv
   */
  untrack(conv) {
    this._convs.delete(conv);
  }

  /**
   * The last seq handed to the application for each tracked conversation: what to store
   * and pass back as `lastSeq` next time.
   * @returns {Record<string, number>}
   */
  positions() {
    /** @type {Record<string, number>} */
    const out = {};
    for (const [conv, c] of this._convs) if (c.last !== null) out[conv] = c.last;
    return out;
  }

  /**
   * @param {string} conv
   * @returns {ConvState}
   */
  _conv(conv) {
    let c = this._convs.get(conv);
    if (!c) {
      c = newConvState(null);
      this._convs.set(conv, c);
    }
    return c;
  }

  // ---- read marks and unread counts -------------------------------------------------

  /**
   * The number of messages of `conv` above the user's read mark, as far as this client
   * knows (the last seq it knows minus the read mark); 0 for a conversation it knows
   * nothing of.
   * @param {string} conv
   * @returns {number}
   */
  unread(conv) {
    const c = this._convs.get(conv);
    return c ? Math.max(0, c.top - c.read) : 0;
  }

  /**
   * The user's read mark in `conv` (seqs up to it are read; 0: none), as far as this
   * client knows: the highest of `synced.read`, the `read` frames of the user's other
   * devices and this client's own `read()` calls.
   * @param {string} conv
   * @returns {number}
   */
  readMark(conv) {
    return this._convs.get(conv)?.read ?? 0;
  }

  /**
   * Every known conversation's {@link Unread} state, by conversation.
   * @returns {Record<string, Unread>}
   */
  unreads() {
    /** @type {Record<string, Unread>} */
    const out = {};
    for (const conv of this._convs.keys()) out[conv] = this._unreadOf(conv);
    return out;
  }

  /**
   * Marks `conv` read up to `seq` for this user, on every device: the local read mark
   * moves at once (an `unread` event), only ever up, and the server is told (its other
   * connections get a `read` frame). Without `seq`, up to the last seq this client
   * knows. A `seq` above the last seq the client knows is taken as that seq, as the
   * server does with its own last seq, so messages this device never saw are not marked
   * read (and a conversation it knows no seq of has nothing to mark). While
   * disconnected the mark is sent after the next `hello`; after `unavailable` it is sent
   * again. Errors (`not_member`) are `error` events with `op: 'read'`.
   * @param {string} conv
   * @param {number} [seq]  the last seq read (default: the last one known)
   * @returns {number} the read mark now
   */
  read(conv, seq) {
    if (seq !== undefined && !(Number.isSafeInteger(seq) && seq >= 0)) {
      throw new TypeError('RingpushClient.read: seq must be an integer >= 0');
    }
    const c = this._conv(conv);
    // Nothing known of the conversation (no seq): nothing to mark.
    const mark = Math.min(seq ?? c.top, c.top);
    if (mark <= c.read) return c.read;
    this._moved(conv, 0, mark);
    c.readOwed = true;
    this._sendRead(conv, c);
    return c.read;
  }

  /**
   * Tells the server `conv`'s read mark, if it is owed and the connection is open.
   * @param {string} conv
   * @param {ConvState} c
   */
  _sendRead(conv, c) {
    if (!c.readOwed) return;
    const cid = `read-${++this._requestSeq}`;
    if (!this._send({ op: 'read', conv, seq: c.read, cid })) return;
    c.readOwed = false;
    this._remember(cid, 'read', conv);
  }

  /**
   * Raises what is known of a conversation: its last seq to at least `last`, its read
   * mark to at least `read`; emits `unread` when either moved.
   * @param {string} conv
   * @param {number} last
   * @param {number} read
   */
  _moved(conv, last, read) {
    const c = this._convs.get(conv);
    if (!c) return;
    // A read mark is never above the conversation's last seq (the server clamps it).
    const top = Math.max(c.top, last, read);
    const mark = Math.max(c.read, read);
    if (top === c.top && mark === c.read) return;
    c.top = top;
    c.read = mark;
    this._emit('unread', this._unreadOf(conv));
  }

  /**
   * @param {string} conv
   * @returns {Unread}
   */
  _unreadOf(conv) {
    return { conv, unread: this.unread(conv), read: this.readMark(conv), last: this._convs.get(conv)?.top ?? 0 };
  }

  /**
   * Keeps what a `read` or `signal` was, for its error; only the latest few.
   * @param {string} cid
   * @param {'read' | 'signal'} op
   * @param {string} conv
   */
  _remember(cid, op, conv) {
    this._requests.set(cid, { op, conv });
    if (this._requests.size > MAX_REMEMBERED_REQUESTS) {
      this._requests.delete(this._requests.keys().next().value);
    }
  }

  /**
   * Asks for the messages of `conv` after `after`.
   * @param {string} conv
   * @param {number} after
   */
  _sync(conv, after) {
    const cid = `sync-${++this._syncSeq}`;
    if (!this._send({ op: 'sync', conv, after, cid })) return;
    this._conv(conv).syncing += 1;
    this._syncs.set(cid, { conv, after });
  }

  /**
   * Takes a message in: dropped if not above the last seq, handed over when it is the
   * next one, kept while a hole is before it (and a sync asked for the hole).
   * @param {Message} m
   */
  _accept(m) {
    const c = this._conv(m.conv);
    if (c.last === null) c.last = m.seq - 1;
    if (m.seq <= c.last || c.ahead.has(m.seq)) return;
    c.ahead.set(m.seq, m);
    this._drain(m.conv, c);
  }

  /**
   * Hands over the messages that follow `last` without a hole; with a hole left and no
   * sync in flight, asks for it.
   * @param {string} conv
   * @param {ConvState} c
   */
  _drain(conv, c) {
    if (c.last === null) return;
    while (c.ahead.has(c.last + 1)) {
      const m = /** @type {Message} */ (c.ahead.get(c.last + 1));
      c.ahead.delete(c.last + 1);
      c.last += 1;
      c.fruitless = 0;
      this._emit('msg', m);
    }
    if (c.ahead.size > 0 && c.syncing === 0 && this.state === 'open') {
      if (c.fruitless >= MAX_FRUITLESS_SYNCS) {
        // The server has answered twice without the missing seqs: history does not
        // have them. Say so and go on from what is there.
        const first = Math.min(...c.ahead.keys());
        this._emit('incomplete', { conv, after: c.last, first });
        c.last = first - 1;
        c.fruitless = 0;
        return this._drain(conv, c);
      }
      this._sync(conv, c.last);
    }
  }

  // ---- frames -----------------------------------------------------------------------

  /** @param {any} f */
  _onFrame(f) {
    switch (f.op) {
      case 'hello':
        return this._onHello(f);
      case 'msg':
        this._accept({
          conv: f.conv, seq: f.seq, from: f.from, dev: f.dev ?? null, cid: f.cid ?? null,
          ts: f.ts, body: f.body, own: false, replayed: this._conv(f.conv).syncing > 0,
        });
        return this._moved(f.conv, f.seq, 0);
      case 'ack':
        return this._onAck(f);
      case 'push':
        return this._emit('push', { body: f.body });
      case 'synced':
        return this._onSynced(f);
      case 'gap':
        return this._onGap(f);
      case 'read':
        this._conv(f.conv);
        this._emit('read', { conv: f.conv, seq: f.seq, dev: f.dev ?? null });
        return this._moved(f.conv, f.seq, f.seq);
      case 'signal':
        return this._emit('signal', { conv: f.conv, from: f.from, dev: f.dev ?? null, body: f.body });
      case 'error':
        return this._onError(f);
      default:
        // Frames of a later protocol version: ignored, visible through `frame`.
        return undefined;
    }
  }

  /** @param {any} hello */
  _onHello(hello) {
    this.hello = hello;
    this._attempt = 0;
    this._setState('open', { hello });
    this._emit('hello', hello);
    // Read marks made while disconnected first: the syncs' `synced.read` then has them.
    for (const [conv, c] of this._convs) this._sendRead(conv, c);
    for (const [conv, c] of this._convs) {
      if (c.last !== null) this._sync(conv, c.last);
    }
    for (const entry of this._outbox.values()) this._transmit(entry);
  }

  /** @param {any} f */
  _onSynced(f) {
    const c = this._conv(f.conv);
    c.syncing = Math.max(0, c.syncing - 1);
    for (const [cid, s] of this._syncs) {
      if (s.conv === f.conv) {
        this._syncs.delete(cid);
        break;
      }
    }
    this._emit('synced', f);
    this._moved(f.conv, f.last ?? 0, f.read ?? 0);
    if (!f.complete && c.last !== null) {
      // History starts after where this device stopped: go on from its first message.
      const first = c.ahead.size > 0 ? Math.min(...c.ahead.keys()) : f.last + 1;
      if (first > c.last + 1) {
        this._emit('incomplete', { conv: f.conv, after: c.last, first });
        c.last = first - 1;
      }
    }
    const before = c.last;
    this._drain(f.conv, c);
    if (c.ahead.size > 0 && c.last === before) c.fruitless += 1;
  }

  /** @param {any} f */
  _onGap(f) {
    this._emit('gap', f);
    const c = this._conv(f.conv);
    const after = c.last === null ? f.from - 1 : Math.min(c.last, f.from - 1);
    if (c.last === null) c.last = after;
    this._moved(f.conv, f.to, 0);
    // The server holds this conversation's live messages until this sync, whose replay
    // carries everything from the gap on.
    this._sync(f.conv, after);
  }

  /** @param {any} f */
  _onError(f) {
    /** @type {{code: string, message: string, cid: string | null, conv: string | null, op: string | null}} */
    const event = { code: f.code, message: f.message, cid: f.cid ?? null, conv: null, op: null };
    const request = f.cid ? this._requests.get(f.cid) : undefined;
    if (request) {
      this._requests.delete(f.cid);
      event.conv = request.conv;
      event.op = request.op;
      const c = this._convs.get(request.conv);
      if (request.op === 'read' && c && (f.code === 'unavailable' || f.code === 'rate_limited')) {
        // Not stored: tell the server again (the mark as it is then) after a while.
        c.readOwed = true;
        this._retryReads();
      }
      return this._emit('error', event);
    }
    const sync = f.cid ? this._syncs.get(f.cid) : undefined;
    if (sync) {
      this._syncs.delete(f.cid);
      const c = this._convs.get(sync.conv);
      event.conv = sync.conv;
      event.op = 'sync';
      if (c) c.syncing = Math.max(0, c.syncing - 1);
      if (f.code === 'not_member') {
        this.untrack(sync.conv);
      } else if (c && this.state === 'open') {
        // `unavailable`: ask again once the store is back.
        const ws = this._ws;
        setTimeout(() => {
          if (this._ws === ws && this._convs.get(sync.conv) === c && c.last !== null) {
            this._sync(sync.conv, c.last);
          }
        }, backoffDelay(0, this.retry));
      }
      return this._emit('error', event);
    }
    const entry = f.cid ? this._outbox.get(f.cid) : undefined;
    if (!entry) return this._emit('error', event);
    event.conv = entry.conv;
    event.op = 'send';
    if (FATAL_SEND_CODES.has(f.code)) {
      this._outbox.delete(entry.cid);
      entry.reject(new RingpushError(f.code, f.message, entry));
      return this._emit('error', event);
    }
    // `unavailable` (not accepted; the same cid may be retried) or `rate_limited`.
    this._emit('error', event);
    const ws = this._ws;
    const delay = backoffDelay(entry.attempts - 1, this.retry);
    entry.timer = setTimeout(() => {
      entry.timer = null;
      if (this._ws === ws && this._outbox.get(entry.cid) === entry) this._transmit(entry);
    }, delay);
  }

  /** Sends the owed read marks after the retry delay (once, for all of them). */
  _retryReads() {
    if (this._readTimer) return;
    this._readTimer = setTimeout(() => {
      this._readTimer = null;
      for (const [conv, c] of this._convs) this._sendRead(conv, c);
    }, backoffDelay(0, this.retry));
  }

  /** @param {any} f */
  _onAck(f) {
    const entry = this._outbox.get(f.cid);
    /** @type {Ack} */
    const ack = { conv: f.conv, cid: f.cid, seq: f.seq, ts: f.ts };
    if (entry) {
      this._outbox.delete(f.cid);
      if (entry.timer) clearTimeout(entry.timer);
    }
    this._emit('ack', ack);
    if (entry) {
      this._accept({
        conv: f.conv, seq: f.seq, from: this.hello?.user ?? '', dev: this.hello?.device ?? null,
        cid: f.cid, ts: f.ts, body: entry.body, own: true, replayed: false,
      });
      entry.resolve(ack);
    }
    this._moved(f.conv, f.seq, 0);
  }

  // ---- sending ----------------------------------------------------------------------

  /**
   * Sends `body` into `conv`. Resolves with the server's ack once the message is
   * sequenced; it is then also delivered as a `msg` event (`own: true`) in its place in
   * the conversation's order. Queued while disconnected; sent again with the same `cid`
   * after `unavailable`, `rate_limited` or a reconnect. Rejects with a
   * {@link RingpushError} on `not_member` or `bad_request`, or on `close()`.
   * @param {string} conv
   * @param {any} body  any JSON value
   * @param {{cid?: string}} [options]  `cid`: the idempotency key (default a fresh one);
   *   sending the same cid again returns the first send's promise
   * @returns {Promise<Ack>}
   */
  send(conv, body, options = {}) {
    const cid = options.cid ?? newCid();
    const existing = this._outbox.get(cid);
    if (existing) return existing.promise;
    /** @type {PendingSend} */
    const entry = /** @type {any} */ ({ conv, cid, body, attempts: 0, timer: null });
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    // Failures are also `error` events: a send nobody awaits must not be an unhandled rejection.
    entry.promise.catch(() => {});
    this._outbox.set(cid, entry);
    this._conv(conv);
    this._transmit(entry);
    return entry.promise;
  }

  /** The sends not yet acknowledged, oldest first. */
  pending() {
    return [...this._outbox.values()].map(({ conv, cid, body, attempts }) => ({ conv, cid, body, attempts }));
  }

  /**
   * Sends an ephemeral signal (typing, recording, ...) into `conv`: every other
   * connection of every member online now gets it as a `signal` event, the user's other
   * devices included; this connection does not. Best-effort: not queued while
   * disconnected, never stored or retried. Errors (`not_member`, `bad_request` for a
   * body over `limits.max_signal_bytes`, `rate_limited`) are `error` events with
   * `op: 'signal'`.
   * @param {string} conv
   * @param {any} body  any JSON value
   * @returns {boolean} whether it went out (false when not connected)
   */
  signal(conv, body) {
    const cid = `signal-${++this._requestSeq}`;
    if (!this._send({ op: 'signal', conv, body, cid })) return false;
    this._remember(cid, 'signal', conv);
    return true;
  }

  /** @param {PendingSend} entry */
  _transmit(entry) {
    if (entry.timer) return;
    if (this._send({ op: 'send', conv: entry.conv, cid: entry.cid, body: entry.body })) {
      entry.attempts += 1;
    }
  }
}
