"""An uploader that stops answering mid-run must not cost a checkpoint: the trainer's hand-off
thread uploads the spooled files itself, marker last, and frees the spool."""

from __future__ import annotations

import json
import socket

from ckpt_uploader.client import UploaderClient
from tests.train_kernel.checkpoint.helpers import config_text
from train_kernel.checkpoint.capture import RunState
from train_kernel.checkpoint.locations import open_location
from train_kernel.checkpoint.saver import CheckpointSaver
from train_kernel.config import config_from_text
from train_kernel.data.sampler import BatchSampler
from train_kernel.model import build_model
from train_kernel.optim.hybrid_adamw import AdamSettings
from train_kernel.optim.loss_scaler import DynamicLossScaler
from train_kernel.optim.zero import ZeroOptimizer
from train_kernel.parallel.process_groups import ParallelContext, layout_for
from train_kernel.train.trainer import TrainState


def _dead_address() -> str:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def test_unreachable_uploader_falls_back_to_a_direct_upload(tmp_path):
    config = config_from_text(config_text(tmp_path / "run"))
    model = build_model(config.model, "cpu", seed=0)
    optimizer = ZeroOptimizer(list(model.parameters()), AdamSettings(), DynamicLossScaler(enabled=False), 1.0)
    run = RunState(
        config,
        model,
        optimizer,
        BatchSampler(10, 2, 0),
        TrainState(batch_count=3),
        ParallelContext(layout=layout_for(config.parallel, 1)),
    )
    spool = tmp_path / "spool"
    saver = CheckpointSaver(uploader=UploaderClient(_dead_address(), timeout_s=0.5), spool=spool)
    target = open_location(f"local:{tmp_path}/ckpt").child("3")
    result = saver.save(run, target, 3)
    saver.close(wait=True)
    assert result.mode == "async"
    folder = tmp_path / "ckpt" / "3"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (folder / "3.step").exists()
    for entry in manifest["files"]:
        assert (folder / entry["name"]).stat().st_size == entry["size"]
        assert len(entry["sha256"]) == 64
    assert not [p for p in spool.iterdir() if p.name.startswith("step")]
