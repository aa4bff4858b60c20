"""`train-kernel checkpoints FOLDER [--verify]`: what a save folder holds, for people, and the one
auto_resume would take; damaged checkpoints make it exit 1."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import run_cli
from tests.train_kernel.checkpoint.helpers import config_text
from train_kernel.checkpoint.manager import CheckpointManager
from train_kernel.config import config_from_text
from train_kernel.parallel.process_groups import ParallelContext, layout_for
from train_kernel.train.trainer import train


@pytest.mark.process
def test_listing_and_verifying_a_save_folder(tmp_path):
    run_dir = tmp_path / "run"
    train(config_from_text(config_text(run_dir)))
    save = run_dir / "ckpt"
    (save / "6" / "6.step").unlink()
    blob = save / "4" / "model_tp0_pp0.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    plain = run_cli("train_kernel.cli", "checkpoints", f"local:{save}")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert any(" 2  checkpoint  complete" in line for line in lines)
    assert any("checkpoint  incomplete" in line and "/6" in line for line in lines)
    assert "auto_resume would start from step 5" in plain.stdout  # the newest snapshot
    verified = run_cli("train_kernel.cli", "checkpoints", f"local:{save}", "--verify", check=False)
    assert verified.returncode == 1
    assert (
        "damaged" in verified.stdout
        and "model_tp0_pp0.safetensors does not match its sha256" in verified.stdout
    )
    shutil.rmtree(save)
    assert "no checkpoints" in run_cli("train_kernel.cli", "checkpoints", f"local:{save}").stdout


def test_snapshots_alternate_with_checkpoint_steps_between_them(tmp_path):
    # freq 50, checkpoints every 100: snapshots at 50, 150, 250, 350 must take slots 1, 0, 1, 0.
    config = config_from_text(config_text(tmp_path, total_steps=400, checkpoint_every=100))
    config_text_with_freq = config.source_text + "\nckpt['oss_snapshot_freq'] = 50\n"
    manager = CheckpointManager(
        config_from_text(config_text_with_freq), ParallelContext(layout=layout_for(config.parallel, 1))
    )
    assert [manager.snapshot_index(step) % 2 for step in (50, 150, 250, 350)] == [1, 0, 1, 0]
    assert [manager.due(step) for step in (50, 100, 150)] == ["snapshot", "checkpoint", "snapshot"]
