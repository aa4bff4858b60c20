"""A fault-injecting HTTP proxy for S3, run as its own process in front of moto's server:

    python -m tests.fault_proxy --target http://127.0.0.1:PORT --control FILE

It prints `listening on http://127.0.0.1:PORT` and forwards every request, except those it chooses
to fail. What it fails is read from the JSON control FILE at every request, so a test can change
it at any time (write a new file and rename it over the old one):

    {"rate": 0.3,                        # share of the matching requests that fail, at random
     "every": 2,                         # or: the 1st, 3rd, 5th... request of each operation fails
     "burst": 1,                         # with "every": this many in a row fail (the 1st, 2nd, 5th, 6th...)
     "ops": ["head_bucket", "list", ...], # operations that may fail (default: all)
     "paths": ["run/4/"],                # only requests whose path?query holds one of these
     "faults": ["503", "slowdown", "500", "drop"],   # in turn ("every") or at random
     "outage": false,                    # true: every matching request fails with 503
     "seed": 1}

Operations: head_bucket, head_object, list, list_uploads, get, put, put_part, create_multipart,
complete, abort, delete. Faults: "503" (ServiceUnavailable), "500" (InternalError), "slowdown"
(503 SlowDown), "throttle" (429), "drop" (the request is read, then the connection is closed
without an answer, as a load balancer resetting it does). Failed requests never reach moto.
`GET /__proxy__/stats` answers the counts: {"forwarded": {op: n}, "failed": {op: {fault: n}}}.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import sys
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import click

_ERRORS = {
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "throttle": (429, "Throttling", "Rate exceeded."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def operation(method: str, path: str, query: str) -> str:
    """The S3 operation of a path-style request."""
    params = parse_qs(query, keep_blank_values=True)
    has_key = "/" in path.strip("/")
    if method == "HEAD":
        return "head_object" if has_key else "head_bucket"
    if method == "GET":
        if not has_key:
            return "list_uploads" if "uploads" in params else "list"
        return "get"
    if method == "PUT":
        return "put_part" if "partNumber" in params else "put"
    if method == "POST":
        return "create_multipart" if "uploads" in params else "complete"
    if method == "DELETE":
        return "abort" if "uploadId" in params else "delete"
    return method.lower()


class FaultState:
    def __init__(self, control: Path) -> None:
        self.control = control
        self.lock = threading.Lock()
        self.random = random.Random(0)
        self.seed: object = None
        self.turn = 0
        self.seen: dict[str, int] = defaultdict(int)
        self.forwarded: dict[str, int] = defaultdict(int)
        self.failed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def decide(self, op: str, target: str) -> str | None:
        """The fault for this request, or None to forward it."""
        try:
            settings = json.loads(self.control.read_text())
        except (OSError, ValueError):
            settings = {}
        matches = op in settings.get("ops", [op]) and any(p in target for p in settings.get("paths", [""]))
        faults = settings.get("faults", ["503"])
        with self.lock:
            if settings.get("seed") != self.seed:
                self.seed = settings.get("seed")
                self.random = random.Random(self.seed)
            count = self.seen[op]
            self.seen[op] += 1
            if matches and settings.get("outage"):
                fault = "503"
            elif matches and settings.get("every") and count % settings["every"] < settings.get("burst", 1):
                fault = faults[self.turn % len(faults)]  # every kind in turn, across operations
                self.turn += 1
            elif matches and self.random.random() < settings.get("rate", 0.0):
                fault = self.random.choice(faults)
            else:
                self.forwarded[op] += 1
                return None
            self.failed[op][fault] += 1
            return fault

    def stats(self) -> dict:
        with self.lock:
            return {"forwarded": dict(self.forwarded), "failed": {k: dict(v) for k, v in self.failed.items()}}


def make_handler(target: tuple[str, int], state: FaultState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            url = urlsplit(self.path)
            body = self._body()
            if url.path == "/__proxy__/stats":
                self._reply(200, json.dumps(state.stats()).encode(), {"Content-Type": "application/json"})
                return
            op = operation(self.command, url.path, url.query)
            fault = state.decide(op, unquote(f"{url.path}?{url.query}"))
            if fault == "drop":
                # An abortive close (RST), after the request was read: what a reset looks like.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                self.close_connection = True
                self.connection.close()
                return
            if fault is not None:
                status, code, message = _ERRORS[fault]
                xml = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
                ).encode()
                self._reply(status, xml, {"Content-Type": "application/xml"})
                return
            upstream = http.client.HTTPConnection(*target, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                kept = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                self._reply(response.status, data, kept, head=self.command == "HEAD")
            finally:
                upstream.close()

        def _reply(self, status: int, data: bytes, headers: dict, head: bool = False) -> None:
            self.send_response(status)
            for key, value in headers.items():
                if key.lower() != "content-length":
                    self.send_header(key, value)
            # A HEAD answer carries the object's length but no body.
            length = headers.get("Content-Length", headers.get("content-length")) if head else None
            self.send_header("Content-Length", str(length if length is not None else len(data)))
            self.end_headers()
            if not head and self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


@click.command()
@click.option("--target", required=True, help="The S3 endpoint to forward to (http://host:port).")
@click.option("--control", required=True, type=click.Path(path_type=Path), help="JSON file: what to fail.")
@click.option("--port", type=int, default=0, help="Port to listen on (0: a free one).")
def main(target: str, control: Path, port: int) -> None:
    host_port = urlsplit(target).netloc
    host, _, target_port = host_port.rpartition(":")
    state = FaultState(control)
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler((host, int(target_port)), state))
    server.daemon_threads = True
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
