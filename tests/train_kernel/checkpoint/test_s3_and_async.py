"""Checkpoints in an object store (moto's real S3 server) and through the uploader: synchronous
saves to S3, async saves via the trainer's private uploader (to S3 and to a local folder), resume
from S3, a spool too small for the next checkpoint, and a store that is not there at start."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.train_kernel.checkpoint.helpers import config_text, losses_by_step, train_records
from train_kernel.checkpoint.manifest import CheckpointError
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket(f"ckpt-{uuid.uuid4().hex[:8]}")
    return s3_server, bucket


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    train(config_from_text(config_text(run_dir)))
    return run_dir


def _keys(server, bucket, prefix):
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"][len(prefix) :] for item in listing.get("Contents", []))


def _s3_config(run_dir, folder, extra=""):
    return config_text(run_dir, save_folder=folder, extra=extra)


def test_sync_save_to_s3_and_auto_resume_from_it(tmp_path, s3_env, reference):
    server, bucket = s3_env
    folder = f"boto3:s3://{bucket}/run1"
    train(
        config_from_text(
            _s3_config(
                tmp_path / "first", folder, "\ndata['total_steps'] = 4\nlr_scheduler['total_steps'] = 6\n"
            )
        )
    )
    keys = _keys(server, bucket, "run1/")
    assert "4/4.step" in keys and "4/manifest.json" in keys and "2/optimizer_tp0_pp0_zo0.pt" in keys
    manifest = json.loads(
        server.client().get_object(Bucket=bucket, Key="run1/4/manifest.json")["Body"].read()
    )
    sizes = {f["name"]: f["size"] for f in manifest["files"]}
    head = server.client().head_object(Bucket=bucket, Key="run1/4/model_tp0_pp0.safetensors")
    assert head["ContentLength"] == sizes["model_tp0_pp0.safetensors"]
    resumed = tmp_path / "resumed"
    train(config_from_text(_s3_config(resumed, folder, "\nckpt['auto_resume'] = True\n")))
    assert [r["step"] for r in train_records(resumed)] == [4, 5]
    want = losses_by_step(reference)
    for step, values in losses_by_step(resumed).items():
        assert values == want[step]


def test_async_save_through_the_private_uploader_to_s3(tmp_path, s3_env, reference):
    server, bucket = s3_env
    folder = f"boto3:s3://{bucket}/async"
    spool = tmp_path / "spool"
    extra = f"\nckpt['async_upload'] = True\nckpt['async_upload_tmp_folder'] = {str(spool)!r}\n"
    run_dir = tmp_path / "run"
    train(config_from_text(_s3_config(run_dir, folder, extra)))
    keys = _keys(server, bucket, "async/")
    for step in (2, 4, 6):
        assert f"{step}/{step}.step" in keys and f"{step}/manifest.json" in keys
    # The uploader freed its spool copies once they were verified in the store.
    assert not [p for p in spool.iterdir() if p.is_dir() and p.name.startswith("step")]
    resumed = tmp_path / "resumed"
    text = _s3_config(resumed, folder, f"\nckpt['load_ckpt_folder'] = '{folder}/4'\n")
    train(config_from_text(text))
    want = losses_by_step(reference)
    assert [r["step"] for r in train_records(resumed)] == [4, 5]
    for step, values in losses_by_step(resumed).items():
        assert values == want[step]


@pytest.mark.server
def test_async_save_to_a_local_folder_and_a_spool_too_small(tmp_path, reference, capsys):
    spool = tmp_path / "spool"
    extra = (
        f"\nckpt['async_upload'] = True\nckpt['async_upload_tmp_folder'] = {str(spool)!r}\n"
        "uploader = dict(spool_quota_gb=1e-9)\n"  # 1 byte: no checkpoint fits
    )
    run_dir = tmp_path / "run"
    train(config_from_text(config_text(run_dir, extra=extra)))
    out = capsys.readouterr().out
    for step in (2, 4, 6):
        assert (run_dir / "ckpt" / str(step) / f"{step}.step").exists()
    assert "saved synchronously instead" in out or "(store (spool full))" in out
    assert losses_by_step(run_dir) == losses_by_step(reference)


def test_missing_bucket_fails_before_the_first_step(tmp_path, s3_env):
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no-such-bucket"):
        train(config_from_text(_s3_config(run_dir, "boto3:s3://no-such-bucket/x")))
    assert not (run_dir / "metrics.jsonl").exists() or train_records(run_dir) == []


@pytest.mark.server
def test_async_save_through_a_standalone_uploader(tmp_path, reference):
    from ckpt_uploader.embedded import start_private_uploader

    spool = tmp_path / "uploader-spool"
    spool.mkdir()
    run_dir = tmp_path / "run"
    # the same `ckpt-uploader serve` a storage node runs, allowed the run's checkpoint folder
    service = start_private_uploader(spool, allow_dst=[f"local:{run_dir / 'ckpt'}"])
    try:
        extra = (
            "\nckpt['async_upload'] = True\n"
            f"uploader = dict(address={service.address!r}, spool={str(spool)!r})\n"
        )
        train(config_from_text(config_text(run_dir, extra=extra)))
        for step in (2, 4, 6):
            assert (run_dir / "ckpt" / str(step) / f"{step}.step").exists()
        jobs = service.client().status()["jobs"]
        assert len(jobs) >= 3 and all(job["state"] == "done" for job in jobs)
        assert service.process.poll() is None  # the trainer leaves a service it did not start running
    finally:
        service.stop(drain=False)
    assert losses_by_step(run_dir) == losses_by_step(reference)
