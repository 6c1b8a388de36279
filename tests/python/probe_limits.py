"""The adversarial probes behind README's "Reliability" figures, against a real relay-server.

    python3 tests/python/probe_limits.py target/dist/relay-server

Starts the server on 127.0.0.1 (a temporary data dir, a short client timeout so the run is
quick), then measures and prints:
  - half-sent request heads: how many of 2,000 are still open after 2 x client_timeout;
  - unauthenticated MCP sessions: RSS after 20,000 bare `initialize`s, and sessions kept;
  - a stalled reader: RSS while 1,024 messages of 64 KB go to a group one stream never reads.
Standard library only; nothing here is a test (figures, not pass/fail).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CLIENT_TIMEOUT = 3


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/mcp", data=json.dumps(body).encode(), method="POST")
    req.add_header("content-type", "application/json")
    req.add_header("accept", "application/json, text/event-stream")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(resp.headers), resp.read()


def call(port, tool, args, token=None):
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args, "_meta": meta}}
    headers = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": tool}
    if token:
        headers["authorization"] = f"Bearer {token}"
    _, raw = post(port, body, headers)
    text = raw.decode()
    if text.startswith("event:") or text.startswith("data:"):
        text = next(l[5:] for l in text.splitlines() if l.startswith("data:"))
    return json.loads(text)["result"]["structuredContent"]


def metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def half_heads(port, n=2000):
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    time.sleep(2 * CLIENT_TIMEOUT + 2)
    open_ = 0
    for s in socks:
        s.setblocking(False)
        try:
            open_ += 0 if s.recv(1) == b"" else 1
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
        s.close()
    return open_


def bare_sessions(port, n=20000):
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}}}
    for _ in range(n):
        post(port, init)


def stalled_reader(port, pid, n=1024, size=64 * 1024 - 16):
    sender = call(port, "register", {"group_id": "stall", "hostname": "probe", "working_directory": "/a"})
    # a relayd's stream (it carries whole texts) that is opened and never read
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/daemons", data=b'{"hostname": "stalled"}', method="POST")
    req.add_header("content-type", "application/json")
    daemon = json.loads(urllib.request.urlopen(req, timeout=10).read())
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/peers", method="POST",
                                 data=json.dumps({"group_id": "stall", "hostname": "stalled", "working_directory": "/b"}).encode())
    req.add_header("content-type", "application/json")
    req.add_header("authorization", f"Bearer {daemon['token']}")
    urllib.request.urlopen(req, timeout=10).read()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall((f"GET /v1/groups/stall/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Authorization: Bearer {daemon['token']}\r\nAccept: text/event-stream\r\n\r\n").encode())
    text = "x" * size
    before = rss_mb(pid)
    for i in range(n):
        call(port, "send_message", {"message": f"{i:05}{text}"}, sender["token"])
    after = rss_mb(pid)
    s.close()
    return before, after


class Server:
    """A relay-server of its own for one probe, on a temporary data dir."""

    def __init__(self, binary):
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory()
        config = os.path.join(self.dir.name, "config.toml")
        with open(config, "w") as f:
            f.write(f"client_timeout_secs = {CLIENT_TIMEOUT}\nheartbeat_secs = 2\nrate_burst = 100000\nrate_per_second = 100000.0\n")
        data = os.path.join(self.dir.name, "data")
        self.proc = subprocess.Popen([binary, "--listen", f"127.0.0.1:{self.port}", "--data-dir", data, "--config", config],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)

    def rss(self):
        return rss_mb(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.dir.cleanup()


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/dist/relay-server"
    s = Server(binary)
    print(f"idle RSS {s.rss():.1f} MB")
    print(f"half-sent heads still open after {2 * CLIENT_TIMEOUT + 2} s: {half_heads(s.port)} of 2000")
    s.stop()

    s = Server(binary)
    before, started = s.rss(), time.time()
    bare_sessions(s.port)
    print(f"20,000 bare initializes in {time.time() - started:.1f} s: RSS {before:.1f} -> {s.rss():.1f} MB, "
          f"sessions kept {metric(s.port, 'relay_mcp_sessions'):.0f}, "
          f"closed for room {metric(s.port, 'relay_mcp_sessions_closed_for_room_total'):.0f}")
    s.stop()

    s = Server(binary)
    before, after = stalled_reader(s.port, s.proc.pid)
    print(f"a stream not read while 1,024 x 64 KB went to its group: RSS {before:.1f} -> {after:.1f} MB "
          f"(live buffer estimate {metric(s.port, 'relay_live_buffer_bytes') / 2**20:.1f} MB)")
    s.stop()


if __name__ == "__main__":
    main()
