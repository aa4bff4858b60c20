"""Pipeline parallelism (1F1B) on real gloo processes against one process training the same global
batch: losses, grad norms, metrics and the final weights (merged from the per-stage files) agree."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.train_kernel.parallel.launch import train_ranks
from tests.train_kernel.parallel.test_data_parallel_training import records
from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config import config_from_text
from train_kernel.config.sections import ParallelConfig, PipelineConfig
from train_kernel.model import build_model, load_model_state
from train_kernel.parallel.interleaved_schedule import schedule_order
from train_kernel.parallel.layout import LayoutError
from train_kernel.parallel.process_groups import init_parallel
from train_kernel.parallel.stage import build_stage, build_stage_chunks
from train_kernel.train.trainer import train

STEPS = 5


def _config_text(run_dir, micro_num: int, parallel: str, num_chunks: int = 1) -> str:
    text = tiny_config_text(run_dir, micro_num=micro_num, total_steps=STEPS, save=True)
    layers = f"num_layers=4, num_chunks={num_chunks}"
    return text.replace("num_layers=2", layers).replace("parallel = dict(zero1=1)", f"parallel = {parallel}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 4 micro-batches a step: the reference of every pipeline run."""
    run_dir = tmp_path_factory.mktemp("single")
    train(config_from_text(_config_text(run_dir, 4, "dict(zero1=1)")))
    return records(run_dir), load_model_state(run_dir / "ckpt" / str(STEPS))[1]


def _assert_same_run(single, run_dir, micro_num: int) -> None:
    one_records, one_weights = single
    records_ = records(run_dir)
    assert len(records_) == STEPS
    for one, two in zip(one_records, records_):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"]["0_default"] == pytest.approx(one["grad_norm"]["0_default"], rel=1e-4)
        for field in ("num_consumed_tokens", "tokens/en", "acc"):
            assert two[field] == one[field], field
        assert two["loss_from_metric"] == pytest.approx(one["loss_from_metric"], abs=1e-4)
        assert two["micro_num"] == micro_num
    files = sorted(p.name for p in (run_dir / "ckpt" / str(STEPS)).glob("*.safetensors"))
    assert files == [f"model_tp0_pp{p}.safetensors" for p in range(len(files))] and len(files) >= 2
    _, weights = load_model_state(run_dir / "ckpt" / str(STEPS))
    assert weights.keys() == one_weights.keys()
    # atol 1e-5 is 1% of one Adam update (lr 1e-3): Adam divides a gradient by its own running
    # magnitude, so an element whose gradient is near zero moves by a sizeable fraction of lr on
    # fp32 rounding alone (on an AMD EPYC one embedding element of 19,200 differed by 5.3e-6).
    for key, expected in one_weights.items():
        torch.testing.assert_close(weights[key], expected, rtol=1e-5, atol=1e-5, msg=key)


INTERLEAVED = "pipeline=dict(size=2, interleaved_overlap=True)"


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world, micro_num, parallel, num_chunks",
    [
        (2, 4, "dict(zero1=1, pipeline=2)", 1),
        (4, 2, "dict(zero1=2, pipeline=dict(size=2))", 1),
        (4, 4, "dict(zero1=1, pipeline=4)", 1),  # middle stages receive and send both ways
        # 4 layers in 2 x 2 pieces of one layer: stage 0 holds layers 0 and 2, stage 1 layers 1 and 3.
        (2, 4, f"dict(zero1=1, {INTERLEAVED})", 2),
        (4, 2, f"dict(zero1=2, {INTERLEAVED})", 2),  # micro_num == pipeline size: all warm-up
        # The project's own schedules (pipeline.schedule="InternLM"), and PyTorch's zero-bubble one.
        # (InternLM's 1F1B with data 2 is left out: its interleaved form below covers the overlapped
        # reduction over data ranks, and four ranks on the suite's 2 cores cost ~9 s each.)
        (2, 4, "dict(zero1=1, pipeline=dict(size=2, schedule='InternLM'))", 1),
        (
            4,
            2,
            "dict(zero1=2, pipeline=dict(size=2, schedule='InternLM', interleaved_overlap=True))",
            2,
        ),
        (
            2,
            4,
            "dict(zero1=1, pipeline=dict(size=2, schedule='InterleavedZeroBubble', "
            "interleaved_overlap=True))",
            2,
        ),
    ],
    ids=[
        "pipeline2",
        "data2xpipeline2-zero2",
        "pipeline4",
        "interleaved-pipeline2",
        "interleaved-data2xpipeline2-zero2",
        "internlm-1f1b-pipeline2",
        "internlm-interleaved-data2xpipeline2-zero2",
        "engine-zero-bubble-pipeline2",
    ],
)
def test_pipeline_matches_one_process(single, tmp_path, world, micro_num, parallel, num_chunks):
    config_file = tmp_path / "pipeline.py"
    config_file.write_text(_config_text(tmp_path / "run", micro_num, parallel, num_chunks))
    results = train_ranks(config_file, world_size=world, timeout=120)
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    assert "loss=" in results[0].output and all("loss=" not in r.output for r in results[1:])
    _assert_same_run(single, tmp_path / "run", micro_num)


