"""The uploader's client: what the trainer imports. One REQ socket, a timeout on every call (a
REQ socket that missed its reply is closed and replaced, since it cannot send again), and
errors as UploaderError. Safe to share between threads (calls are serialised)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import zmq

from ckpt_uploader.protocol import PROTOCOL_VERSION

_WAIT_MARGIN_S = 5.0  # a wait reply may come this long after the wait's own timeout


class UploaderError(RuntimeError):
    """An error reply from the uploader, or no reply in time."""


class UploaderClient:
    def __init__(
        self,
        address: str,
        timeout_s: float = 10,
        curve_server_key: str | bytes | Path | None = None,
        curve_client_key: str | Path | None = None,
    ) -> None:
        """``curve_server_key``: the uploader's public key (Z85 text or its server.key file); it
        switches CURVE on. ``curve_client_key``: this client's .key_secret file, needed when the
        uploader accepts only authorized clients; default: a fresh key pair."""
        self.address = address
        self.timeout_s = timeout_s
        self._context = zmq.Context.instance()
        self._lock = threading.Lock()
        self._curve: tuple[bytes, bytes, bytes] | None = None
        if curve_server_key is not None:
            from ckpt_uploader.curve import load_key_pair, load_public_key

            server_public = load_public_key(curve_server_key)
            public, secret = load_key_pair(curve_client_key) if curve_client_key else zmq.curve_keypair()
            self._curve = (server_public, public, secret)
        self._socket: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.REQ)
        socket.linger = 0
        if self._curve:
            socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = self._curve
        socket.connect(self.address)
        return socket

    def _call(self, request: dict, timeout_s: float | None = None) -> dict:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._socket is None:
                self._socket = self._connect()
            socket = self._socket
            socket.send(json.dumps({"v": PROTOCOL_VERSION, **request}).encode("utf-8"))
            if not socket.poll(int(timeout_s * 1000)):
                socket.close(0)  # a REQ socket waiting for a lost reply can never send again
                self._socket = None
                raise UploaderError(
                    f"no reply from the uploader at {self.address} within {timeout_s:g} s ({request['op']})"
                )
            reply = json.loads(socket.recv())
        if not reply.get("ok"):
            raise UploaderError(f"uploader at {self.address} refused {request['op']}: {reply.get('error')}")
        return reply

    def ping(self) -> None:
        self._call({"op": "ping"})

    def submit(self, job_id: str, src: str, dst: str, files: list[dict], marker: str) -> None:
        """Returns once the uploader has journaled the job (it will finish it even if it restarts)."""
        self._call(
            {"op": "submit", "job_id": job_id, "src": src, "dst": dst, "files": files, "marker": marker}
        )

    def status(self, job_id: str | None = None) -> dict:
        """One job's {job_id, state, bytes_done, bytes_total, error, ...}, or {"jobs": [...]}."""
        if job_id is None:
            return {"jobs": self._call({"op": "status"})["jobs"]}
        return self._call({"op": "status", "job_id": job_id})["job"]

    def wait(self, job_id: str, timeout_s: float) -> dict:
        """The job's status once it is done or failed, or after ``timeout_s`` (then
        ``timed_out`` is True and the state is queued or uploading)."""
        reply = self._call(
            {"op": "wait", "job_id": job_id, "timeout": timeout_s}, timeout_s=timeout_s + _WAIT_MARGIN_S
        )
        return {**reply["job"], "timed_out": reply["timed_out"]}

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close(0)
                self._socket = None

    def __enter__(self) -> UploaderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
