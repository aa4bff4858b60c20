"""Checkpoints of a pipeline job (2 stages, 1F1B and interleaved): every stage writes its own model
and optimizer files; resuming on the same layout repeats the uninterrupted run exactly, and a
single process can start from the stages' weights alone, or from the whole checkpoint (the
optimizer state re-cut by parameter name: test_resume_any_layout.py has the other layouts)."""

from __future__ import annotations

import json

import pytest

from tests.train_kernel.checkpoint.helpers import config_text, train_records
from tests.train_kernel.parallel.launch import train_ranks
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train

pytestmark = pytest.mark.distributed

STEPS = 4


def _pipeline_config(path, run_dir, num_chunks, extra=""):
    text = config_text(run_dir, micro_num=2, total_steps=STEPS, checkpoint_every=2, extra=extra)
    pipeline = "dict(size=2, interleaved_overlap=True)" if num_chunks > 1 else "dict(size=2)"
    text = text.replace("parallel = dict(zero1=1)", f"parallel = dict(zero1=1, pipeline={pipeline})")
    text = text.replace("num_layers=2,", "num_layers=4,")  # 2 stages x 2 chunks need 4 layers
    if num_chunks > 1:
        text += f"\nmodel['num_chunks'] = {num_chunks}\n"
    path.write_text(text)
    return path


def _run(config_file):
    results = train_ranks(config_file, world_size=2, timeout=120)
    for result in results:
        assert result.returncode == 0, result.output[-3000:]


@pytest.mark.parametrize("num_chunks", [1, 2], ids=["1f1b", "interleaved"])
def test_pipeline_checkpoint_resumes_exactly(tmp_path, num_chunks):
    whole = tmp_path / "whole"
    _run(_pipeline_config(tmp_path / "whole.py", whole, num_chunks))
    folder = whole / "ckpt" / "2"
    names = {f["name"] for f in json.loads((folder / "manifest.json").read_text())["files"]}
    assert {
        "model_tp0_pp0.safetensors",
        "model_tp0_pp1.safetensors",
        "optimizer_tp0_pp0_zo0.pt",
        "optimizer_tp0_pp1_zo0.pt",
        "rng_tp0_pp1_dp0.pt",
    } <= names
    resumed = tmp_path / "resumed"
    _run(
        _pipeline_config(
            tmp_path / "resumed.py", resumed, num_chunks, f"\nckpt['load_ckpt_folder'] = 'local:{folder}'\n"
        )
    )
    want = {r["step"]: r["loss"] for r in train_records(whole)}
    got = train_records(resumed)
    assert [r["step"] for r in got] == [2, 3]
    for record in got:
        assert record["loss"] == want[record["step"]]

    # One process from the two stages' weights, data position and schedule.
    single = tmp_path / "single"
    info = f"dict(path='local:{folder}', content=('model', 'sampler', 'scheduler'))"
    text = config_text(single, micro_num=2, total_steps=STEPS, extra=f"\nckpt['load_ckpt_info'] = {info}\n")
    train(config_from_text(text.replace("num_layers=2,", "num_layers=4,")))
    first = train_records(single)[0]
    assert first["step"] == 2 and first["loss"] == pytest.approx(want[2], rel=1e-5)
    # ... and from all of it: the optimizer state is re-cut by parameter name for one process.
    full = tmp_path / "full"
    text = config_text(
        full, micro_num=2, total_steps=STEPS, extra=f"\nckpt['load_ckpt_folder'] = 'local:{folder}'\n"
    )
    train(config_from_text(text.replace("num_layers=2,", "num_layers=4,")))
    got = train_records(full)
    assert [r["step"] for r in got] == [2, 3]
    for record in got:
        assert record["loss"] == pytest.approx(want[record["step"]], rel=1e-5)
