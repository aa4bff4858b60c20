"""Storage URIs and the two stores, used directly (as the trainer does for reads and resume)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ckpt_uploader.stores import ContentMismatch, StoreError, open_store
from ckpt_uploader.uri import StorageURIError, parse_storage_uri
from tests.ckpt_uploader.conftest import sha256_of
from tests.conftest import free_port


@pytest.mark.parametrize(
    "text, expected",
    [
        ("local:/data/ckpt", ("local", Path("/data/ckpt"), None, "", None)),
        ("/data/ckpt", ("local", Path("/data/ckpt"), None, "", None)),
        ("runs/ckpt", ("local", Path("runs/ckpt"), None, "", None)),
        (
            "boto3:s3://model_weights.10.1.2.3/internlm",
            ("s3", None, "model_weights", "internlm", "http://10.1.2.3"),
        ),
        ("boto3:s3://ckpts.127.0.0.1:9000/run1/", ("s3", None, "ckpts", "run1", "http://127.0.0.1:9000")),
        ("boto3:s3://ckpts.minio.local:9000/a/b", ("s3", None, "ckpts", "a/b", "http://minio.local:9000")),
        ("boto3:s3://my.bucket/a", ("s3", None, "my.bucket", "a", None)),
        ("s3://bucket", ("s3", None, "bucket", "", None)),
    ],
)
def test_storage_uri_forms(text, expected):
    uri = parse_storage_uri(text)
    assert (uri.scheme, uri.path, uri.bucket, uri.prefix, uri.endpoint_url) == expected


@pytest.mark.parametrize(
    "text", ["", "boto3:gs://x/y", "petrel://x/y", "boto3:s3:///prefix", "s3://b/a/../c", "local:"]
)
def test_bad_storage_uris_name_the_text(text):
    with pytest.raises(StorageURIError) as error:
        parse_storage_uri(text)
    assert repr(text) in str(error.value)


def test_local_store_is_atomic_and_checks_content(tmp_path):
    store = open_store(f"local:{tmp_path / 'dst'}")
    store.check_access()
    source = tmp_path / "model.pt"
    source.write_bytes(b"x" * 1000)
    result = store.put_file(source, "a/model.pt", expected_size=1000, expected_sha256=sha256_of(b"x" * 1000))
    assert result.size_bytes == 1000 and store.size("a/model.pt") == 1000
    with pytest.raises(ContentMismatch, match="manifest says 999"):
        store.put_file(source, "a/short.pt", expected_size=999)
    assert store.size("a/short.pt") is None  # nothing left behind, not even a temp file
    store.put_bytes("10.step", b"{}")
    assert store.list_keys() == ["10.step", "a/model.pt"] and store.get_bytes("10.step") == b"{}"
    store.download_file("a/model.pt", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == b"x" * 1000
    store.delete("10.step")
    assert store.size("10.step") is None
    with pytest.raises(StoreError, match="invalid key"):
        store.put_bytes("../escape", b"")


def test_s3_store_multipart_roundtrip(s3_store_env, tmp_path):
    s3_store_env.make_bucket("stores")
    store = open_store("boto3:s3://stores/run/7", part_size_bytes=5 << 20, concurrency=3)
    store.check_access()
    data = bytes(range(256)) * (12 << 12)  # 12 MiB: 3 parts
    (tmp_path / "big.bin").write_bytes(data)
    result = store.put_file(
        tmp_path / "big.bin", "big.bin", expected_size=len(data), expected_sha256=sha256_of(data)
    )
    assert result.sha256 == sha256_of(data)
    store.put_bytes("7.step", b"done")
    assert store.list_keys() == ["7.step", "big.bin"]
    assert store.size("big.bin") == len(data) and store.size("nope") is None
    store.download_file("big.bin", tmp_path / "back.bin")
    assert sha256_of((tmp_path / "back.bin").read_bytes()) == sha256_of(data)
    with pytest.raises(ContentMismatch, match="sha256"):
        store.put_file(tmp_path / "big.bin", "bad.bin", expected_sha256="0" * 64)
    assert store.size("bad.bin") is None  # the multipart upload was aborted, never completed
    store.delete("7.step")
    assert store.list_keys() == ["big.bin"]
    store.close()


def test_s3_store_with_crc32_part_checksums(s3_store_env, tmp_path):
    s3_store_env.make_bucket("stores-crc")
    store = open_store("boto3:s3://stores-crc/run", part_size_bytes=5 << 20, checksum_algorithm="CRC32")
    data = bytes(range(256)) * (11 << 12)  # 11 MiB: 3 parts
    (tmp_path / "big.bin").write_bytes(data)
    store.put_file(tmp_path / "big.bin", "big.bin", expected_size=len(data), expected_sha256=sha256_of(data))
    assert sha256_of(store.get_bytes("big.bin")) == sha256_of(data)
    store.close()


def test_check_access_fails_fast(s3_store_env):
    started = time.monotonic()
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        open_store("boto3:s3://no-such-bucket/x").check_access()
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
        open_store(f"boto3:s3://bucket.127.0.0.1:{free_port()}/x").check_access()
    assert time.monotonic() - started < 5


def test_check_access_reports_bad_credentials(s3_server_with_auth, monkeypatch):
    monkeypatch.setenv("S3_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")  # InternLM's variables win
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY_ID", "wrong")
    port = s3_server_with_auth.endpoint_url.rsplit(":", 1)[1]
    started = time.monotonic()
    with pytest.raises(StoreError, match="access denied .*check the credentials") as error:
        open_store(f"boto3:s3://ckpts.127.0.0.1:{port}/x").check_access()
    assert "wrong" not in str(error.value) and "AKIAWRONG" not in str(error.value)  # never echoed
    assert time.monotonic() - started < 5


def test_cleanup_after_a_crash_aborts_only_its_own_files_uploads(s3_store_env):
    # On a multi-node save two uploaders write into one folder: a restarted one must not abort the
    # other's multipart upload that is still running.
    bucket = s3_store_env.make_bucket("shared-folder")
    client = s3_store_env.client()
    for name in ("mine.pt", "theirs.pt"):
        client.create_multipart_upload(Bucket=bucket, Key=f"run/5/{name}")
    store = open_store(f"boto3:s3://{bucket}/run/5")
    assert store.abort_incomplete_uploads(["mine.pt"]) == 1
    left = [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == ["run/5/theirs.pt"]
    assert store.abort_incomplete_uploads() == 1  # no keys: everything under the folder


def test_s3_marker_is_read_back_and_a_wrong_stored_size_fails(s3_store_env):
    """put_bytes (the marker) reads the object back: a HEAD with checksums, and a stored size other
    than the bytes sent is an error (botocore's own event hooks watch and alter the real replies).
    The store's boto3 client is shared by every store of this process: the hooks come off again."""
    s3_store_env.make_bucket("markers")
    store = open_store("boto3:s3://markers/run/3")
    heads = []
    events = store.client.meta.events

    def watch(params, **_):
        heads.append(params["url_path"])

    def lose_a_byte(parsed, **_):
        parsed["ContentLength"] -= 1

    events.register("before-call.s3.HeadObject", watch)
    try:
        store.put_bytes("3.step", b'{"step": 3}')
        assert [path for path in heads if path.endswith("/run/3/3.step")], heads
        assert store.get_bytes("3.step") == b'{"step": 3}'
        events.register("after-call.s3.HeadObject", lose_a_byte)
        with pytest.raises(StoreError, match="stored size 10 differs from the 11 bytes sent"):
            store.put_bytes("4.step", b'{"step": 4}')
    finally:
        events.unregister("before-call.s3.HeadObject", watch)
        events.unregister("after-call.s3.HeadObject", lose_a_byte)
