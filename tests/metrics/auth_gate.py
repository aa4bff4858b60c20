"""An HTTP gate in front of the test MLflow server that lets through only requests with the right
credentials (HTTP basic auth, or a bearer token), as a tracking server behind an authenticating
proxy would; a thread of the test process (mlflow's own basic-auth app needs an extra package)."""

from __future__ import annotations

import base64
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_SKIPPED_HEADERS = {"host", "authorization", "connection", "content-length", "transfer-encoding"}


class AuthGate:
    def __init__(self, target: str, user: str, password: str, token: str) -> None:
        self.target = target.rstrip("/")
        self.accepted = {
            "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
            f"Bearer {token}",
        }
        self.passed = 0
        self.refused = 0
        self.paths: list[str] = []  # every path asked for (a query string would show here)
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                gate.paths.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.headers.get("Authorization") not in gate.accepted:
                    gate.refused += 1
                    self._reply(401, b"You are not authenticated.", "text/plain")
                    return
                gate.passed += 1
                request = urllib.request.Request(gate.target + self.path, data=body, method=self.command)
                for key, value in self.headers.items():
                    if key.lower() not in _SKIPPED_HEADERS:
                        request.add_header(key, value)
                try:
                    with urllib.request.urlopen(request, timeout=30) as reply:
                        self._reply(reply.status, reply.read(), reply.headers.get("Content-Type"))
                except urllib.error.HTTPError as error:
                    self._reply(error.code, error.read(), error.headers.get("Content-Type"))
                except OSError:
                    self._reply(502, b"gate: MLflow unreachable", "text/plain")

            def _reply(self, status: int, body: bytes, content_type: str | None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type or "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> AuthGate:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
