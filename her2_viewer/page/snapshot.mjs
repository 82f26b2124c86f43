// Open the viewer page in headless Chromium (puppeteer-core, the system browser), wait until the
// viewer is set up and the network is quiet, save a screenshot, and print one JSON line:
// {"her2": <window.her2>, "geometry": <window.her2Geometry()>, "rendered": <map drew all its tiles>,
//  "console": [{type, text}], "responses": [{url, status}], "failed": [url]}.
//
//   node her2_viewer/page/snapshot.mjs URL OUT.png [CHROMIUM]   (CHROMIUM defaults to /usr/bin/chromium)
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import puppeteer from "puppeteer-core";

const [url, png, executablePath = "/usr/bin/chromium"] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), "her2-chromium-"));
const browser = await puppeteer.launch({
  executablePath,
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", `--user-data-dir=${profile}`,
    // WebGL (the viewer draws with it) in software:
    "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist",
  ],
});
const report = { her2: null, rendered: false, console: [], responses: [], failed: [] };
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1000, height: 800 });
  page.on("console", (message) => report.console.push({ type: message.type(), text: message.text() }));
  page.on("pageerror", (error) => report.console.push({ type: "pageerror", text: String(error) }));
  page.on("response", (response) => report.responses.push({ url: response.url(), status: response.status() }));
  page.on("requestfailed", (request) => report.failed.push(request.url()));
  await page.goto(url, { waitUntil: "load", timeout: 60000 });
  await page.waitForFunction("window.her2 && (window.her2.ready || window.her2.error)", { timeout: 90000 });
  await page.waitForNetworkIdle({ idleTime: 2500, timeout: 90000 });
  report.rendered = await Promise.race([
    page.evaluate(() => (window.her2Rendered ? window.her2Rendered() : false)),
    new Promise((resolve) => setTimeout(() => resolve(false), 30000)),
  ]);
  await new Promise((resolve) => setTimeout(resolve, 500));
  report.her2 = await page.evaluate(() => window.her2);
  report.geometry = await page.evaluate(() => window.her2Geometry && window.her2Geometry());
  await page.screenshot({ path: png });
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(report));