@pytest.mark.distributed
def test_one_micro_batch_per_step_matches_one_process(tmp_path):
    # micro_num 1 < 2 stages: stage 0 runs its forward, then waits for the gradient.
    train(config_from_text(_config_text(tmp_path / "single", 1, "dict(zero1=1)")))
    config_file = tmp_path / "pipeline.py"
    config_file.write_text(_config_text(tmp_path / "run", 1, "dict(zero1=1, pipeline=2)"))
    results = train_ranks(config_file, world_size=2, timeout=120)
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    one = records(tmp_path / "single")
    _assert_same_run(
        (one, load_model_state(tmp_path / "single" / "ckpt" / str(STEPS))[1]), tmp_path / "run", 1
    )


def test_stages_built_alone_hold_the_full_models_tensors(tmp_path):
    config = config_from_text(_config_text(tmp_path, 1, "dict(zero1=1)")).model
    full = build_model(config, seed=3).state_dict()
    first, last = build_stage(config, 0, 2, seed=3), build_stage(config, 1, 2, seed=3)
    assert list(first.layers.keys()) == ["0", "1"] and list(last.layers.keys()) == ["2", "3"]
    assert first.head is None and first.norm is None and last.embedding is None
    chunked = config_from_text(_config_text(tmp_path, 2, f"dict(zero1=1, {INTERLEAVED})", num_chunks=2)).model
    one, two = build_stage_chunks(chunked, 0, 2, seed=3), build_stage_chunks(chunked, 1, 2, seed=3)
    assert [list(c.layers.keys()) for c in one.chunks] == [["0"], ["2"]]
    assert [list(c.layers.keys()) for c in two.chunks] == [["1"], ["3"]]
    for merged in (
        {**first.state_dict(), **last.state_dict()},
        {**one.model_state_dict(), **two.model_state_dict()},
    ):
        assert merged.keys() == full.keys()
        for key, tensor in full.items():
            assert torch.equal(merged[key], tensor), key


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        (ParallelConfig(pipeline=PipelineConfig(size=4)), "2", "not divisible by tensor 1 x pipeline 4"),
        (
            ParallelConfig(zero1=2, pipeline=PipelineConfig(size=2)),
            "2",
            "does not divide the data-parallel size 1",
        ),
    ],
)
def test_pipeline_misconfigurations_fail_before_any_collective(parallel, world, message):
    environ = {"RANK": "0", "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(LayoutError, match=message):
        init_parallel(parallel, environ)
    assert not dist.is_initialized()


@pytest.mark.distributed
def test_interleaved_with_a_micro_num_it_cannot_schedule_fails_on_every_rank_at_once(tmp_path):
    config_file = tmp_path / "pipeline.py"
    config_file.write_text(_config_text(tmp_path / "run", 3, f"dict(zero1=1, {INTERLEAVED})", num_chunks=2))
    results = train_ranks(config_file, world_size=2, timeout=30)
    for result in results:
        assert result.returncode != 0
        assert (
            "data.micro_num: 3 with model.num_chunks 2: the interleaved schedule needs a multiple"
            in result.output
        ), result.output[-2000:]
        assert "Traceback" not in result.output


@pytest.mark.parametrize("stages, chunks, micro_num", [(2, 2, 4), (2, 2, 2), (4, 2, 8), (2, 3, 6)])
def test_interleaved_order_runs_every_chunk_forward_then_backward_once_per_micro_batch(
    stages, chunks, micro_num
):
    for stage in range(stages):
        order = schedule_order(stage, stages, chunks, micro_num)
        for chunk in range(chunks):
            kinds = [kind for kind, c in order if c == chunk]
            assert kinds.count("F") == kinds.count("B") == micro_num
            # The k-th backward of a chunk comes after its k-th forward.
            forwards = [i for i, (kind, c) in enumerate(order) if c == chunk and kind == "F"]
            backwards = [i for i, (kind, c) in enumerate(order) if c == chunk and kind == "B"]
            assert all(f < b for f, b in zip(forwards, backwards))
