"""A real HTTP webhook on a loopback port (http.server in a thread) that records what it receives;
`fail_first` answers the first N requests with 500, `stall` never answers."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Webhook:
    def __init__(self, fail_first: int = 0, stall: bool = False) -> None:
        self.received: list[dict] = []
        self.paths: list[str] = []
        self.requests = 0
        self.fail_first = fail_first
        self.stall = stall
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                hook.requests += 1
                if hook.stall:
                    time.sleep(30)
                    return
                if hook.requests <= hook.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                hook.content_types = self.headers["Content-Type"]
                hook.received.append(json.loads(body))
                hook.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"code": 0}')

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/open-apis/bot/v2/hook/secret-token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout_s: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
