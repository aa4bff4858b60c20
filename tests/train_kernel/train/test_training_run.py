"""Whole training runs of a tiny model in one process: reproducible, learning, recording the
seed's log fields, skipping overflowed steps, saving weights, stopping cleanly on SIGINT."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config import config_from_text
from train_kernel.model import load_model_state
from train_kernel.train.trainer import train

LOG_FIELDS = [
    "tflops",
    "step",
    "loss",
    "tgs",
    "lr",
    "loss_scale",
    "grad_norm",
    "micro_num",
    "num_consumed_tokens",
    "inf_nan_skip_batches",
    "num_samples_in_batch",
    "largest_length",
    "largest_batch",
    "smallest_batch",
    "adam_beta2",
    "fwd_bwd_time",
    "acc",
    "perplexity",
    "acc/en",
    "acc/cn",
    "acc/code",
    "tokens/en",
    "tokens/cn",
    "tokens/code",
    "loss_from_metric",
    "loss/en",
    "loss/cn",
    "loss/code",
]


def records(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_same_seed_same_losses_bit_for_bit(tmp_path):
    for name in ("a", "b"):
        train(config_from_text(tiny_config_text(tmp_path / name)))
    losses = [[r["loss"] for r in records(tmp_path / name)] for name in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_log_record_has_every_field_of_the_seed_line(tmp_path):
    train(config_from_text(tiny_config_text(tmp_path, total_steps=3)))
    (params,) = records(tmp_path, "params")
    assert params["params"]["model.hidden_size"] == 64
    rows = records(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for field in LOG_FIELDS:
        assert field in rows[0], field
    assert [k for k in rows[0] if k in LOG_FIELDS] == LOG_FIELDS, "fields in the seed's order"
    assert rows[-1]["num_consumed_tokens"] == 3 * 2 * 64  # steps x micro_num x packed_length
    assert rows[0]["tokens/en"] == 2 * 2 * (
        32 - 1
    )  # random data: one document per seq_len, last token unlabeled
    assert rows[0]["num_samples_in_batch"] == 4 and rows[0]["largest_length"] == 32
    assert rows[0]["perplexity"] == pytest.approx(math.exp(rows[0]["loss_from_metric"]), rel=1e-3)
    log = (tmp_path / "train.log").read_text()
    assert "tgs (tokens/gpu/second)=" in log and "grad_norm={'0_default': " in log


def test_tiny_model_overfits_one_batch(tmp_path, monkeypatch):
    # skip_batches can't repeat a batch; a single-row dataset can: every step sees the same rows.
    config = config_from_text(tiny_config_text(tmp_path, total_steps=60, lr=1e-2, micro_num=1))
    from train_kernel.train import builder

    original = builder.build_row_sources

    def one_row(cfg, *args):
        rows, valid = original(cfg, *args)
        rows.num_rows = 1
        return rows, valid

    monkeypatch.setattr(builder, "build_row_sources", one_row)
    train(config)
    losses = [r["loss"] for r in records(tmp_path)]
    assert losses[0] > 5.0 and losses[-1] < 0.5, losses[::10]


def test_fp16_run_with_loss_scaler_counts_skipped_steps(tmp_path):
    # An initial scale of 2**24 overflows fp16 gradients: the scaler backs off (hysteresis 1) until
    # the gradients fit, counting every skipped step, then training proceeds.
    train(
        config_from_text(
            tiny_config_text(
                tmp_path, dtype="torch.float16", initial_scale=2.0**24, hysteresis=1, total_steps=16
            )
        )
    )
    rows = records(tmp_path)
    skipped = rows[-1]["inf_nan_skip_batches"]
    assert 1 <= skipped < 16
    assert [r["inf_nan_skip_batches"] for r in rows[:skipped]] == list(range(1, skipped + 1)), (
        "skips come first"
    )
    assert [r["loss_scale"] for r in rows[:skipped]] == [2.0**24 / 2 ** (k + 1) for k in range(skipped)]
    assert rows[-1]["loss_scale"] == 2.0**24 / 2**skipped
    assert math.isfinite(rows[-1]["loss"]) and rows[-1]["grad_norm"]["0_default"] > 0


def test_saved_weights_load_back(tmp_path):
    config = config_from_text(tiny_config_text(tmp_path, total_steps=4, save=True, checkpoint_every=2))
    train(config)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "4", "snapshot"]
    model_config, state = load_model_state(tmp_path / "ckpt" / "4")
    assert model_config.hidden_size == 64 and "head.weight" in state
    assert (tmp_path / "ckpt" / "4" / "config.py").read_text() == config.source_text


@pytest.mark.process
def test_sigint_stops_cleanly_after_the_current_step(tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(tiny_config_text(tmp_path / "run", total_steps=100000))
    process = subprocess.Popen(
        [sys.executable, "-m", "train_kernel.cli", "run", "--config", str(config_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT, output
    assert "received SIGINT: stopping after the current step" in output
    assert "Traceback" not in output
    lines = metrics.read_text().splitlines()
    assert all(json.loads(line) for line in lines), "every record complete"


def test_cuda_run_warns_before_building_a_model_its_device_cannot_hold(tmp_path, monkeypatch, caplog):
    # No GPU here: the device's memory comes from a stand-in for torch.cuda.get_device_properties.
    from types import SimpleNamespace

    from train_kernel.parallel.process_groups import init_parallel
    from train_kernel.train import builder

    config = config_from_text(tiny_config_text(tmp_path))
    parallel = init_parallel(config.parallel, environ={})
    device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=1 << 20))
    with caplog.at_level("WARNING"):
        builder._warn_if_plan_exceeds_device(config, parallel, device)
    assert "expect out-of-memory" in caplog.text and "the device has 0.00 GiB" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=1 << 40))
    builder._warn_if_plan_exceeds_device(config, parallel, device)
    assert "expect out-of-memory" not in caplog.text
