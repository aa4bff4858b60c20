"""Transient failures between the uploader and S3 (connections dropped by a flaky network or a
load balancer) are retried by botocore's retry mode until the upload completes; the object is
then whole."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid

from ckpt_uploader.stores import open_store


class FlakyProxy:
    """TCP proxy in front of moto that drops its first `drops` connections at once, then forwards."""

    def __init__(self, target_url: str, drops: int) -> None:
        self.target = ("127.0.0.1", int(target_url.rsplit(":", 1)[1]))
        self.drops_left = drops
        self.dropped = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.drops_left > 0:
                self.drops_left -= 1
                self.dropped += 1
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_dropped_connections_are_retried_and_the_objects_arrive_whole(
    s3_server, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="ckpt_uploader")
    bucket = s3_server.make_bucket(f"flaky-{uuid.uuid4().hex[:8]}")
    proxy = FlakyProxy(s3_server.endpoint_url, drops=3)
    try:
        for key, value in {**s3_server.env, "AWS_ENDPOINT_URL": proxy.url}.items():
            monkeypatch.setenv(key, value)
        store = open_store(f"boto3:s3://{bucket}/run", part_size_bytes=5 * 1024 * 1024)
        small, large = tmp_path / "small.bin", tmp_path / "large.bin"
        small.write_bytes(os.urandom(1000))
        large.write_bytes(os.urandom(12 * 1024 * 1024))  # three parts
        for path in (small, large):
            store.put_file(path, path.name)
        assert proxy.dropped == 3
        assert "succeeded after" in caplog.text  # the store reports calls that needed retries
        client = s3_server.client()
        for path in (small, large):
            body = client.get_object(Bucket=bucket, Key=f"run/{path.name}")["Body"].read()
            assert hashlib.sha256(body).digest() == hashlib.sha256(path.read_bytes()).digest()
    finally:
        proxy.close()
