"""A checkpoint resumes on any layout (issue 16): saved by 2 gloo ranks as data 2 with ZeRO-1 over
both at step 4, it resumes on pipeline 2, on pipeline 2 with 2 chunks, on tensor 2, on tensor 2 x
pipeline 2 and in one process, and pipeline-2 and tensor 2 x pipeline 2 checkpoints resume on data 2
again; each time the next steps' losses are the uninterrupted run's (fp32, rel 1e-5: another layout
sums in another order). micro_num is scaled with the data-parallel size so that the global batch
stays 4 micro-batches."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from tests.train_kernel.checkpoint.helpers import config_text, train_records
from tests.train_kernel.parallel.launch import train_ranks
from train_kernel.checkpoint.inventory import format_inventory, inventory
from train_kernel.checkpoint.manifest import Manifest
from train_kernel.checkpoint.param_index import StageIndex, derived_index
from train_kernel.config import config_from_text
from train_kernel.model import build_model
from train_kernel.train.trainer import train

pytestmark = pytest.mark.distributed

STEPS = 8
GLOBAL_MICRO_NUM = 4


def _text(run_dir, *, data=1, pipeline=1, num_chunks=1, tensor=1, load=None, checkpoint_every=4):
    text = config_text(
        run_dir,
        micro_num=GLOBAL_MICRO_NUM // data,
        total_steps=STEPS,
        checkpoint_every=checkpoint_every,
        oss_snapshot_freq=0,
    )
    text = text.replace("num_layers=2,", "num_layers=4,")  # 2 stages x 2 chunks need 4 layers
    tensor_size = f", tensor={tensor}" if tensor > 1 else ""
    if pipeline > 1:
        extra = ", interleaved_overlap=True" if num_chunks > 1 else ""
        parallel = f"dict(zero1={data}{tensor_size}, pipeline=dict(size={pipeline}{extra}))"
    else:
        parallel = f"dict(zero1={data}{tensor_size})"
    text = text.replace("parallel = dict(zero1=1)", f"parallel = {parallel}")
    if num_chunks > 1:
        text += f"\nmodel['num_chunks'] = {num_chunks}\n"
    if load is not None:
        text += f"\nckpt['load_ckpt_folder'] = 'local:{load}'\n"
    return text


def _run_ranks(tmp, name, world=2, **layout):
    run_dir = tmp / name
    config = tmp / f"{name}.py"
    config.write_text(_text(run_dir, **layout))
    results = train_ranks(config, world_size=world, timeout=180)
    for result in results:
        assert result.returncode == 0, result.output[-3000:]
    return run_dir, results[0].output


def _assert_continues(run_dir, reference, first_step):
    want = {r["step"]: r["loss"] for r in train_records(reference)}
    got = train_records(run_dir)
    assert [r["step"] for r in got] == list(range(first_step, STEPS))
    for record in got:
        assert record["loss"] == pytest.approx(want[record["step"]], rel=1e-5), record["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: data 2, ZeRO-1 over both ranks, checkpoints at steps 4 and 8."""
    run_dir, _ = _run_ranks(tmp_path_factory.mktemp("data2"), "reference", data=2)
    return run_dir


@pytest.fixture(scope="module")
def on_pipeline(tmp_path_factory, reference):
    """Resumed from step 4 on pipeline 2 (one data rank), saving at step 6."""
    return _run_ranks(
        tmp_path_factory.mktemp("pp2"),
        "pipeline",
        pipeline=2,
        load=reference / "ckpt" / "4",
        checkpoint_every=2,
    )


def test_data2_zero2_resumes_on_pipeline2(reference, on_pipeline):
    run_dir, output = on_pipeline
    _assert_continues(run_dir, reference, 4)
    assert "optimizer state re-cut by parameter name from data=2 zero1=2 pipeline=1" in output


