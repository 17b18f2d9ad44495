// The JS client against a real ringpush: backoff, seq tracking, sync after (re)connect,
// gap handling, idempotent sends. Run with `npm test` in clients/js (node >= 20.10; on
// node 20 the global WebSocket needs --experimental-websocket, which `npm test` passes).

import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';

import { backoffDelay, DEFAULT_BACKOFF, newCid, reconnectHint, RingpushClient, RingpushError } from '../ringpush.js';
import { range, record, seqsOf, startProxy, startServer, waitFor } from './helpers.js';

const FAST = { initialMs: 20, maxMs: 200, factor: 2, jitter: 0.5 };

/** A client of `server` (or of `addr`, a proxy in front of it) for user/device. */
function clientFor(server, user, device, options = {}) {
  const { addr, ...rest } = options;
  return new RingpushClient({
    url: addr ? `ws://${addr}/ws` : server.wsUrl,
    token: () => server.token(user, device),
    backoff: FAST,
    ...rest,
  });
}

/** Resolves once the client has said hello (the next time, if `nth` > 1). */
function opened(events, nth = 1) {
  return waitFor(() => events.hello.length >= nth, { what: `hello #${nth}` });
}

describe('pure helpers', () => {
  test('a draining server\'s reconnect_after_ms hint is read from the 1001 reason', () => {
    assert.equal(reconnectHint('server shutting down; reconnect_after_ms=4821'), 4821);
    assert.equal(reconnectHint('server shutting down'), null);
    assert.equal(reconnectHint(''), null);
    assert.equal(reconnectHint('reconnect_after_ms=99999999'), 300000, 'capped at five minutes');
  });

  test('backoffDelay grows by the factor up to the cap, with the jitter taken off', () => {
    const b = { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0.5 };
    const exact = (n) => backoffDelay(n, b, () => 0);
    assert.deepEqual([0, 1, 2, 3, 4, 5].map(exact), [100, 200, 400, 800, 1000, 1000]);
    // The most jitter takes off half of each delay (jitter 0.5).
    assert.equal(backoffDelay(3, b, () => 0.999999), 400);
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(2, b);
      assert.ok(d >= 200 && d <= 400, `delay ${d} outside [200, 400]`);
    }
    assert.equal(backoffDelay(50, DEFAULT_BACKOFF, () => 0), DEFAULT_BACKOFF.maxMs);
    assert.equal(backoffDelay(1, { ...b, jitter: 0 }, () => 0.7), 200, 'no jitter: exact');
  });

  test('newCid makes 24 hex digits, different every time', () => {
    const cids = new Set(Array.from({ length: 1000 }, newCid));
    assert.equal(cids.size, 1000);
    for (const cid of cids) assert.match(cid, /^[0-9a-f]{24}$/);
  });
});

