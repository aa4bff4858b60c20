"""Trainer stall per checkpoint: async (through the uploader, via /dev/shm) vs a synchronous save
to the same S3 endpoint (moto's server), for a checkpoint of >= 1 GB.

The run state is a real InternLM model (bf16 weights, ~116 M parameters) with its ZeRO optimizer
(fp32 master + Adam moments): ~1.6 GB per checkpoint. Each round, alternating:
- sync: CheckpointSaver writes into a staging folder and uploads every file itself (boto3
  multipart through ckpt_uploader's store), then the manifest and the marker: the time training
  waits is the whole save;
- async: CheckpointSaver writes into the spool (/dev/shm) and submits the job to a private
  uploader: the time training waits is the save call; the upload then runs on (its end is waited
  for outside the timing, so rounds do not overlap).

Target (checkpoint issue): async stall <= 10% of the synchronous time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_uploader import start_moto
from bench.common import ROOT, save_result
from ckpt_uploader.embedded import start_private_uploader
from ckpt_uploader.stores import open_store
from train_kernel.checkpoint.capture import RunState
from train_kernel.checkpoint.locations import StoreLocation
from train_kernel.checkpoint.saver import CheckpointSaver
from train_kernel.config import config_from_text
from train_kernel.data.sampler import BatchSampler
from train_kernel.model import build_model
from train_kernel.optim.hybrid_adamw import AdamSettings
from train_kernel.optim.loss_scaler import DynamicLossScaler
from train_kernel.optim.zero import ZeroOptimizer
from train_kernel.parallel.process_groups import ParallelContext, layout_for
from train_kernel.train.trainer import TrainState

ROUNDS = int(os.environ.get("BENCH_STALL_ROUNDS", "3"))
BUCKET = "bench-stall"
MODEL = "\nmodel.update(hidden_size=1024, num_layers=4, num_attention_heads=16, vocab_size=32000)\n"


def empty_bucket(client) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])


def run_state() -> RunState:
    config = config_from_text((ROOT / "configs" / "demo.py").read_text() + MODEL)
    model = build_model(config.model, "cpu", seed=0)
    optimizer = ZeroOptimizer(list(model.parameters()), AdamSettings(), DynamicLossScaler(enabled=False), 1.0)
    parallel = ParallelContext(layout=layout_for(config.parallel, 1))
    return RunState(config, model, optimizer, BatchSampler(1000, 2, 0), TrainState(), parallel)


def main() -> dict:
    moto, endpoint = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    spool = Path(tempfile.mkdtemp(prefix="bench-stall-", dir="/dev/shm"))
    staging = Path(tempfile.mkdtemp(prefix="bench-stall-stage-", dir="/dev/shm"))
    uploader = start_private_uploader(spool, allow_dst=[f"boto3:s3://{BUCKET}/stall"])
    client = uploader.client(timeout_s=600)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        root = StoreLocation(open_store(f"boto3:s3://{BUCKET}/stall"), f"boto3:s3://{BUCKET}/stall")
        run = run_state()
        sync_saver = CheckpointSaver(staging_root=staging)
        async_saver = CheckpointSaver(staging_root=staging, uploader=client, spool=spool)
        sync_s, stall_s, upload_s, sizes = [], [], [], []
        for index in range(ROUNDS):
            result = sync_saver.save(run, root.child(f"sync{index}"), index)
            sync_s.append(result.stall_seconds)
            sizes.append(result.bytes_written)
            started = time.perf_counter()
            result = async_saver.save(run, root.child(f"async{index}"), index)
            stall_s.append(result.stall_seconds)
            async_saver.close(wait=True)
            upload_s.append(time.perf_counter() - started)
            empty_bucket(boto3.client("s3"))  # moto keeps objects in memory
            print(
                f"round {index}: sync {sync_s[-1]:.2f} s, async stall {stall_s[-1]:.2f} s "
                f"(upload done after {upload_s[-1]:.2f} s), {sizes[-1] / 1e9:.2f} GB",
                flush=True,
            )
        ratio = statistics.median(stall_s) / statistics.median(sync_s)
        result = {
            "checkpoint_bytes": sizes[0],
            "rounds": ROUNDS,
            "sync_save_s": sync_s,
            "async_stall_s": stall_s,
            "async_until_uploaded_s": upload_s,
            "stall_over_sync_median": round(ratio, 4),
            "target": "<= 0.10",
        }
        save_result("ckpt_stall", result)
        print(
            f"checkpoint {sizes[0] / 1e9:.2f} GB: async stall / sync save = {ratio:.3f} (median of {ROUNDS})"
        )
        return result
    finally:
        client.close()
        uploader.stop(drain=False)
        moto.kill()
        shutil.rmtree(spool, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    main()
