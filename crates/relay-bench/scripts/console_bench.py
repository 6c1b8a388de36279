"""relay-bench's console scenario: a real browser (Debian's chromium, Playwright) on the
console of a running relay-server; an agent sends N messages through the daemon API and
the page times each one's arrival in its DOM.

Usage: console_bench.py CONFIG.json  (server, link, chromium, send_url, daemon_token, group, messages)
Prints one JSON line: first_render_ms, page_bytes, latencies_ms (sent → in the DOM).
"""

import json
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

cfg = json.load(open(sys.argv[1]))


def send(text):
    body = json.dumps({"message": text}).encode()
    request = urllib.request.Request(cfg["send_url"], data=body, method="POST")
    request.add_header("Authorization", "Bearer " + cfg["daemon_token"])
    request.add_header("Content-Type", "application/json")
    urllib.request.urlopen(request, timeout=30).read()


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=cfg["chromium"], args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page()
    # sign in (the link redirects to the group), then time a fresh load of the page itself
    page.goto(cfg["link"])
    page.click("#sign-in")
    page.wait_for_selector("main.group")
    page.goto(cfg["server"] + "/console/g/" + cfg["group"], wait_until="load")
    page.wait_for_function("() => document.getElementById('stream-state').textContent === 'live'", timeout=20_000)
    timing = page.evaluate(
        """() => {
            const nav = performance.getEntriesByType('navigation')[0];
            const paint = performance.getEntriesByName('first-contentful-paint')[0];
            const bytes = [nav, ...performance.getEntriesByType('resource')].reduce((n, e) => n + (e.transferSize || e.encodedBodySize || 0), 0);
            return { first_render_ms: paint ? paint.startTime : nav.domContentLoadedEventEnd, page_bytes: bytes };
        }"""
    )
    page.evaluate(
        """() => { window.__arrived = []; new MutationObserver(ms => { const at = performance.timeOrigin + performance.now();
             for (const m of ms) for (const n of m.addedNodes) if (n.dataset && n.dataset.seq) window.__arrived.push([n.textContent, at]); })
             .observe(document.getElementById('timeline'), {childList: true}); }"""
    )
    sent = {}
    for i in range(cfg["messages"]):
        key = f"bench message {i:04d}"
        sent[key] = time.time() * 1000
        send(key)
        time.sleep(0.05)
    page.wait_for_function(f"() => window.__arrived.length >= {cfg['messages']}", timeout=30_000)
    arrived = page.evaluate("window.__arrived")
    latencies = []
    for text, at in arrived:
        for key, t0 in sent.items():
            if key in text:
                latencies.append(at - t0)
    browser.close()
print(json.dumps({**timing, "latencies_ms": latencies}))