describe('against a real ringpush', () => {
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;
  const clients = [];
  const proxies = [];
  const track = (c) => (clients.push(c), c);

  before(async () => {
    server = await startServer({ limits: { send_rate_per_sec: 1000 } });
  });
  after(async () => {
    for (const c of clients) c.close();
    for (const p of proxies) await p.close();
    await server?.stop();
  });

  test('after hello it syncs each tracked conversation from its last seq, and drops repeats', async () => {
    await server.members('sync1', ['alice', 'bob']);
    for (let i = 1; i <= 3; i++) await server.post('sync1', 'bob', { n: i });
    const alice = track(clientFor(server, 'alice', 'laptop', { lastSeq: { sync1: 1 } }));
    const ev = record(alice);
    alice.connect();
    await waitFor(() => ev.synced.length === 1, { what: 'synced' });
    const sync = ev.frame.find((f) => f.dir === 'out' && f.frame.op === 'sync');
    assert.deepEqual({ ...sync.frame, cid: undefined }, { op: 'sync', conv: 'sync1', after: 1, cid: undefined });
    assert.deepEqual(seqsOf(ev, 'sync1'), [2, 3]);
    assert.ok(ev.msg.every((m) => m.replayed && !m.own));
    assert.deepEqual(alice.positions(), { sync1: 3 });

    // A replay of what it has already (a sync from 0) hands nothing over twice.
    alice._sync('sync1', 0);
    await waitFor(() => ev.synced.length === 2, { what: 'second synced' });
    const replayed = ev.frame.filter((f) => f.dir === 'in' && f.frame.op === 'msg').length;
    assert.equal(replayed, 5, 'the server replayed 2 + 3 messages');
    assert.deepEqual(seqsOf(ev, 'sync1'), [2, 3], 'but each seq was handed over once');
  });

  test('every device sees the same order, its own sends included once acknowledged', async () => {
    await server.members('order', ['carol', 'dave']);
    const laptop = track(clientFor(server, 'carol', 'laptop', { convs: ['order'] }));
    const phone = track(clientFor(server, 'carol', 'phone', { convs: ['order'] }));
    const dave = track(clientFor(server, 'dave', 'web', { convs: ['order'] }));
    const evs = [laptop, phone, dave].map(record);
    for (const c of [laptop, phone, dave]) c.connect();
    await Promise.all(evs.map((e) => waitFor(() => e.synced.length >= 1, { what: 'first sync' })));

    const sends = [];
    for (let i = 0; i < 10; i++) {
      const from = [laptop, phone, dave][i % 3];
      sends.push(from.send('order', { text: `m${i}` }));
    }
    const acks = await Promise.all(sends);
    assert.deepEqual(acks.map((a) => a.seq).sort((a, b) => a - b), range(1, 10));
    await Promise.all(evs.map((e) => waitFor(() => seqsOf(e, 'order').length === 10, { what: '10 msgs' })));
    const lists = evs.map((e) => e.msg.filter((m) => m.conv === 'order').map((m) => `${m.seq}:${m.body.text}`));
    assert.deepEqual(lists[0], lists[1]);
    assert.deepEqual(lists[0], lists[2]);
    assert.deepEqual(seqsOf(evs[0], 'order'), range(1, 10));
    const own = evs[0].msg.filter((m) => m.own).map((m) => m.body.text);
    assert.deepEqual(own.sort(), ['m0', 'm3', 'm6', 'm9']);
  });

  test('a cut connection comes back with backoff and syncs what it missed', async () => {
    await server.members('cut', ['erin', 'frank']);
    const proxy = await startProxy(server.client);
    proxies.push(proxy);
    const erin = track(clientFor(server, 'erin', 'phone', { addr: proxy.addr, convs: ['cut'] }));
    const frank = track(clientFor(server, 'frank', 'web', { convs: ['cut'] }));
    const ev = record(erin);
    const fev = record(frank);
    erin.connect();
    frank.connect();
    await Promise.all([opened(ev), opened(fev)]);
    await frank.send('cut', { n: 1 });
    await waitFor(() => seqsOf(ev, 'cut').length === 1, { what: 'msg 1' });

    proxy.cut();
    await waitFor(() => ev.state.some((s) => s.state === 'reconnecting'), { what: 'reconnecting' });
    for (let n = 2; n <= 4; n++) await frank.send('cut', { n });
    await opened(ev, 2);
    await waitFor(() => seqsOf(ev, 'cut').length === 4, { what: 'msgs 2-4 after the reconnect' });
    assert.deepEqual(seqsOf(ev, 'cut'), [1, 2, 3, 4]);
    const syncs = ev.frame.filter((f) => f.dir === 'out' && f.frame.op === 'sync').map((f) => f.frame.after);
    assert.deepEqual(syncs, [0, 1], 'synced from 0 at first, then from the last seq seen');
    const waits = ev.state.filter((s) => s.state === 'reconnecting').map((s) => s.delayMs);
    assert.ok(waits.every((d) => d >= FAST.initialMs / 2 && d <= FAST.maxMs), `delays ${waits}`);
  });

  test('while the server is unreachable the delays grow to the cap, and a hello resets them', async (t) => {
    // A port nobody listens on: every attempt is refused.
    const probe = net.createServer();
    await new Promise((r) => probe.listen(0, '127.0.0.1', r));
    const port = probe.address().port;
    await new Promise((r) => probe.close(r));
    const c = track(clientFor(server, 'gina', 'web', {
      addr: `127.0.0.1:${port}`, backoff: { initialMs: 10, maxMs: 80, factor: 2, jitter: 0 },
    }));
    const ev = record(c);
    c.connect();
    await waitFor(() => ev.state.filter((s) => s.state === 'reconnecting').length >= 6, { what: '6 retries' });
    const delays = ev.state.filter((s) => s.state === 'reconnecting').map((s) => s.delayMs);
    assert.deepEqual(delays.slice(0, 6), [10, 20, 40, 80, 80, 80]);

    // The server comes back on that port.
    const gate = net.createServer((sock) => {
      const up = net.connect(Number(server.client.split(':')[1]), '127.0.0.1');
      sock.pipe(up).pipe(sock);
      sock.on('error', () => up.destroy());
      up.on('error', () => sock.destroy());
    });
    await new Promise((r) => gate.listen(port, '127.0.0.1', r));
    t.after(() => new Promise((r) => gate.close(r)));
    await opened(ev);
    assert.equal(c._attempt, 0, 'a hello starts the backoff over');
    c.close();
  });

  test('an attempt that gets no hello is given up after connectTimeoutMs', async (t) => {
    // A listener that takes connections and never answers.
    const held = [];
    const mute = net.createServer((sock) => held.push(sock));
    await new Promise((r) => mute.listen(0, '127.0.0.1', r));
    t.after(() => {
      for (const s of held) s.destroy();
      return new Promise((r) => mute.close(r));
    });
    const c = track(clientFor(server, 'gus', 'web', {
      addr: `127.0.0.1:${mute.address().port}`, connectTimeoutMs: 100,
    }));
    const ev = record(c);
    c.connect();
    await waitFor(() => ev.state.filter((s) => s.state === 'reconnecting').length >= 2, { what: '2 retries' });
    assert.ok(ev.close.every((e) => e.code === 1006 && e.reason === 'no hello in time'), JSON.stringify(ev.close));
    c.close();
  });

  test('a gap from a slow connection is filled by a sync: every seq once, in order', async () => {
    const slow = await startServer({
      limits: { outbound_queue_bytes: 16384 },
      history: { max_per_conv: 20000 },
    });
    try {
      await slow.members('gap', ['hank', 'ivy']);
      const proxy = await startProxy(slow.client);
      proxies.push(proxy);
      const hank = track(clientFor(slow, 'hank', 'phone', { addr: proxy.addr, convs: ['gap'] }));
      const ev = record(hank);
      hank.connect();
      await waitFor(() => ev.synced.length === 1, { what: 'first sync' });

      // Hank's phone stops reading; messages pile up on the server until they give way to a gap.
      proxy.stall();
      const body = { text: 'x'.repeat(4000) };
      let posted = 0;
      while ((await slow.metric('ringpush_slow_consumer_gaps_total')) === 0) {
        for (let i = 0; i < 50; i++) posted = await slow.post('gap', 'ivy', body);
        assert.ok(posted < 20000, 'no gap after 20000 messages');
      }
      for (let i = 0; i < 5; i++) posted = await slow.post('gap', 'ivy', body);
      proxy.unstall();
      await waitFor(() => seqsOf(ev, 'gap').length === posted, { timeoutMs: 20000, what: `${posted} msgs` });
      assert.ok(ev.gap.length >= 1, 'the server sent a gap');
      assert.deepEqual(seqsOf(ev, 'gap'), range(1, posted), 'each seq once, in order');
      const gap = ev.gap[0];
      const resync = ev.frame.find((f) => f.dir === 'out' && f.frame.op === 'sync' && f.frame.after === gap.from - 1);
      assert.ok(resync, `a sync from ${gap.from - 1} after ${JSON.stringify(gap)}`);
    } finally {
      await slow.stop();
    }
  });

  test('history that no longer reaches back is reported, and the client goes on from its start', async () => {
    const short = await startServer({ history: { max_per_conv: 5 } });
    try {
      await short.members('short', ['jack', 'kim']);
      for (let i = 1; i <= 10; i++) await short.post('short', 'kim', { n: i });
      const jack = track(clientFor(short, 'jack', 'web', { lastSeq: { short: 2 } }));
      const ev = record(jack);
      jack.connect();
      await waitFor(() => seqsOf(ev, 'short').length === 5, { what: '5 msgs' });
      assert.deepEqual(ev.incomplete, [{ conv: 'short', after: 2, first: 6 }]);
      assert.deepEqual(seqsOf(ev, 'short'), [6, 7, 8, 9, 10]);
    } finally {
      await short.stop();
    }
  });

  test('sends made while disconnected go out, in order, once connected', async () => {
    await server.members('queued', ['lee', 'max']);
    const lee = track(clientFor(server, 'lee', 'web', { convs: ['queued'] }));
    const ev = record(lee);
    const sends = [1, 2, 3].map((n) => lee.send('queued', { n }));
    assert.equal(lee.pending().length, 3);
    lee.connect();
    const acks = await Promise.all(sends);
    assert.deepEqual(acks.map((a) => a.seq), [1, 2, 3]);
    assert.deepEqual(seqsOf(ev, 'queued'), [1, 2, 3]);
    assert.equal(lee.pending().length, 0);
  });

  test('a send whose ack was lost with the connection is sent again with its cid and delivered once', async () => {
    await server.members('once', ['nina', 'omar']);
    const proxy = await startProxy(server.client);
    proxies.push(proxy);
    const nina = track(clientFor(server, 'nina', 'phone', { addr: proxy.addr, convs: ['once'] }));
    const omar = track(clientFor(server, 'omar', 'web', { convs: ['once'] }));
    const ev = record(nina);
    const oev = record(omar);
    nina.connect();
    omar.connect();
    await Promise.all([opened(ev), opened(oev)]);
    await waitFor(() => ev.synced.length === 1, { what: 'first sync' });
    const deduplicated = await server.metric('ringpush_messages_deduplicated_total');

    proxy.stall(); // the server's answers stop reaching nina
    const sent = nina.send('once', { text: 'exactly once' });
    await waitFor(() => seqsOf(oev, 'once').length === 1, { what: 'omar gets the message' });
    const cid = oev.msg[0].cid;
    proxy.cut();
    proxy.unstall();
    const ack = await sent;
    assert.equal(ack.seq, 1);
    assert.equal(ack.cid, cid);
    const transmitted = ev.frame.filter((f) => f.dir === 'out' && f.frame.op === 'send').map((f) => f.frame.cid);
    assert.deepEqual(transmitted, [cid, cid], 'the same cid, twice');
    assert.equal(await server.metric('ringpush_messages_deduplicated_total'), deduplicated + 1);
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(seqsOf(oev, 'once'), [1], 'delivered once');
    assert.deepEqual(seqsOf(ev, 'once'), [1], 'and shown once to the sender');
  });

  test('rate_limited sends are retried with the same cid until acknowledged', async () => {
    const limited = await startServer({ limits: { send_rate_per_sec: 5 } });
    try {
      await limited.members('rl', ['pat', 'quinn']);
      const pat = track(clientFor(limited, 'pat', 'web', { convs: ['rl'] }));
      const ev = record(pat);
      pat.connect();
      await opened(ev);
      const acks = await Promise.all(range(1, 20).map((n) => pat.send('rl', { n })));
      assert.deepEqual(acks.map((a) => a.seq).sort((a, b) => a - b), range(1, 20));
      assert.ok(ev.error.some((e) => e.code === 'rate_limited'), 'some sends were rate limited');
      assert.deepEqual(seqsOf(ev, 'rl'), range(1, 20));
      const bodies = new Set(ev.msg.map((m) => m.body.n));
      assert.equal(bodies.size, 20, 'each send sequenced once');
    } finally {
      await limited.stop();
    }
  });

  test('not_member rejects the send; pushes arrive as events', async () => {
    const rita = track(clientFor(server, 'rita', 'web'));
    const ev = record(rita);
    rita.connect();
    await opened(ev);
    await assert.rejects(rita.send('nobody-here', { text: 'hi' }), (err) => {
      assert.ok(err instanceof RingpushError);
      assert.equal(err.code, 'not_member');
      return true;
    });
    assert.equal(rita.pending().length, 0);
    const res = await server.api('POST', '/api/v1/push', { users: ['rita'], body: { ping: 1 } });
    assert.equal(res.status, 202);
    await waitFor(() => ev.push.length === 1, { what: 'push' });
    assert.deepEqual(ev.push[0], { body: { ping: 1 } });
  });

  test('an expired token (1008) is followed by a reconnect with a fresh one', async () => {
    let asked = 0;
    const sam = track(new RingpushClient({
      url: server.wsUrl,
      token: () => (asked++, server.token('sam', 'web', { ttlSecs: 1 })),
      backoff: FAST,
    }));
    const ev = record(sam);
    sam.connect();
    await opened(ev);
    await waitFor(() => ev.close.some((c) => c.code === 1008), { timeoutMs: 8000, what: 'close 1008' });
    await opened(ev, 2);
    assert.ok(asked >= 2, `token asked ${asked} times`);
  });

  test('a disconnect through the API (4001) stops the client', async () => {
    const tom = track(clientFor(server, 'tom', 'web'));
    const ev = record(tom);
    tom.connect();
    await opened(ev);
    const res = await server.api('POST', '/api/v1/users/tom/disconnect');
    assert.equal(res.status, 200);
    await waitFor(() => tom.state === 'closed', { what: 'closed' });
    assert.deepEqual(ev.close.map((c) => c.code), [4001]);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(ev.hello.length, 1, 'no reconnect');
  });
});
