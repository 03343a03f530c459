#!/usr/bin/env node
// Drives the ClawOS web console in Debian's Chromium through playwright-core (no
// browser is downloaded): log in with an operator token, see a running VM and its
// console log, check that a cross-site form post cannot stop it, stop it from the page,
// log out.
//
//   node console_check.mjs --url https://127.0.0.1:PORT --token-file PATH --vm NAME \
//        --shots DIR [--ca PATH]
//
// Every step must finish within STEP_MS; a step that does not fails the script with a
// message on stderr (and a screenshot `failed-<step>.png`). Each step that passes
// prints `console_check: <step> ok (<ms> ms)`.
//
// Environment: CLAWOS_CHROMIUM (default /usr/bin/chromium).

import { chromium } from "playwright-core";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import path from "node:path";

const STEP_MS = 60_000;
const POLL_MS = 250;

// ---------------------------------------------------------------------------
// Arguments

function parseArgs(argv) {
  const known = new Set(["url", "token-file", "vm", "shots", "ca"]);
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith("--") || !known.has(a.slice(2))) usage(`unknown argument ${JSON.stringify(a)}`);
    const v = argv[i + 1];
    if (v === undefined || v.startsWith("--")) usage(`${a} needs a value`);
    out[a.slice(2)] = v;
    i++;
  }
  for (const k of ["url", "token-file", "vm", "shots"]) if (!out[k]) usage(`--${k} is required`);
  return out;
}

function usage(problem) {
  process.stderr.write(
    `console_check: ${problem}\n` +
      "usage: node console_check.mjs --url https://127.0.0.1:PORT --token-file PATH --vm NAME --shots DIR [--ca PATH]\n",
  );
  process.exit(2);
}

const args = parseArgs(process.argv.slice(2));
const base = args.url.replace(/\/+$/, "");
const vm = args.vm;
const token = fs.readFileSync(args["token-file"], "utf8").trim();
if (!token) usage(`${args["token-file"]} is empty`);
fs.mkdirSync(args.shots, { recursive: true });

// ---------------------------------------------------------------------------
// Helpers

class StepFailure extends Error {}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Calls `probe` until it returns something truthy, for at most `ms`. */
async function until(what, probe, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const v = await probe();
      if (v) return v;
      last = undefined;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) {
      throw new StepFailure(`timed out after ${ms} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ""}`);
    }
    await sleep(POLL_MS);
  }
}

