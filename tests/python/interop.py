"""Drives a relay-server with the official MCP Python SDK: every tool, two peers, and the
SSE stream of each peer. Exits non-zero with a message on the first thing that is wrong.

usage: interop.py BASE_URL MODE        MODE = auto | legacy
"""
import asyncio
import json
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import Implementation


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAIL: {what}")


async def connect(stack, base, mode, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else None
    http = await stack.enter_async_context(create_mcp_http_client(headers=headers))
    client = await stack.enter_async_context(
        Client(streamable_http_client(f"{base}/mcp", http_client=http), mode=mode,
               client_info=Implementation(name="relay-interop", version="1.0")))
    return client


async def call(client, tool, args, ok=True):
    result = await client.call_tool(tool, args)
    text = " ".join(getattr(c, "text", "") for c in result.content)
    check(bool(result.is_error) != ok, f"{tool}({args}) is_error={result.is_error}: {text}")
    if ok:
        check(isinstance(result.structured_content, dict), f"{tool} has no structuredContent")
    return result.structured_content, text


async def collect(base, reg, events, ready):
    url = f"{base}/notifications/{reg['group_id']}/{reg['peer_id']}"
    async with httpx2.AsyncClient(timeout=None) as http:
        async with http.stream("GET", url, headers={"Authorization": f"Bearer {reg['token']}"}) as resp:
            check(resp.status_code == 200, f"stream status {resp.status_code}")
            ready.set()
            event = None
            async for line in resp.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line[5:].strip())))


async def main(base, mode):
    from contextlib import AsyncExitStack
    async with AsyncExitStack() as stack:
        anon = await connect(stack, base, mode)
        expected = "2026-07-28" if mode == "auto" else "2025-11-25"
        check(anon.protocol_version == expected, f"negotiated {anon.protocol_version}, wanted {expected}")
        tools = sorted(t.name for t in (await anon.list_tools()).tools)
        check(tools == ["get_history", "leave_group", "list_peers", "message_status", "read_new_messages",
                        "register", "send_dm", "send_message"], f"tools {tools}")

        group = f"py-{mode}"
        a, _ = await call(anon, "register", {"group_id": group, "hostname": "pyhost", "working_directory": "/w/alice"})
        b, _ = await call(anon, "register", {"group_id": group, "hostname": "pyhost", "working_directory": "/w/bob",
                                              "git_branch": "main"})
        check(a["display_name"] == "pyhost:alice", f"display name {a}")
        c, _ = await call(anon, "register", {"group_id": group, "hostname": "pyhost", "working_directory": "/w/carol"})

        # alice identifies by header, bob by the token argument, as a stateless client must
        alice = await connect(stack, base, mode, a["token"])
        bob = anon
        tb = {"token": b["token"]}

        events = {"bob": [], "carol": []}
        ready = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(collect(base, b, events["bob"], ready[0])),
                 asyncio.create_task(collect(base, c, events["carol"], ready[1]))]
        await asyncio.wait_for(asyncio.gather(ready[0].wait(), ready[1].wait()), 10)

        peers, _ = await call(alice, "list_peers", {})
        names = sorted(p["display_name"] for p in peers["peers"])
        check(names == ["pyhost:alice", "pyhost:bob", "pyhost:carol"], f"peers {names}")
        check(all(p["online"] for p in peers["peers"] if p["display_name"] != "pyhost:alice"), f"online {peers}")

        await call(alice, "send_message", {"message": "hello from python"})
        dm, _ = await call(alice, "send_dm", {"to": "pyhost:bob", "message": "just for bob"})

        inbox, text = await call(bob, "read_new_messages", tb)
        got = [(m["kind"], m["text"]) for m in inbox["messages"]]
        check(got == [("broadcast", "hello from python"), ("dm", "just for bob")], f"bob's inbox {got}")
        check("not from your user" in inbox["notice"], "untrusted notice")
        again, _ = await call(bob, "read_new_messages", tb)
        check(again["messages"] == [], "second read is empty")
        status, _ = await call(alice, "message_status", {"message_id": dm["message_id"]})
        check([r["state"] for r in status["recipients"]] == ["read"], f"status {status}")

        hist, _ = await call(bob, "get_history", {**tb, "filter": "python"})
        check([m["text"] for m in hist["messages"]] == ["hello from python"], f"history {hist}")
        thread, _ = await call(bob, "get_history", {**tb, "with_peer": a["peer_id"]})
        check([m["text"] for m in thread["messages"]] == ["just for bob"], f"thread {thread}")

        _, err = await call(bob, "send_dm", {**tb, "to": "nobody", "message": "x"}, ok=False)
        check("pyhost:alice" in err, f"unknown-peer error lists candidates: {err}")
        stranger = await connect(stack, base, mode)
        _, err = await call(stranger, "send_message", {"message": "who am I"}, ok=False)
        check("register" in err and "token" in err, f"no-identity error: {err}")
        if mode == "legacy":
            # with sessions, the session that registered is the caller: no token needed
            own, _ = await call(stranger, "register", {"group_id": group + "-solo", "hostname": "pyhost",
                                                       "working_directory": "/w/solo"})
            sent, _ = await call(stranger, "send_message", {"message": "session identity"})
            check(sent["from"]["peer_id"] == own["peer_id"], f"session identity {sent}")

        await call(bob, "send_message", {**tb, "message": "bob says hi"})
        left, _ = await call(bob, "leave_group", {**tb, "group_id": group})
        check(left["peer_id"] == b["peer_id"], f"leave {left}")

        await asyncio.sleep(0.5)
        for t in tasks:
            t.cancel()
        bob_kinds = [(k, e["preview"]) for k, e in events["bob"] if k != "receipt"]
        check(bob_kinds == [("message", "hello from python"), ("dm", "just for bob"), ("peer_left", "pyhost:bob left " + group)],
              f"bob's stream {bob_kinds}")
        # bob's stream also says his copies were read (read_new_messages)
        bob_receipts = [(e["id"], e["state"]) for k, e in events["bob"] if k == "receipt"]
        check(len(bob_receipts) == 2 and all(state == "read" for _, state in bob_receipts), f"bob's receipts {bob_receipts}")
        carol_kinds = [k for k, _ in events["carol"]]
        check(carol_kinds == ["message", "message", "peer_left"], f"carol's stream {carol_kinds}")
        check(all(e.get("recipient") is None for _, e in events["carol"]), "carol saw a DM")
    print(f"ok: python mcp interop, mode={mode}")


asyncio.run(main(sys.argv[1].rstrip("/"), sys.argv[2]))
