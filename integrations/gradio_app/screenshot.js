// Screenshot of the demo app after one question, taken with Debian's headless Chromium through playwright-core.
//
//   npm install --prefix /tmp/pw playwright-core        # once; the browser is the system's /usr/bin/chromium
//   NODE_PATH=/tmp/pw/node_modules PYTHON=.venv/bin/python node integrations/gradio_app/screenshot.js [app args...]
//
// Starts app.py (with the given arguments; by default the demo's model in ./demo-output) on a free local port, picks
// the first sample video, clicks "Ask", waits for both answers and the heat map, saves screenshot.png beside this
// file (or $OUT), and stops the app. Environment: PYTHON (default python3), CHROMIUM (default /usr/bin/chromium).
"use strict";

const { spawn } = require("node:child_process");
const net = require("node:net");
const path = require("node:path");
const { chromium } = require("playwright-core");

const APP = path.join(__dirname, "app.py");
const OUT = process.env.OUT || path.join(__dirname, "screenshot.png");
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

async function waitForServer(url, app, seconds) {
  for (let i = 0; i < seconds * 4; i++) {
    if (app.exitCode !== null) throw new Error(`app.py exited with status ${app.exitCode}`);
    try {
      if ((await fetch(url)).ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`${url} did not answer in ${seconds} s`);
}

async function main() {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}/`;
  const args = [APP, "--host", "127.0.0.1", "--port", String(port), ...process.argv.slice(2)];
  const app = spawn(process.env.PYTHON || "python3", args, { stdio: "inherit" });
  let browser;
  try {
    await waitForServer(url, app, 120);
    browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: FLAGS });
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    await page.goto(url);
    await page.getByLabel("Sample video").click();
    await page.getByRole("option").first().click();
    await page.locator("video").first().waitFor({ timeout: 30000 });
    await page.getByRole("button", { name: "Ask" }).click();
    const answer = page.getByLabel("Slow-fast answer (slow path on)");
    await page.waitForFunction((el) => el.value.length > 0, await answer.elementHandle(), { timeout: 60000 });
    await page.locator(".js-plotly-plot, img[src^='data:image'], .matplotlib img").first().waitFor({ timeout: 30000 });
    await page.waitForTimeout(1000); // let the gallery's images decode
    await page.screenshot({ path: OUT, fullPage: true });
    console.log(`saved ${OUT}: slow-fast "${await answer.inputValue()}"`);
  } finally {
    if (browser) await browser.close();
    app.kill("SIGTERM");
  }
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
