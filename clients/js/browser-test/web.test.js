// The demo page and the dashboard in a real headless Chromium (Debian's `chromium`,
// driven by playwright-core), against a real ringpush in demo mode:
// - two browser contexts are two devices of one user, a third is another user; messages
//   sent from each page arrive in every page in the same seq order;
// - one context goes offline (network emulation) while messages flow and, back online,
//   shows every message in order;
// - the dashboard's connection count rises as the pages connect;
// - typing on one page shows "typing…" on the other members' pages (not on the typist's
//   own devices) and goes away ~4 s after the last signal; marking read on one device
//   moves the read mark and the unread count on the user's other device;
// - screenshots of both pages go to docs/ (or $RINGPUSH_SCREENSHOTS).
//
// Run with `npm run test:browser` in clients/js; $CHROMIUM overrides /usr/bin/chromium.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import { REPO, startServer, waitFor } from '../test/helpers.js';

const SHOTS = process.env.RINGPUSH_SCREENSHOTS ?? join(REPO, 'docs');
const VIEWPORT = { width: 1280, height: 820 };

let server;
let browser;
/** Problems any page reported: script errors, console errors (CSP violations are), foreign requests. */
const problems = [];

before(async () => {
  server = await startServer({ diagnostics: { demo: true } });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
  });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

