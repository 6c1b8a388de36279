"""A human in the relay console, in a real browser (Debian's chromium, driven by Playwright).

Usage: console_browser.py CONFIG.json
The config (written by tests/console_browser.rs) holds the sign-in link, the group, the
chromium binary, where to put the screenshot, and the commands that make the agents talk
(each an argv with its environment). Prints "ok: console" and a JSON line of timings.
"""

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from playwright.sync_api import expect, sync_playwright

cfg = json.load(open(sys.argv[1]))
TIMEOUT = 20_000  # ms


def run(name):
    """Runs one of the config's agent commands (an agent sending something)."""
    cmd = cfg["commands"][name]
    out = subprocess.run(cmd["argv"], env={**os.environ, **cmd["env"]}, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed: {out.stdout}{out.stderr}")


async def read_as_agent(mcp_cmd):
    """The agent reads its messages, as Claude Code would, through `relay mcp`."""
    params = StdioServerParameters(command=mcp_cmd["argv"][0], args=mcp_cmd["argv"][1:], env={**os.environ, **mcp_cmd["env"]})
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("read_new_messages", {})
            return "".join(getattr(c, "text", "") for c in result.content)


def timeline(page):
    return page.locator("#timeline")


def main():
    dialogs = []
    timings = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=cfg["chromium"], args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        # sign in with the link relay console printed; it lands on the only group
        started = time.monotonic()
        page.goto(cfg["link"])
        page.click("#sign-in")  # opening the link uses nothing up; this does
        expect(page.locator("main.group")).to_have_attribute("data-group", cfg["group"], timeout=TIMEOUT)
        expect(page.locator(".who")).to_contain_text(cfg["human"])
        expect(page.locator("#stream-state")).to_have_text("live", timeout=TIMEOUT)
        timings["sign_in_to_live_ms"] = round((time.monotonic() - started) * 1000)

        # the peers panel: who is a human, and what an agent's session is doing
        peers = page.locator("#peers")
        expect(peers.locator("li.peer.human")).to_contain_text(cfg["human"])
        expect(peers.locator("li.peer", has_text=cfg["busy_agent"])).to_contain_text("busy", timeout=TIMEOUT)

        # the link works once
        other = browser.new_context().new_page()
        other.goto(cfg["link"])
        expect(other.locator("body")).to_contain_text("used already or has expired")
        other.context.close()

        # the cookie goes to another relay-server on the same host (cookies ignore ports); it
        # means nothing there
        other = context.new_page()
        other.goto(cfg["other_server"] + "/console")
        expect(other.locator("body")).to_contain_text("not signed in")

        # a page of another site posts to the console: refused, nothing sent
        other.goto(cfg["foreign_page"])
        status = other.evaluate(
            """async ([url, text]) => {
                const body = new URLSearchParams({csrf: 'guess', text, to: ''});
                try { const r = await fetch(url, {method: 'POST', body, credentials: 'include'}); return r.status; }
                catch (e) { return 'blocked: ' + e; }
            }""",
            [cfg["server"] + "/console/g/" + cfg["group"] + "/send", cfg["texts"]["forged"]],
        )
        other.close()
        page.wait_for_timeout(300)
        if cfg["texts"]["forged"] in page.content():
            raise SystemExit(f"another site's post was sent (fetch said {status})")

        # a broadcast appears without a reload
        run("broadcast")
        expect(timeline(page)).to_contain_text(cfg["texts"]["broadcast"], timeout=TIMEOUT)

        # another human's agents' DM never shows; the broadcast after it does
        run("foreign_dm")
        run("after_foreign_dm")
        expect(timeline(page)).to_contain_text(cfg["texts"]["after_foreign_dm"], timeout=TIMEOUT)
        if cfg["texts"]["foreign_dm"] in page.content():
            raise SystemExit("another human's agents' DM showed in the console")

        # a DM between this human's own agents (on two machines) shows
        run("own_dm")
        expect(timeline(page)).to_contain_text(cfg["texts"]["own_dm"], timeout=TIMEOUT)

        # the activity panel follows: who sent, who DMs whom (no reload)
        expect(page.locator("#activity")).to_contain_text("bob1", timeout=TIMEOUT)
        expect(page.locator("#activity table.dms")).to_contain_text("carol", timeout=TIMEOUT)

        # the human DMs an agent; it reads it; the mark moves to read
        page.select_option("#compose select[name=to]", label="DM " + cfg["dm_to"])
        page.fill("#compose textarea", cfg["texts"]["human_dm"])
        page.click("#compose button[type=submit]")
        own = page.locator("li.entry.own", has_text=cfg["texts"]["human_dm"])
        expect(own).to_have_count(1, timeout=TIMEOUT)
        expect(page.locator("#compose textarea")).to_have_value("")
        # (on a thread of its own: Playwright's sync API holds this one's event loop)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            read = pool.submit(asyncio.run, read_as_agent(cfg["commands"]["read_mcp"])).result(timeout=60)
        if cfg["texts"]["human_dm"] not in read:
            raise SystemExit(f"the agent did not get the human's DM: {read}")
        expect(own.locator(".mark.st-read")).to_have_count(1, timeout=TIMEOUT)

        # hostile text stays text and runs nothing
        run("hostile")
        hostile = page.locator("li.entry", has_text="desrever")
        expect(hostile).to_have_count(1, timeout=TIMEOUT)
        body = hostile.locator(".body").inner_text()
        for shown in ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "</div>", "␛[31m", "⟨U+202E⟩"]:
            if shown not in body:
                raise SystemExit(f"{shown!r} is not shown as text in {body!r}")
        if hostile.locator("script, img, div.body div").count() != 0:
            raise SystemExit("hostile text became elements")
        scripts = page.evaluate("Array.from(document.scripts).map(s => s.src)")
        if len(scripts) != 1 or not scripts[0].endswith("/console.js"):
            raise SystemExit(f"unexpected scripts on the page: {scripts}")
        page.wait_for_timeout(300)
        if dialogs:
            raise SystemExit(f"a dialog opened: {dialogs}")

        # a live message's way into the DOM, timed in the browser
        page.evaluate(
            """() => { window.__seen = {}; new MutationObserver(ms => { for (const m of ms) for (const n of m.addedNodes)
                 if (n.dataset && n.dataset.seq) window.__seen[n.textContent] = performance.now(); })
                 .observe(document.getElementById('timeline'), {childList: true}); }"""
        )
        t0 = page.evaluate("performance.now()")
        run("timed")
        page.wait_for_function("() => Object.keys(window.__seen).some(k => k.includes('timed message'))", timeout=TIMEOUT)
        seen_at = page.evaluate("Object.entries(window.__seen).find(([k]) => k.includes('timed message'))[1]")
        timings["send_to_dom_ms_incl_cli_start"] = round(seen_at - t0)

        page.screenshot(path=cfg["screenshot"], full_page=False)
        if errors:
            raise SystemExit(f"console errors in the page: {errors}")
        browser.close()
    print("ok: console")
    print(json.dumps(timings))


main()