function withDeadline(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new StepFailure(`${what} did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

let browser = null;
let page = null;
const pageProblems = [];

async function shot(name) {
  if (!page || page.isClosed()) return;
  await page.screenshot({ path: path.join(args.shots, name), fullPage: true });
}

async function step(name, body) {
  const t0 = Date.now();
  try {
    await withDeadline(body(), STEP_MS, `step "${name}"`);
  } catch (e) {
    process.stderr.write(`console_check: ${name} FAILED after ${Date.now() - t0} ms: ${e && e.stack ? e.stack : e}\n`);
    if (pageProblems.length) process.stderr.write(`console_check: the page reported:\n  ${pageProblems.join("\n  ")}\n`);
    try {
      await withDeadline(shot(`failed-${name.replace(/[^a-z0-9]+/gi, "-")}.png`), 10_000, "failure screenshot");
    } catch (_) {
      // The failure is what matters.
    }
    if (browser) await browser.close().catch(() => {});
    process.exit(1);
  }
  console.log(`console_check: ${name} ok (${Date.now() - t0} ms)`);
}

/** A same-origin request made by the console page itself (its cookie, its origin). */
async function pageFetch(method, urlPath) {
  return page.evaluate(
    async ([m, p]) => {
      const r = await fetch(p, { method: m, credentials: "same-origin", cache: "no-store" });
      const text = await r.text();
      return { status: r.status, text };
    },
    [method, urlPath],
  );
}

function vmRow(name) {
  return page.locator(`#vm-table tr[data-vm="${name}"]`);
}

async function vmStateText(name) {
  const cell = vmRow(name).locator(".vm-state");
  if ((await cell.count()) !== 1) return null;
  return (await cell.textContent()).trim();
}

// ---------------------------------------------------------------------------
// Before the browser: the server at --url is the one whose certificate --ca holds.

if (args.ca) {
  const ca = fs.readFileSync(args.ca);
  await withDeadline(
    new Promise((resolve, reject) => {
      const req = https.get(`${base}/healthz`, { ca, timeout: 10_000 }, (res) => {
        res.resume();
        res.on("end", () => (res.statusCode === 200 ? resolve() : reject(new Error(`/healthz answered ${res.statusCode}`))));
      });
      req.on("timeout", () => req.destroy(new Error("timed out")));
      req.on("error", reject);
    }),
    15_000,
    "the TLS check against --ca",
  ).catch((e) => {
    process.stderr.write(`console_check: ${base} is not the server of ${args.ca}: ${e.message}\n`);
    process.exit(1);
  });
}

// ---------------------------------------------------------------------------
// The browser

// playwright-core's launch() gives Chromium a fresh, temporary user-data dir of its own.
browser = await chromium.launch({
  executablePath: process.env.CLAWOS_CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  timeout: STEP_MS,
});
// The control plane's certificate is self-signed and Chromium has no way to be told
// to trust just it here, so certificate errors are ignored for this context. That is
// acceptable for this test only: the check above verified over TLS, against --ca,
// that the server at --url holds that certificate.
const context = await browser.newContext({
  ignoreHTTPSErrors: true,
  viewport: { width: 1280, height: 900 },
  locale: "en-US",
  timezoneId: "UTC",
});
context.setDefaultTimeout(STEP_MS);
page = await context.newPage();
page.on("pageerror", (e) => pageProblems.push(`script error: ${e.message}`));
page.on("console", (msg) => {
  const text = msg.text();
  if (/Content Security Policy|Refused to (load|execute|apply|connect|frame)/i.test(text)) {
    pageProblems.push(`CSP violation: ${text}`);
  }
});

await step("login form", async () => {
  const resp = await page.goto(`${base}/`, { waitUntil: "domcontentloaded" });
  if (!resp || resp.status() !== 200) throw new StepFailure(`GET / answered ${resp ? resp.status() : "nothing"}`);
  const csp = resp.headers()["content-security-policy"] || "";
  if (!/script-src 'self'/.test(csp)) throw new StepFailure(`the page has no strict CSP: ${JSON.stringify(csp)}`);
  await page.locator("#login-token").waitFor({ state: "visible" });
  await page.locator("#login-submit").waitFor({ state: "visible" });
  const type = await page.locator("#login-token").getAttribute("type");
  if (type !== "password") throw new StepFailure(`#login-token is type=${type}, not password`);
  await shot("login.png");
});

let operator = "";
await step("log in", async () => {
  await page.locator("#login-token").fill(token);
  await page.locator("#login-submit").click();
  await page.locator("#operator-name").waitFor({ state: "visible" });
  const who = await until("the session to be readable", async () => {
    const r = await pageFetch("GET", "/api/v1/sessions/current");
    return r.status === 200 ? JSON.parse(r.text) : null;
  });
  operator = who.operator;
  await until(`#operator-name to read ${JSON.stringify(operator)}`, async () => {
    return (await page.locator("#operator-name").textContent()).trim() === operator;
  });
  if ((await page.locator("#login-token").inputValue().catch(() => "")) !== "") {
    throw new StepFailure("the token is still in the login field after logging in");
  }
  await shot("logged-in.png");
});

await step("running VM and its console", async () => {
  await until(`VM ${vm} listed as running`, async () => (await vmStateText(vm)) === "running");
  await vmRow(vm).locator("button.vm-select").click();
  await until("#console-log to show output", async () => {
    const text = await page.locator("#console-log").textContent();
    return text.trim().length > 0;
  });
  await shot("vms.png");
});

await step("cross-site form post refused", async () => {
  const target = `${base}/api/v1/vms/${encodeURIComponent(vm)}/stop`;
  const attackPage =
    "<!doctype html><html><head><meta charset=utf-8><title>not the console</title></head><body>" +
    `<form id="f" method="POST" action="${target}"><input type="hidden" name="stop" value="1"></form>` +
    "<script>document.getElementById('f').submit();</script></body></html>";
  const attacker = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
    res.end(attackPage);
  });
  await new Promise((resolve, reject) => {
    attacker.once("error", reject);
    attacker.listen(0, "127.0.0.1", resolve);
  });
  const attackerUrl = `http://127.0.0.1:${attacker.address().port}/`;
  const other = await context.newPage();
  try {
    const answered = other.waitForResponse((r) => r.url() === target && r.request().method() === "POST");
    await other.goto(attackerUrl, { waitUntil: "domcontentloaded" });
    const resp = await answered;
    const status = resp.status();
    let body = "";
    try {
      body = (await resp.text()).slice(0, 300);
    } catch (_) {
      body = "(body not readable)";
    }
    const sentCookie = /clawos_session=/.test((await resp.request().allHeaders()).cookie || "");
    console.log(
      `console_check: the cross-site POST from ${attackerUrl} to ${target} got ${status}` +
        ` (session cookie sent: ${sentCookie ? "yes" : "no"}): ${body.replace(/\s+/g, " ")}`,
    );
    if (status < 400) throw new StepFailure(`the cross-site form post was answered ${status}`);
  } finally {
    await other.close();
    attacker.close();
  }
  // The VM is untouched: as the API tells the console page, and as the page shows
  // after its next refreshes.
  const r = await pageFetch("GET", `/api/v1/vms/${encodeURIComponent(vm)}`);
  if (r.status !== 200) throw new StepFailure(`GET /api/v1/vms/${vm} from the page answered ${r.status}: ${r.text}`);
  const after = JSON.parse(r.text);
  if (after.state !== "running") throw new StepFailure(`after the cross-site post ${vm} is ${after.state}`);
  await sleep(2500);
  const shown = await vmStateText(vm);
  if (shown !== "running") throw new StepFailure(`after the cross-site post the page shows ${vm} as ${shown}`);
});

await step("stop from the page", async () => {
  const stop = vmRow(vm).locator("button.vm-stop");
  await stop.waitFor({ state: "visible" });
  await stop.click();
  await until("the stop to show as busy", async () => {
    const busy = await stop.getAttribute("aria-busy").catch(() => null);
    const st = await vmStateText(vm);
    return busy === "true" || st === "stopping" || st === "stopped";
  }, 10_000);
  await shot("stopping.png");
  await until(`VM ${vm} shown as stopped`, async () => (await vmStateText(vm)) === "stopped");
  await shot("stopped.png");
});

await step("log out", async () => {
  await page.locator("#logout").click();
  await page.locator("#login-token").waitFor({ state: "visible" });
  await page.locator("#app-view").waitFor({ state: "hidden" });
  const r = await pageFetch("GET", "/api/v1/vms");
  if (r.status !== 401) throw new StepFailure(`GET /api/v1/vms after logout answered ${r.status}, not 401: ${r.text}`);
  await shot("logged-out.png");
});

await step("no script errors or CSP violations", async () => {
  if (pageProblems.length) throw new StepFailure(pageProblems.join("; "));
});

await browser.close();
process.exit(0);
