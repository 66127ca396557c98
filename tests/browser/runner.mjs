// Drives Debian's Chromium for the browser tests (tests/browser/driver.py).
//
//     node tests/browser/runner.mjs
//
// Launches one headless Chromium (never downloads one: CHROMIUM, default
// /usr/bin/chromium), listens on a loopback port, and prints {"port": N} on
// stdout. Each TCP connection is one test's session: its own browser
// context (cookies, storage and pages apart), closed with the connection.
// A session sends JSON commands, one a line, and gets one JSON answer a line
// for each, in the order they finish,
// {id, ok: true, value} or {id, ok: false, error}; what the pages print
// (console, page errors, failed requests) comes as {event: ...} lines.
// Exits when stdin closes (the pytest process that started it is gone).

import net from "node:net";
import readline from "node:readline";
import { chromium } from "playwright-core";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // What this machine needs: no sandbox as root, and nothing that calls out
  // to Google's services (the network is closed).
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

// A function sent as source text ("async (arg) => ...") becomes a function
// again, so that Playwright passes it (and its argument) to the page.
function fn(source) {
  return new Function(`return (${source});`)();
}

async function session(socket) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const pages = new Map();
  let nextPage = 1;
  const send = (obj) => {
    if (!socket.destroyed) socket.write(JSON.stringify(obj) + "\n");
  };
  const ops = {
    async open({ url }) {
      const page = await context.newPage();
      const id = nextPage++;
      pages.set(id, page);
      page.on("console", (m) => send({ event: "console", page: id, type: m.type(), text: m.text() }));
      page.on("pageerror", (e) => send({ event: "pageerror", page: id, text: String(e) }));
      page.on("requestfailed", (r) =>
        send({ event: "requestfailed", page: id, url: r.url(), text: r.failure()?.errorText }),
      );
      if (url) await page.goto(url);
      return id;
    },
    goto: ({ page, url }) => pages.get(page).goto(url).then(() => null),
    evaluate: ({ page, source, arg }) => pages.get(page).evaluate(fn(source), arg),
    async waitFor({ page, source, arg, timeout_ms }) {
      const options = { timeout: timeout_ms, polling: "raf" };
      const handle = await pages.get(page).waitForFunction(fn(source), arg, options);
      return handle.jsonValue();
    },
    screenshot: ({ page, path, fullPage }) =>
      pages.get(page).screenshot({ path, fullPage: Boolean(fullPage) }).then((b) => b.length),
    text: ({ page, selector }) => pages.get(page).locator(selector).innerText(),
    click: ({ page, selector }) => pages.get(page).locator(selector).click().then(() => null),
    fill: ({ page, selector, value }) => pages.get(page).locator(selector).fill(value).then(() => null),
    setOffline: ({ offline }) => context.setOffline(offline).then(() => null),
    emulateHidden: ({ page, hidden }) =>
      pages.get(page).evaluate((h) => {
        Object.defineProperty(document, "visibilityState", { configurable: true, get: () => (h ? "hidden" : "visible") });
        document.dispatchEvent(new Event("visibilitychange"));
      }, hidden).then(() => null),
    closePage: ({ page }) => pages.get(page).close().then(() => pages.delete(page) && null),
  };
  const lines = readline.createInterface({ input: socket });
  socket.on("error", () => {});
  // The session ends when the test closes its connection, also with a reset
  // (it closes with page events still unread): either way, its context goes.
  try {
    for await (const line of lines) {
      let request;
      try {
        request = JSON.parse(line);
      } catch (e) {
        send({ id: null, ok: false, error: `bad command: ${e}` });
        continue;
      }
      const op = ops[request.op];
      if (!op) {
        send({ id: request.id, ok: false, error: `unknown op ${request.op}` });
        continue;
      }
      // Commands run concurrently (a test may wait on a page while it
      // restarts the broker); each answer names its command's id.
      Promise.resolve()
        .then(() => op(request))
        .then(
          (value) => send({ id: request.id, ok: true, value: value === undefined ? null : value }),
          (e) => send({ id: request.id, ok: false, error: String(e && e.stack ? e.stack : e) }),
        );
    }
  } catch (e) {
    if (e.code !== "ECONNRESET") throw e;
  } finally {
    await context.close().catch(() => {});
  }
}

const server = net.createServer((socket) => {
  session(socket).catch((e) => process.stderr.write(`session failed: ${e}\n`));
});
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: server.address().port, version: browser.version() }) + "\n");
});

process.stdin.resume();
process.stdin.on("end", async () => {
  server.close();
  await browser.close();
  process.exit(0);
});