/** A page in a fresh context (its own cookies, cache and network emulation). */
async function newPage() {
  const context = await browser.newContext({ viewport: VIEWPORT });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  page.on('pageerror', (err) => problems.push(`pageerror: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`console: ${msg.text()}`);
  });
  page.on('request', (req) => {
    const url = new URL(req.url());
    if (url.hostname !== '127.0.0.1' && url.protocol !== 'data:') problems.push(`foreign request: ${req.url()}`);
  });
  return { context, page };
}

/** Opens the demo page as user/device in `conv`, connected. */
async function openDemo(user, device, conv) {
  const { context, page } = await newPage();
  await page.goto(`http://${server.client}/demo?user=${user}&device=${device}&conv=${conv}&auto=1`);
  await page.waitForSelector('#state[data-state="open"]');
  return { context, page, name: `${user}/${device}` };
}

/** `["seq|from|text", ...]` as a page shows its messages (sent ones only, not pending). */
function shown(page) {
  return page.$$eval('#messages li[data-seq]', (lis) => lis.map((li) =>
    `${li.dataset.seq}|${li.dataset.from}|${li.querySelector('.body').textContent}`));
}

async function send(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

async function waitShown(page, n, what) {
  await page.waitForFunction((count) => document.querySelectorAll('#messages li[data-seq]').length >= count, n,
    { timeout: 15000 }).catch(() => { throw new Error(`${what}: fewer than ${n} messages shown`); });
}

/** The dashboard's connection count, as displayed. */
async function dashboardCount(page) {
  return Number((await page.textContent('#connections-total')).trim());
}

test('three pages stay in the same order, one goes offline and catches up, the dashboard follows', async () => {
  const dash = await newPage();
  await dash.page.goto(`http://${server.admin}/`);
  await dash.page.waitForFunction(() => document.querySelector('#connections-total').textContent.trim() === '0');
  await dash.page.waitForSelector('#feed .dot.ok');

  // Pages connect one by one; the dashboard shows each new connection.
  const conv = 'room';
  const seen = [];
  const pages = [];
  for (const [user, device] of [['alice', 'laptop'], ['alice', 'phone'], ['bob', 'web']]) {
    pages.push(await openDemo(user, device, conv));
    const n = pages.length;
    await waitFor(async () => (await dashboardCount(dash.page)) === n, { what: `dashboard showing ${n}` });
    seen.push(await dashboardCount(dash.page));
  }
  assert.deepEqual(seen, [1, 2, 3], 'the connection count rose as pages connected');
  const [laptop, phone, bob] = pages;

  // Messages from each page, interleaved.
  const texts = [];
  for (let round = 0; round < 3; round++) {
    for (const p of pages) {
      const text = `${p.name} says ${round}`;
      texts.push(text);
      await send(p.page, text);
    }
  }
  for (const p of pages) await waitShown(p.page, texts.length, p.name);
  const reference = await shown(laptop.page);
  assert.deepEqual(reference.map((r) => Number(r.split('|')[0])), texts.map((_, i) => i + 1), 'seqs 1..n');
  assert.deepEqual([...reference.map((r) => r.split('|')[2])].sort(), [...texts].sort(), 'every message once');
  assert.deepEqual(await shown(phone.page), reference, 'alice/phone shows the same list');
  assert.deepEqual(await shown(bob.page), reference, 'bob/web shows the same list');

  // Bob's browser loses the network while alice's devices keep talking.
  await bob.context.setOffline(true);
  await bob.page.waitForSelector('#state[data-state="offline"]');
  await waitFor(async () => (await dashboardCount(dash.page)) === 2, { what: 'dashboard showing 2' });
  const whileOffline = [];
  for (let i = 0; i < 6; i++) {
    const from = i % 2 ? phone : laptop;
    const text = `while bob is away ${i}`;
    whileOffline.push(text);
    await send(from.page, text);
  }
  const total = texts.length + whileOffline.length;
  await waitShown(laptop.page, total, 'alice/laptop');
  await waitShown(phone.page, total, 'alice/phone');
  assert.equal((await shown(bob.page)).length, texts.length, 'nothing reaches bob while offline');

  await bob.context.setOffline(false);
  await bob.page.waitForSelector('#state[data-state="open"]');
  await waitShown(bob.page, total, 'bob after coming back');
  const everything = await shown(laptop.page);
  assert.deepEqual(everything.map((r) => Number(r.split('|')[0])), Array.from({ length: total }, (_, i) => i + 1));
  assert.deepEqual(await shown(bob.page), everything, 'bob caught up: every message, in order');
  assert.deepEqual(await shown(phone.page), everything);
  const viaSync = await bob.page.$$eval('#messages li[data-seq] .tag', (tags) => tags.length);
  assert.equal(viaSync, whileOffline.length, 'the missed messages came through sync');
  await waitFor(async () => (await dashboardCount(dash.page)) === 3, { what: 'dashboard back at 3' });

  // The page's own offline switch: the phone disconnects, the laptop sends, the phone catches up.
  await phone.page.check('#offline');
  await phone.page.waitForSelector('#state[data-state="closed"]');
  await send(laptop.page, 'one more while the phone is off');
  await waitShown(laptop.page, total + 1, 'alice/laptop');
  await phone.page.uncheck('#offline');
  await waitShown(phone.page, total + 1, 'alice/phone after its offline switch');
  assert.deepEqual(await shown(phone.page), await shown(laptop.page));

  // Screenshots for the README: the laptop's page and the dashboard with traffic on it.
  mkdirSync(SHOTS, { recursive: true });
  for (let i = 0; i < 4; i++) await send(bob.page, `bob, for the screenshot ${i}`);
  await waitShown(laptop.page, total + 5, 'alice/laptop');
  await laptop.page.screenshot({ path: join(SHOTS, 'demo.png') });
  await dash.page.waitForFunction(() => document.querySelector('#delivered').textContent !== '–');
  await dash.page.screenshot({ path: join(SHOTS, 'dashboard.png'), fullPage: true });

  assert.deepEqual(problems, [], 'no script errors, CSP violations or foreign requests');
  for (const p of [...pages, dash]) await p.context.close();
});

/** Frames of `op` in a page's protocol log, going `dir` ('in' or 'out'). */
function logged(page, dir, op) {
  return page.$$eval(`#log li.${dir}`, (lis, needle) => lis.filter((li) => li.textContent.includes(needle)).length,
    `"op":"${op}"`);
}

/** `{unread, read, by}` as a page shows them. */
async function reads(page) {
  return page.evaluate(() => ({
    unread: Number(document.querySelector('#unread').dataset.unread),
    read: Number(document.querySelector('#read-mark').dataset.read),
    by: document.querySelector('#read-mark').dataset.by,
  }));
}

test('typing shows on the other members\' pages; a read on one device moves the mark on the other', async () => {
  const conv = 'talk';
  const laptop = await openDemo('carol', 'laptop', conv);
  const phone = await openDemo('carol', 'phone', conv);
  const dan = await openDemo('dan', 'web', conv);
  // Carol's devices read only when told to, so every move of her mark is one the test made.
  for (const p of [laptop, phone]) await p.page.uncheck('#auto-read');

  for (let i = 1; i <= 3; i++) await send(dan.page, `dan says ${i}`);
  for (const p of [laptop, phone, dan]) await waitShown(p.page, 3, p.name);
  for (const p of [laptop, phone]) {
    await p.page.waitForSelector('#unread[data-unread="3"]');
    assert.deepEqual(await reads(p.page), { unread: 3, read: 0, by: '' }, p.name);
    assert.equal(await p.page.$$eval('#messages li.unread', (lis) => lis.length), 3, `${p.name}: 3 rows unread`);
  }

  // The laptop marks read: its count drops, and the phone's mark follows, naming the laptop.
  await laptop.page.click('#mark-read');
  await laptop.page.waitForSelector('#unread[data-unread="0"]');
  await phone.page.waitForSelector('#read-mark[data-read="3"][data-by="laptop"]');
  assert.deepEqual(await reads(phone.page), { unread: 0, read: 3, by: 'laptop' });
  assert.match(await phone.page.textContent('#read-mark'), /read up to #3 · by laptop/);
  assert.equal(await phone.page.$$eval('#messages li.unread', (lis) => lis.length), 0, 'no row unread on the phone');
  assert.equal(await logged(phone.page, 'out', 'read'), 0, 'the phone itself sent no read');

  // With "read when visible" on, the laptop reads a new message as it arrives; the phone follows.
  await laptop.page.check('#auto-read');
  await send(dan.page, 'dan says 4');
  await phone.page.waitForSelector('#read-mark[data-read="4"][data-by="laptop"]');
  await waitShown(phone.page, 4, 'carol/phone');
  assert.deepEqual(await reads(phone.page), { unread: 0, read: 4, by: 'laptop' });

  // Dan types: carol's two devices show it; one signal per 2 s at most.
  const signalled = await logged(dan.page, 'out', 'signal'); // one before each message sent so far
  const started = Date.now();
  await dan.page.locator('#text').pressSequentially('hello carol', { delay: 15 });
  const typed = Date.now() - started;
  for (const p of [laptop, phone]) {
    await p.page.waitForSelector('#typing:not([hidden])');
    assert.equal(await p.page.textContent('#typing'), 'dan is typing…', p.name);
  }
  const signals = await logged(dan.page, 'out', 'signal') - signalled;
  assert.ok(signals >= 1 && signals <= 1 + Math.floor(typed / 2000), `${signals} signals in ${typed} ms of typing`);
  assert.equal(await dan.page.isHidden('#typing'), true, 'not on the typist\'s page');
  // It goes away about 4 s after the last signal, with no message sent.
  await laptop.page.waitForSelector('#typing', { state: 'hidden', timeout: 15000 });
  assert.ok(Date.now() - started >= 4000, `hidden after ${Date.now() - started} ms`);

  // Carol types on the laptop: dan sees it; her phone gets the signal but shows nothing.
  await laptop.page.locator('#text').pressSequentially('hi dan', { delay: 15 });
  await dan.page.waitForSelector('#typing:not([hidden])');
  assert.equal(await dan.page.textContent('#typing'), 'carol is typing…');
  await phone.page.waitForFunction(() => [...document.querySelectorAll('#log li.in')]
    .some((li) => li.textContent.includes('"op":"signal"') && li.textContent.includes('"from":"carol"')));
  assert.equal(await phone.page.isHidden('#typing'), true, 'carol\'s own devices typing is not shown to her');
  // Her message ends "typing…" on dan's page at once.
  await laptop.page.press('#text', 'Enter');
  await waitShown(dan.page, 5, 'dan');
  assert.equal(await dan.page.isHidden('#typing'), true, 'the message ended "typing…"');

  assert.deepEqual(problems, [], 'no script errors, CSP violations or foreign requests');
  for (const p of [laptop, phone, dan]) await p.context.close();
});