def test_data2_zero2_resumes_on_pipeline2_with_2_chunks(tmp_path, reference):
    run_dir, _ = _run_ranks(tmp_path, "chunks", pipeline=2, num_chunks=2, load=reference / "ckpt" / "4")
    _assert_continues(run_dir, reference, 4)
    # The index a chunked stage records is what a checkpoint without one is read with.
    folder = run_dir / "ckpt" / str(STEPS)
    config = config_from_text(_text(tmp_path / "x"))
    full_order = [(k, tuple(p.shape)) for k, p in build_model(config.model, "meta").named_parameters()]
    for stage in range(2):
        recorded = StageIndex.from_json(
            json.loads((folder / f"optimizer_index_tp0_pp{stage}.json").read_text()), "index"
        )
        with safe_open(str(folder / f"model_tp0_pp{stage}.safetensors"), framework="pt") as weights:
            names = set(weights.keys())
        assert len(recorded.params) > 2
        assert derived_index(full_order, names, recorded.ranges) == recorded


def test_data2_zero2_resumes_in_one_process(tmp_path, reference):
    run_dir = tmp_path / "one"
    train(config_from_text(_text(run_dir, load=reference / "ckpt" / "4")))
    _assert_continues(run_dir, reference, 4)


def test_checkpoint_without_optimizer_index_resumes_on_another_layout(tmp_path, reference, on_pipeline):
    """A pipeline-2 checkpoint as written before the index existed resumes in one process: each
    stage's order follows from its weight file."""
    folder = tmp_path / "old"
    shutil.copytree(on_pipeline[0] / "ckpt" / "6", folder)
    manifest = Manifest.parse((folder / "manifest.json").read_bytes(), "manifest")
    files = tuple(f for f in manifest.files if not f.name.startswith("optimizer_index_"))
    assert len(files) < len(manifest.files)
    old = Manifest(manifest.step, files, manifest.layout, manifest.created)
    (folder / "manifest.json").write_bytes(old.to_bytes())
    for path in folder.glob("optimizer_index_*"):
        path.unlink()
    run_dir = tmp_path / "one"
    train(config_from_text(_text(run_dir, load=folder)))
    _assert_continues(run_dir, reference, 6)


def test_pipeline2_resumes_on_data2_zero2(tmp_path, reference, on_pipeline):
    pipeline_dir, _ = on_pipeline
    run_dir, _ = _run_ranks(tmp_path, "back", data=2, load=pipeline_dir / "ckpt" / "6")
    _assert_continues(run_dir, reference, 6)


def test_data2_zero2_resumes_on_tensor2(tmp_path, reference):
    run_dir, output = _run_ranks(tmp_path, "tensor", tensor=2, load=reference / "ckpt" / "4")
    _assert_continues(run_dir, reference, 4)
    assert "to data=1 zero1=1 pipeline=1 num_chunks=1 tensor=2" in output


def test_tensor2_pipeline2_resumes_from_data2_and_back_on_data2(tmp_path, reference):
    mixed, _ = _run_ranks(
        tmp_path, "tp_pp", world=4, tensor=2, pipeline=2, load=reference / "ckpt" / "4", checkpoint_every=2
    )
    _assert_continues(mixed, reference, 4)
    listing = format_inventory(inventory(f"local:{mixed}/ckpt"))
    assert "data=1 zero1=1 pipeline=2 num_chunks=1 tensor=2" in listing
    run_dir, _ = _run_ranks(tmp_path, "back", data=2, load=mixed / "ckpt" / "6")
    _assert_continues(run_dir, reference, 6)


def test_listing_shows_each_checkpoints_layout(reference, on_pipeline):
    listing = format_inventory(inventory(f"local:{reference}/ckpt"))
    assert "data=2 zero1=2 pipeline=1 num_chunks=1 tensor=1" in listing
    listing = format_inventory(inventory(f"local:{on_pipeline[0]}/ckpt"))
    assert "data=1 zero1=1 pipeline=2 num_chunks=1 tensor=1" in listing
