// The web playground in headless Chromium (playwright-core, Debian's /usr/bin/chromium): chat with streaming, tokens
// coloured by expert with per-layer choices on hover, the live load heatmap. Keeps a screenshot in test-artifacts/.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, DEFAULT_SERVER_OPTIONS } from '../src/server/http.js';

const MICRO = fileURLToPath(new URL('../../test/fixtures/micro/micro-q8_0.gguf', import.meta.url));
const ARTIFACTS = fileURLToPath(new URL('../../test-artifacts/', import.meta.url));
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

test('playground: chat streams, tokens carry their experts, the heatmap fills', async (t) => {
  if (!fs.existsSync(CHROMIUM)) {
    // CI installs Chromium (.ci/run); elsewhere say loudly why this did not run.
    if (process.env.CI) assert.fail(`Chromium not found at ${CHROMIUM}; .ci/run installs it with apt-get`);
    return t.skip(`*** Chromium not found at ${CHROMIUM}: apt-get install chromium ***`);
  }
  const server = await startServer({ ...DEFAULT_SERVER_OPTIONS, modelPath: MICRO, port: 0 });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(server.url + '/');
    await page.waitForFunction(() => /8 experts, top-2/.test(document.getElementById('model')!.textContent ?? ''));
    assert.equal(await page.locator('#legend span').count(), 8);

    await page.fill('#input', 'a b c');
    await page.keyboard.press('Enter');
    // Streaming: token spans appear, then the send button comes back when the answer is complete.
    await page.waitForSelector('.msg.bot .tok');
    await page.waitForFunction(() => !(document.getElementById('send') as HTMLButtonElement).disabled, undefined, { timeout: 30_000 });
    const toks = page.locator('.msg.bot .tok');
    const n = await toks.count();
    assert.ok(n >= 5, `${n} token spans`);
    // Each token is coloured by an expert and carries its per-layer choices. (The random model's answer varies; a
    // token can render empty, e.g. part of a UTF-8 character, and cannot be hovered: take one with visible text.)
    const tok = toks.filter({ hasText: /\S/ }).first();
    const tip = await tok.getAttribute('data-tip');
    assert.match(tip ?? '', /layer 0: E\d \d\.\d\d {2}E\d \d\.\d\d\nlayer 1: /);
    assert.match((await tok.getAttribute('style')) ?? '', /background: rgba\(\d+, \d+, \d+, 0\.45\)/);
    await tok.hover();
    await page.waitForSelector('#tip', { state: 'visible' });
    assert.match((await page.textContent('#tip')) ?? '', /layer 1:/);

    // The heatmap: 2 layers x 8 experts, filled from /v1/stats.
    await page.waitForFunction(() => document.querySelectorAll('#heat td').length === 16);
    const counts = await page.$$eval('#heat td', (tds) => tds.map((td) => Number(td.textContent)));
    const stats = (await (await fetch(server.url + '/v1/stats')).json()) as { load: number[][] };
    assert.deepEqual(counts, stats.load.flat());
    assert.ok(counts.reduce((a, b) => a + b, 0) > 0);

    // A second turn keeps the history.
    await page.fill('#input', 'd e');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.querySelectorAll('.msg.bot').length === 2 && !(document.getElementById('send') as HTMLButtonElement).disabled, undefined, { timeout: 30_000 });
    assert.deepEqual(errors, []);
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await tok.hover();
    await page.screenshot({ path: ARTIFACTS + 'playground.png' });
    assert.ok(fs.statSync(ARTIFACTS + 'playground.png').size > 10_000);
  } finally {
    await browser.close();
    await server.close();
  }
});
