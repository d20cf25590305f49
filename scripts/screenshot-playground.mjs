#!/usr/bin/env node
// Takes docs/playground.png: `moe serve` on the default model, one chat turn in headless Chromium, a token hovered.
import { chromium } from 'playwright-core';
import { startServer, DEFAULT_SERVER_OPTIONS } from '../dist/src/server/http.js';
import { defaultModelPath } from '../dist/src/workflows/default-model.js';

const server = await startServer({ ...DEFAULT_SERVER_OPTIONS, modelPath: (await defaultModelPath()).path, port: 0 });
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM_PATH ?? '/usr/bin/chromium', args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run'] });
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  await page.goto(server.url + '/');
  await page.waitForFunction(() => /experts/.test(document.getElementById('model').textContent));
  for (const text of ['Hello! What can you tell me about the sea?', 'Et en français ?']) {
    await page.fill('#input', text);
    await page.keyboard.press('Enter');
    await page.waitForSelector('.msg.bot .tok');
    await page.waitForFunction(() => !document.getElementById('send').disabled, undefined, { timeout: 60_000 });
  }
  await page.waitForTimeout(2500); // one heatmap refresh
  await page.locator('.msg.bot .tok').nth(6).hover();
  await page.screenshot({ path: new URL('../docs/playground.png', import.meta.url).pathname });
  console.log('wrote docs/playground.png');
} finally {
  await browser.close();
  await server.close();
}
