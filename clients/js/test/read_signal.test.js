// Read marks, unread counts and signals of the JS client against a real ringpush
// (PROTOCOL.md: `read` and `signal` both ways, `synced.read`): two devices of one user
// and another member, plus a user who is not a member. Run with `npm test` in clients/js.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { RingpushClient } from '../ringpush.js';
import { record, seqsOf, startServer, waitFor } from './helpers.js';

const FAST = { initialMs: 20, maxMs: 200, factor: 2, jitter: 0.5 };

describe('read marks and signals against a real ringpush', () => {
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;
  const clients = [];

  before(async () => {
    server = await startServer({ limits: { send_rate_per_sec: 1000 } });
  });
  after(async () => {
    for (const c of clients) c.close();
    await server?.stop();
  });

  /** A recorded client of user/device; connected (and its first syncs done) unless `connect: false`. */
  async function device(user, device, options = {}) {
    const { connect = true, ...rest } = options;
    const client = new RingpushClient({
      url: server.wsUrl,
      token: () => server.token(user, device),
      backoff: FAST,
      ...rest,
    });
    clients.push(client);
    const ev = record(client);
    if (connect) {
      client.connect();
      const syncs = Object.keys(client.positions()).length;
      await waitFor(() => ev.hello.length === 1 && ev.synced.length >= syncs, { what: `${user}/${device} synced` });
    }
    return { client, ev };
  }

  /** Reads sent by a client: `[seq, ...]` of its outgoing `read` frames for `conv`. */
  const readsOut = (ev, conv) => ev.frame.filter((f) => f.dir === 'out' && f.frame.op === 'read' && f.frame.conv === conv)
    .map((f) => f.frame.seq);

  /**
   * `from` sends a message into `conv`; resolves once each of `others` has it: whatever
   * those connections were sent before it has arrived by then.
   */
  async function marker(from, conv, others) {
    const ack = await from.client.send(conv, { marker: true });
    await Promise.all(others.map((o) => waitFor(() => seqsOf(o.ev, conv).includes(ack.seq), { what: `marker #${ack.seq}` })));
    return ack.seq;
  }

  test('a read mark moves at once on the reading device and on the user\'s other device, not elsewhere', async () => {
    await server.members('rd', ['alice', 'bob']);
    const laptop = await device('alice', 'laptop', { convs: ['rd'] });
    const phone = await device('alice', 'phone', { convs: ['rd'] });
    const bob = await device('bob', 'web', { convs: ['rd'] });
    for (let i = 1; i <= 3; i++) await bob.client.send('rd', { n: i });
    await waitFor(() => laptop.client.unread('rd') === 3 && phone.client.unread('rd') === 3, { what: 'unread 3 on both' });
    assert.equal(laptop.client.readMark('rd'), 0);
    assert.deepEqual(laptop.ev.unread.at(-1), { conv: 'rd', unread: 3, read: 0, last: 3 });
    assert.equal(bob.client.unread('rd'), 3, 'own messages are unread too, as on the server');

    // The mark moves locally before any answer: no round trip.
    assert.equal(laptop.client.read('rd', 2), 2);
    assert.equal(laptop.client.readMark('rd'), 2);
    assert.equal(laptop.client.unread('rd'), 1);
    assert.deepEqual(laptop.ev.unread.at(-1), { conv: 'rd', unread: 1, read: 2, last: 3 });
    const sent = laptop.ev.frame.filter((f) => f.dir === 'out' && f.frame.op === 'read').map((f) => f.frame);
    assert.deepEqual(sent.map(({ cid, ...rest }) => rest), [{ op: 'read', conv: 'rd', seq: 2 }]);

    // The other device hears of it, with the device that read.
    await waitFor(() => phone.ev.read.length === 1, { what: 'read on the phone' });
    assert.deepEqual(phone.ev.read, [{ conv: 'rd', seq: 2, dev: 'laptop' }]);
    assert.equal(phone.client.readMark('rd'), 2);
    assert.equal(phone.client.unread('rd'), 1);
    assert.deepEqual(phone.ev.unread.at(-1), { conv: 'rd', unread: 1, read: 2, last: 3 });

    // Up to the last seq known (no seq given), from the phone this time.
    assert.equal(phone.client.read('rd'), 3);
    await waitFor(() => laptop.ev.read.length === 1, { what: 'read on the laptop' });
    assert.deepEqual(laptop.ev.read, [{ conv: 'rd', seq: 3, dev: 'phone' }]);
    assert.equal(laptop.client.unread('rd'), 0);

    // Bob, another user, got no read frame and his count did not move; neither device got
    // its own read back.
    await marker(bob, 'rd', [laptop, phone]);
    await waitFor(() => seqsOf(bob.ev, 'rd').length === 4, { what: 'bob\'s own marker' });
    assert.deepEqual(bob.ev.read, []);
    assert.equal(bob.client.readMark('rd'), 0);
    assert.equal(bob.client.unread('rd'), 4);
    assert.deepEqual(laptop.ev.read.map((r) => r.dev), ['phone']);
    assert.deepEqual(phone.ev.read.map((r) => r.dev), ['laptop']);
    // The marker is unread on both of alice's devices.
    assert.equal(laptop.client.unread('rd'), 1);
    assert.equal(phone.client.unread('rd'), 1);
    assert.deepEqual(phone.client.unreads(), { rd: { conv: 'rd', unread: 1, read: 3, last: 4 } });
  });

  test('a read mark never goes down, locally or on the server', async () => {
    await server.members('mono', ['carol', 'dave']);
    for (let i = 1; i <= 5; i++) await server.post('mono', 'dave', { n: i });
    const laptop = await device('carol', 'laptop', { convs: ['mono'] });
    const phone = await device('carol', 'phone', { convs: ['mono'] });
    assert.equal(laptop.client.unread('mono'), 5);

    laptop.client.read('mono', 4);
    await waitFor(() => phone.client.readMark('mono') === 4, { what: 'mark 4 on the phone' });
    const unreadEvents = laptop.ev.unread.length;
    // Lower marks change nothing and are not even sent.
    assert.equal(laptop.client.read('mono', 1), 4);
    assert.equal(laptop.client.read('mono', 4), 4);
    assert.equal(phone.client.read('mono', 2), 4);
    assert.deepEqual(readsOut(laptop.ev, 'mono'), [4]);
    assert.deepEqual(readsOut(phone.ev, 'mono'), []);
    assert.equal(laptop.ev.unread.length, unreadEvents, 'no unread event');
    // A mark past the last seq known is taken as that seq (the server clamps the same way).
    assert.equal(laptop.client.read('mono', 99), 5);
    assert.deepEqual(readsOut(laptop.ev, 'mono'), [4, 5]);
    await waitFor(() => phone.client.readMark('mono') === 5, { what: 'mark 5 on the phone' });
    assert.equal(phone.client.unread('mono'), 0);

    // The server keeps the highest mark too: a lower read through the API tells nobody.
    const res = await server.api('POST', '/api/v1/conversations/mono/read', { user: 'carol', seq: 2 });
    assert.equal(res.status, 200);
    assert.equal(res.body.read, 5);
    // A stale read frame (one the server sent before a later move) does not lower it either.
    phone.client._onFrame({ op: 'read', conv: 'mono', seq: 3, dev: 'laptop' });
    assert.equal(phone.client.readMark('mono'), 5);
    const dave = await device('dave', 'web', { convs: ['mono'] });
    await marker(dave, 'mono', [laptop, phone]);
    assert.deepEqual(phone.ev.read.filter((r) => r.dev !== 'laptop'), [], 'no read frame for the API\'s lower mark');
    assert.deepEqual(laptop.ev.read, []);
    assert.equal(laptop.client.readMark('mono'), 5);
    assert.equal(laptop.client.unread('mono'), 1);
  });

  test('synced.read gives a new device the user\'s mark; a mark made offline goes out after hello', async () => {
    await server.members('restore', ['erin', 'frank']);
    for (let i = 1; i <= 4; i++) await server.post('restore', 'frank', { n: i });
    const phone = await device('erin', 'phone', { convs: ['restore'] });
    phone.client.read('restore', 3);
    await waitFor(async () => (await server.api('GET', '/api/v1/users/erin/unread')).body.convs[0]?.read === 3,
      { what: 'the server\'s mark at 3' });

    // A new device learns the mark from synced.read.
    const tablet = await device('erin', 'tablet', { convs: ['restore'] });
    assert.equal(tablet.ev.synced[0].read, 3);
    assert.equal(tablet.client.readMark('restore'), 3);
    assert.equal(tablet.client.unread('restore'), 1);
    assert.deepEqual(tablet.ev.unread.at(-1), { conv: 'restore', unread: 1, read: 3, last: 4 });

    // A device that stopped at seq 4 reads it before connecting: the mark moves now,
    // and the server hears of it once connected.
    const watch = await device('erin', 'watch', { lastSeq: { restore: 4 }, connect: false });
    assert.equal(watch.client.unread('restore'), 4, 'it knows seq 4 exists, and no mark yet');
    assert.equal(watch.client.read('restore'), 4);
    assert.equal(watch.client.unread('restore'), 0);
    assert.deepEqual(readsOut(watch.ev, 'restore'), [], 'not connected: nothing sent yet');
    watch.client.connect();
    await waitFor(() => phone.ev.read.length === 1 && tablet.ev.read.length === 1, { what: 'read frames' });
    assert.deepEqual(phone.ev.read, [{ conv: 'restore', seq: 4, dev: 'watch' }]);
    assert.equal(tablet.client.unread('restore'), 0);
    await waitFor(() => watch.ev.synced.length === 1, { what: 'the watch synced' });
    const ops = watch.ev.frame.filter((f) => f.dir === 'out').map((f) => f.frame.op);
    assert.deepEqual(ops, ['read', 'sync'], 'the owed read first, sent once');
    assert.equal(watch.client.readMark('restore'), 4, 'whatever synced.read said, the mark stays');
  });

  test('signals reach the user\'s other device and the other member, not the sender', async () => {
    await server.members('sig', ['gina', 'hank']);
    const laptop = await device('gina', 'laptop', { convs: ['sig'] });
    const phone = await device('gina', 'phone', { convs: ['sig'] });
    const hank = await device('hank', 'web', { convs: ['sig'] });
    const offline = await device('gina', 'tablet', { convs: ['sig'], connect: false });
    assert.equal(offline.client.signal('sig', { typing: true }), false, 'not connected: not sent');

    assert.equal(laptop.client.signal('sig', { typing: true }), true);
    const expected = { conv: 'sig', from: 'gina', dev: 'laptop', body: { typing: true } };
    await waitFor(() => phone.ev.signal.length === 1 && hank.ev.signal.length === 1, { what: 'signals' });
    assert.deepEqual(phone.ev.signal, [expected]);
    assert.deepEqual(hank.ev.signal, [expected]);
    const frame = laptop.ev.frame.find((f) => f.dir === 'out' && f.frame.op === 'signal').frame;
    assert.deepEqual({ ...frame, cid: undefined }, { op: 'signal', conv: 'sig', body: { typing: true }, cid: undefined });

    hank.client.signal('sig', { typing: false });
    await waitFor(() => phone.ev.signal.length === 2 && laptop.ev.signal.length === 1, { what: 'hank\'s signal' });
    assert.deepEqual(laptop.ev.signal, [{ conv: 'sig', from: 'hank', dev: 'web', body: { typing: false } }]);

    // Nothing came back to a sender, nothing is stored: no seq taken, no unread moved.
    await marker(phone, 'sig', [laptop, hank]);
    assert.equal(laptop.ev.signal.length, 1, 'the laptop did not get its own signal');
    assert.equal(hank.ev.signal.length, 1, 'hank did not get his own signal');
    assert.deepEqual(seqsOf(hank.ev, 'sig'), [1], 'the marker took seq 1');
    assert.deepEqual(laptop.ev.error, []);
  });

  test('signal and read errors are error events naming the conversation and the request', async () => {
    await server.members('closed', ['ivy', 'jack']);
    await server.post('closed', 'jack', { n: 1 });
    const ivy = await device('ivy', 'web', { convs: ['closed'] });
    // Eve is no member; her client knows seq 1 of the conversation from an old position
    // and marks it read before connecting: the read goes out after hello, then the sync.
    const eve = await device('eve', 'web', { lastSeq: { closed: 1 }, connect: false });
    assert.equal(eve.client.read('closed'), 1);
    eve.client.connect();
    await waitFor(() => eve.ev.error.some((e) => e.op === 'read') && eve.ev.error.some((e) => e.op === 'sync'),
      { what: 'eve\'s read and sync refused' });
    const readError = eve.ev.error.find((e) => e.op === 'read');
    assert.deepEqual({ ...readError, message: undefined, cid: undefined },
      { code: 'not_member', conv: 'closed', op: 'read', message: undefined, cid: undefined });
    assert.match(readError.cid, /^read-/);

    assert.equal(eve.client.signal('closed', { typing: true }), true);
    await waitFor(() => eve.ev.error.some((e) => e.op === 'signal'), { what: 'signal error' });
    const signalError = eve.ev.error.find((e) => e.op === 'signal');
    assert.equal(signalError.code, 'not_member');
    assert.equal(signalError.conv, 'closed');
    assert.match(signalError.cid, /^signal-/);
    assert.equal(eve.client.state, 'open', 'errors do not end the connection');

    // Too big: bad_request, for a member too.
    assert.equal(ivy.client.signal('closed', { pad: 'x'.repeat(2000) }), true);
    await waitFor(() => ivy.ev.error.length === 1, { what: 'bad_request' });
    assert.equal(ivy.ev.error[0].code, 'bad_request');
    assert.equal(ivy.ev.error[0].conv, 'closed');
    assert.equal(ivy.ev.error[0].op, 'signal');
    // Send errors name their request as well.
    await assert.rejects(eve.client.send('closed', { text: 'hi' }), { code: 'not_member' });
    assert.equal(eve.ev.error.at(-1).op, 'send');
    assert.equal(eve.ev.error.at(-1).conv, 'closed');
  });
});
