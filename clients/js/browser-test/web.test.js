// The demo page and the dashboard in a real headless Chromium (Debian's `chromium`,
// driven by playwright-core), against a real ringpush in demo mode:
// - two browser contexts are two devices of one user, a third is another user; messages
//   sent from each page arrive in every page in the same seq order;
// - one context goes offline (network emulation) while messages flow and, back online,
//   shows every message in order;
// - the dashboard's connection count rises as the pages connect;
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
