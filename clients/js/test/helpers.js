// Test harness shared by the node tests and the browser tests: a real `ringpush serve`
// on free loopback ports, tokens, the admin API, and a TCP proxy that can cut or stall
// the connections through it. Every wait is bounded and polls for an event; nothing
// sleeps hoping something happened.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
export const API_KEY = 'test-api-key';
export const SECRET = 'test-secret-0123';

/** The server binary: `$RINGPUSH_BIN`, else the release build, else the debug build. */
export function ringpushBin() {
  if (process.env.RINGPUSH_BIN) return resolve(process.env.RINGPUSH_BIN);
  for (const profile of ['release', 'debug']) {
    const bin = join(REPO, 'target', profile, 'ringpush');
    if (existsSync(bin)) return bin;
  }
  throw new Error('no ringpush binary: run `cargo build --release` or set RINGPUSH_BIN');
}

/** The configuration every test server starts from; a test's own keys are merged over it. */
const BASE = {
  listen: '127.0.0.1:0',
  admin_listen: '127.0.0.1:0',
  shards: 2,
  api_key: API_KEY,
  auth: { secret: SECRET },
  heartbeat: { ping_interval_ms: 1000, idle_timeout_ms: 5000 },
  diagnostics: { demo: true },
};

/** @param {Record<string, any>} config  one level of sections */
function toToml(config) {
  const scalar = (v) => (typeof v === 'string' ? JSON.stringify(v) : String(v));
  const top = [];
  const sections = [];
  for (const [key, value] of Object.entries(config)) {
    if (value && typeof value === 'object' && !Array.isArray(value)) {
      sections.push(`[${key}]`, ...Object.entries(value).map(([k, v]) => `${k} = ${scalar(v)}`));
    } else {
      top.push(`${key} = ${Array.isArray(value) ? JSON.stringify(value) : scalar(value)}`);
    }
  }
  return [...top, ...sections].join('\n') + '\n';
}

/** @param {Record<string, any>} base @param {Record<string, any>} extra */
function merge(base, extra) {
  const out = { ...base };
  for (const [k, v] of Object.entries(extra)) {
    out[k] = v && typeof v === 'object' && !Array.isArray(v) && typeof out[k] === 'object'
      ? { ...out[k], ...v } : v;
  }
  return out;
}

/**
 * Polls `check` until it returns a truthy value, which is returned.
 * @template T
 * @param {() => T | Promise<T>} check
 * @param {{timeoutMs?: number, what?: string, everyMs?: number}} [options]
 * @returns {Promise<T>}
 */
