#!/usr/bin/env python3
"""A scripted stand-in for the Anthropic Messages API, so the real Claude Code CLI runs
offline in tests (stdlib only).

    python3 fake_anthropic.py --rules RULES.json --log REQUESTS.jsonl --port-file PORT

Claude Code calls POST /v1/messages?beta=true and streams the answer (SSE). Every request
body is appended to --log as one JSON line: {"t", "path", "body", "reply"}. The answer comes
from --rules, read again on every request so a test can change the script between steps:

    {"rules": [{"match": REGEX, "on": "text"|"tool_result"|"any", "once": BOOL, "reply": REPLY}],
     "default": REPLY}

REGEX is searched in the request's latest turn: the last user message (its text and tool
results) plus any system-role messages after it (where Claude Code puts what arrives while
a tool runs). "on" (default "any") says whether that turn must carry a tool result or not.
REPLY is {"text": "..."} or {"tool_use": {"name": ..., "input": {...}}, "text": optional},
optionally with "delay" seconds; "$1", "$2", … in any string of it take the regex's groups.
The first matching rule wins (a "once" rule fires once); else "default", else "ok".
"""
import argparse
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
FIRED = set()


def text_of(content):
    if isinstance(content, str):
        return content, False
    parts, tool_result = [], False
    for block in content or []:
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text", ""))
        elif kind == "tool_result":
            tool_result = True
            inner = block.get("content")
            parts.append(inner if isinstance(inner, str) else "\n".join(b.get("text", "") for b in inner or []))
    return "\n".join(parts), tool_result


def latest_turn(body):
    messages = body.get("messages", [])
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return "", False
    text, tool_result = text_of(messages[last_user].get("content"))
    extra = [text_of(m.get("content"))[0] for m in messages[last_user + 1:]]
    return "\n".join([text] + extra), tool_result


def substitute(value, groups):
    if isinstance(value, str):
        return re.sub(r"\$(\d)", lambda m: groups[int(m.group(1)) - 1] or "", value)
    if isinstance(value, dict):
        return {k: substitute(v, groups) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, groups) for v in value]
    return value


def choose(rules_path, body):
    try:
        with open(rules_path) as f:
            script = json.load(f)
    except (OSError, ValueError):
        script = {}
    text, tool_result = latest_turn(body)
    for i, rule in enumerate(script.get("rules", [])):
        on = rule.get("on", "any")
        if (on == "text" and tool_result) or (on == "tool_result" and not tool_result):
            continue
        with LOCK:
            if rule.get("once") and i in FIRED:
                continue
            found = re.search(rule.get("match", ""), text, re.S)
            if found:
                if rule.get("once"):
                    FIRED.add(i)
                return substitute(rule["reply"], found.groups())
    return script.get("default", {"text": "ok"})


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    rules = log = None

    def log_message(self, *_):
        pass

    def send_json(self, code, value):
        data = json.dumps(value).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def record(self, body, reply):
        with LOCK, open(self.log, "a") as f:
            f.write(json.dumps({"t": time.time(), "path": self.path, "body": body, "reply": reply}) + "\n")

    def do_GET(self):
        self.send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": "stand-in"}})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        if "count_tokens" in self.path:
            return self.send_json(200, {"input_tokens": 100})
        if not self.path.startswith("/v1/messages"):
            return self.send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": "stand-in"}})
        reply = choose(self.rules, body)
        self.record(body, reply)
        time.sleep(float(reply.get("delay", 0)))
        blocks = []
        if reply.get("text"):
            blocks.append({"type": "text", "text": reply["text"]})
        if reply.get("tool_use"):
            use = reply["tool_use"]
            blocks.append({"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:20], "name": use["name"], "input": use.get("input", {})})
        blocks = blocks or [{"type": "text", "text": "ok"}]
        stop = "tool_use" if reply.get("tool_use") else "end_turn"
        model = body.get("model", "claude-sonnet-4-5")
        usage = {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        message_id = "msg_" + uuid.uuid4().hex[:20]
        if not body.get("stream"):
            return self.send_json(200, {"id": message_id, "type": "message", "role": "assistant", "model": model,
                                        "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": usage})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def event(name, data):
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        event("message_start", {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage}})
        for i, block in enumerate(blocks):
            if block["type"] == "text":
                start = {"type": "text", "text": ""}
                delta = {"type": "text_delta", "text": block["text"]}
            else:
                start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            event("content_block_start", {"type": "content_block_start", "index": i, "content_block": start})
            event("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta})
            event("content_block_stop", {"type": "content_block_stop", "index": i})
        event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                "usage": {"output_tokens": 5}})
        event("message_stop", {"type": "message_stop"})
        self.close_connection = True


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    Api.rules, Api.log = args.rules, args.log
    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os
    os.replace(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