export async function waitFor(check, { timeoutMs = 10000, what = 'condition', everyMs = 20 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** An HS256 client token, as the backend would sign it. */
export function mintToken(user, device, { ttlSecs = 3600, secret = SECRET } = {}) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const exp = Math.floor(Date.now() / 1000) + ttlSecs;
  const unsigned = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, dev: device, exp })}`;
  const sig = createHmac('sha256', secret).update(unsigned).digest('base64url');
  return `${unsigned}.${sig}`;
}

/**
 * Starts `ringpush serve` with `extra` merged over the base configuration and returns
 * once it logged its addresses and `/readyz` answers 200.
 * @param {Record<string, any>} [extra]
 */
export async function startServer(extra = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'ringpush-js-'));
  const configPath = join(dir, 'ringpush.toml');
  writeFileSync(configPath, toToml(merge(BASE, extra)));
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('RINGPUSH_')));
  const child = spawn(ringpushBin(), ['serve', '--config', configPath], {
    env: { ...env, RUST_LOG: 'info' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const log = [];
  let exited = null;
  child.on('exit', (code, signal) => { exited = { code, signal }; });
  let partial = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    const lines = (partial + chunk).split('\n');
    partial = lines.pop() ?? '';
    log.push(...lines);
  });
  const line = await waitFor(() => {
    if (exited) throw new Error(`ringpush exited (${JSON.stringify(exited)}):\n${log.join('\n')}`);
    return log.find((l) => l.includes('listening client='));
  }, { timeoutMs: 20000, what: 'the listening line' });
  const field = (name) => line.replace(/\x1b\[[0-9;]*m/g, '').split(/\s+/).find((w) => w.startsWith(name))?.slice(name.length);
  const server = {
    client: field('client='),
    admin: field('admin='),
    log,
    dir,
    pid: child.pid,
    /** `ws://.../ws` */
    get wsUrl() { return `ws://${this.client}/ws`; },
    token: (user, device, options) => mintToken(user, device, options),
    /** An admin API call; resolves with `{status, body}` (body parsed when JSON). */
    async api(method, path, body) {
      const res = await fetch(`http://${this.admin}${path}`, {
        method,
        headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await res.text();
      let parsed = text;
      try { parsed = JSON.parse(text); } catch { /* not JSON */ }
      return { status: res.status, body: parsed };
    },
    async members(conv, users) {
      const res = await this.api('PUT', `/api/v1/conversations/${conv}/members`, { users });
      if (res.status !== 200) throw new Error(`members: ${res.status} ${JSON.stringify(res.body)}`);
    },
    async post(conv, from, body) {
      const res = await this.api('POST', `/api/v1/conversations/${conv}/messages`, { from, body });
      if (res.status !== 200) throw new Error(`post: ${res.status} ${JSON.stringify(res.body)}`);
      return res.body.seq;
    },
    /** The sum of a metric family's samples. */
    async metric(name) {
      const text = await (await fetch(`http://${this.admin}/metrics`)).text();
      let sum = 0;
      for (const l of text.split('\n')) {
        if (l.startsWith(`${name} `) || l.startsWith(`${name}{`)) sum += Number(l.split(' ').pop());
      }
      return sum;
    },
    /** SIGTERM, then SIGKILL if it has not exited within 5 s. */
    async stop() {
      if (!exited) {
        child.kill('SIGTERM');
        try {
          await waitFor(() => exited, { timeoutMs: 5000, what: 'ringpush to exit' });
        } catch {
          child.kill('SIGKILL');
        }
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await waitFor(async () => (await fetch(`http://${server.admin}/readyz`)).status === 200,
    { timeoutMs: 20000, what: '/readyz' });
  return server;
}

/**
 * A TCP proxy on a free loopback port in front of `target` (`host:port`). `cut()` resets
 * every connection through it (a lost network); `stall()` stops passing the server's
 * bytes to the clients (a phone that stopped reading) and `unstall()` lets them flow.
 * @param {string} target
 */
export async function startProxy(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  /** @type {Set<{client: net.Socket, upstream: net.Socket, piped: boolean}>} */
  const pairs = new Set();
  let stalled = false;
  const server = net.createServer((client) => {
    const upstream = net.connect(port, host);
    const pair = { client, upstream, piped: false };
    pairs.add(pair);
    client.pipe(upstream);
    if (stalled) {
      upstream.pause();
    } else {
      upstream.pipe(client);
      pair.piped = true;
    }
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const address = server.address();
  return {
    addr: `127.0.0.1:${address.port}`,
    get connections() { return pairs.size; },
    cut() {
      for (const { client, upstream } of pairs) {
        client.resetAndDestroy();
        upstream.resetAndDestroy();
      }
      pairs.clear();
    },
    stall() {
      stalled = true;
      for (const pair of pairs) {
        pair.upstream.unpipe();
        pair.upstream.pause();
        pair.piped = false;
      }
    },
    unstall() {
      stalled = false;
      for (const pair of pairs) {
        if (!pair.piped) {
          pair.upstream.pipe(pair.client);
          pair.piped = true;
        }
      }
    },
    async close() {
      this.cut();
      await new Promise((r) => server.close(r));
    },
  };
}

/**
 * Records a client's events by type, for assertions.
 * @param {import('../ringpush.js').RingpushClient} client
 */
export function record(client) {
  /** @type {Record<string, any[]>} */
  const events = {};
  for (const type of ['state', 'hello', 'msg', 'ack', 'push', 'synced', 'gap', 'incomplete', 'read', 'unread',
    'signal', 'error', 'close', 'frame']) {
    events[type] = [];
    client.on(type, (e) => events[type].push(e));
  }
  return events;
}

/** `[seq, ...]` of a conversation's `msg` events. */
export function seqsOf(events, conv) {
  return events.msg.filter((m) => m.conv === conv).map((m) => m.seq);
}

/** `[1, 2, ..., n]` */
export function range(from, to) {
  return Array.from({ length: to - from + 1 }, (_, i) => from + i);
}
