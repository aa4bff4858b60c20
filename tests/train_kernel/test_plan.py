"""`train-kernel plan` figures: parameter count, ZeRO-1 partition, layout, memory and FLOPs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from train_kernel.config import ConfigError, ParallelConfig, load_config
from train_kernel.flops import flops_per_step, megatron_flops_per_step, tflops
from train_kernel.model.config import ModelConfig
from train_kernel.parallel import (
    LayoutError,
    ParallelLayout,
    PartitionError,
    partition_ranges,
    partition_sizes,
    stage_layer_ranges,
)
from train_kernel.plan import (
    analytic_parameter_count,
    analytic_parameter_counts,
    make_plan,
    memory_fit_warning,
    meta_parameter_count,
)

SEED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "7B_sft.py"
SEED_PARAMETERS = 7_321_948_160
# "Number of elements on ranks" in the seed's log: InternLM's greedy per-parameter partition.
SEED_LOG_PARTITION = [894509056, 944865280, 966909952, 966909952, 966909952, 944865280, 966909952, 670068736]


@pytest.fixture(scope="module")
def seed():
    return load_config(SEED_CONFIG)


def test_seed_parameter_count_matches_the_published_partition(seed):
    assert analytic_parameter_count(seed.model) == SEED_PARAMETERS == sum(SEED_LOG_PARTITION)


def test_plan_of_the_seed_on_8_ranks(seed):
    plan = make_plan(seed, world_size=8)
    assert plan.parameters == SEED_PARAMETERS
    assert (plan.layout.data, plan.layout.zero, plan.layout.pipeline, plan.layout.tensor) == (8, 8, 1, 1)
    sizes = plan.zero_partition_elements
    assert len(sizes) == 8 and sum(sizes) == SEED_PARAMETERS
    assert max(sizes) / (sum(sizes) / len(sizes)) <= 1.01
    # InternLM's own partition was 1.056 (max/mean).
    assert max(SEED_LOG_PARTITION) / (sum(SEED_LOG_PARTITION) / 8) == pytest.approx(1.0564, abs=1e-4)

    memory = plan.memory
    assert memory.weights == memory.gradients == SEED_PARAMETERS * 2  # fp16
    assert memory.optimizer == SEED_PARAMETERS // 8 * 16
    tokens, h, f, v, layers = 2 * 2048, 4096, 11008, 103168, 32
    per_layer = tokens * 2 * (4 * h + 4 * h + 4 * f)
    head = tokens * 2 * 2 * h + tokens * v * (2 + 4)
    assert memory.activations == layers * per_layer + head
    assert memory.total == memory.weights + memory.gradients + memory.optimizer + memory.activations
    assert plan.flops_per_step == flops_per_step(seed, data_parallel_size=8)
    assert plan.tokens_per_step == 131072  # the log's num_consumed_tokens per step


def test_activation_checkpointing_keeps_only_layer_inputs(seed):
    config = dataclasses.replace(seed, model=dataclasses.replace(seed.model, checkpoint=True))
    memory = make_plan(config, world_size=8).memory
    tokens, h, f, v = 4096, 4096, 11008, 103168
    full_layer = tokens * 2 * (8 * h + 4 * f)
    assert memory.activations == 32 * tokens * 2 * h + full_layer + tokens * 2 * 2 * h + tokens * v * 6
    half = dataclasses.replace(seed, model=dataclasses.replace(seed.model, checkpoint=0.5))
    assert memory.activations < make_plan(half, world_size=8).memory.activations


def test_pipeline_stages_split_the_parameters_and_hold_more_micro_batches(seed):
    config = load_config(SEED_CONFIG, ["parallel.pipeline.size=4", "parallel.zero1=-1"])
    plan = make_plan(config, world_size=16)
    assert plan.layout.data == 4 and plan.layout.zero == 4
    assert sum(plan.stage_parameters) == SEED_PARAMETERS
    assert plan.stage_layers == [[(0, 8)], [(8, 16)], [(16, 24)], [(24, 32)]]
    assert sum(plan.zero_partition_elements) == plan.stage_parameters[0]
    assert plan.memory.in_flight_micro_batches in (4.0, 1.0)  # stage 0 holds 4, the last stage 1


def test_tensor_parallel_slices(seed):
    model = seed.model
    whole, half = analytic_parameter_counts(model, 1), analytic_parameter_counts(model, 2)
    h = model.hidden_size
    # Everything is split in two except the norms and the output projection's bias.
    assert half.per_layer * 2 - whole.per_layer == 2 * h + h
    assert half.embedding * 2 == whole.embedding and half.head * 2 == whole.head


def test_default_world_size_and_layout_errors_name_the_key(seed):
    assert make_plan(seed).layout.world_size == 8  # tensor x pipeline x zero1
    with pytest.raises(
        ConfigError, match=r"7B_sft\.py: parallel\.zero1: 8 does not divide the data-parallel size 12"
    ):
        make_plan(seed, world_size=12)
    config = load_config(SEED_CONFIG, ["parallel.tensor=2"])
    with pytest.raises(ConfigError, match=r"world_size: world size 9 is not divisible by tensor 2"):
        make_plan(config, world_size=9)
    # A tensor size that does not divide the heads is the config's error, before any plan.
    with pytest.raises(ConfigError, match=r"model\.num_attention_heads: 32 is not divisible by parallel"):
        load_config(SEED_CONFIG, ["parallel.tensor=3"])


def test_meta_model_and_analytic_count_agree(seed):
    small = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100, mlp_ratio=8 / 3)
    assert meta_parameter_count(small) == analytic_parameter_count(small)
    assert meta_parameter_count(seed.model) == SEED_PARAMETERS
    layernorm = dataclasses.replace(small, norm_type="layernorm", num_layers=3)
    assert meta_parameter_count(layernorm) == analytic_parameter_count(layernorm)


# --- ZeRO-1 partition and layout ---


@pytest.mark.parametrize("total", [0, 1, 7, 8, 1001, SEED_PARAMETERS, SEED_PARAMETERS + 5])
@pytest.mark.parametrize("zero", [1, 3, 8])
def test_partition_is_even_and_contiguous(total, zero):
    sizes = partition_sizes(total, zero)
    assert len(sizes) == zero and sum(sizes) == total
    assert max(sizes) - min(sizes) <= 1
    ranges = partition_ranges(total, zero)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(end == next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:]))


def test_aligned_partition():
    assert partition_sizes(10, 3, align=4) == [4, 4, 2]
    sizes = partition_sizes(SEED_PARAMETERS + 5, 8, align=128)
    assert sum(sizes) == SEED_PARAMETERS + 5 and all(size % 128 == 0 for size in sizes[:-1])
    assert max(sizes) / (sum(sizes) / 8) <= 1.01
    with pytest.raises(PartitionError):
        partition_sizes(10, 0)


@pytest.mark.parametrize(
    ("world", "tensor", "pipeline", "zero1", "data", "zero"),
    [(8, 1, 1, -1, 8, 8), (8, 1, 1, 0, 8, 8), (8, 1, 1, 1, 8, 1), (8, 1, 1, 4, 8, 4), (16, 2, 2, 2, 4, 2)],
)
def test_layout_sizes(world, tensor, pipeline, zero1, data, zero):
    layout = ParallelLayout(world, tensor=tensor, pipeline=pipeline, zero1=zero1)
    assert (layout.data, layout.zero) == (data, zero)
    zero_groups = {tuple(layout.zero_group(rank)) for rank in range(world)}
    assert sorted(rank for group in zero_groups for rank in group) == list(range(world))
    assert all(len(group) == zero for group in zero_groups)
    for rank in range(world):
        coords = layout.coords(rank)
        assert layout.rank_of(data=coords.data, pipeline=coords.pipeline, tensor=coords.tensor) == rank
        assert (
            rank in layout.data_group(rank)
            and rank in layout.pipeline_group(rank)
            and rank in layout.tensor_group(rank)
        )


def test_internlm_rank_order():
    layout = ParallelLayout(16, tensor=2, pipeline=2, zero1=2)
    assert layout.tensor_group(0) == [0, 1]
    assert layout.data_group(0) == [0, 2, 4, 6]
    assert layout.pipeline_group(0) == [0, 8]
    assert layout.zero_group(5) == [5, 7]


@pytest.mark.parametrize(
    ("kwargs", "key", "words"),
    [
        (dict(world_size=6, tensor=4), "world_size", "not divisible by tensor 4 x pipeline 1"),
        (dict(world_size=8, zero1=3), "parallel.zero1", "3 does not divide the data-parallel size 8"),
        (dict(world_size=8, zero1=16), "parallel.zero1", "16 does not divide"),
        (dict(world_size=0), "world_size", "must be an int >= 1"),
    ],
)
def test_layout_errors(kwargs, key, words):
    with pytest.raises(LayoutError) as caught:
        ParallelLayout(**kwargs)
    assert caught.value.key == key and words in str(caught.value)


def test_parallel_sizes_are_the_configs_rule_and_the_layout_only_asserts_them():
    with pytest.raises(ConfigError) as caught:
        ParallelConfig(pipeline=0)
    assert caught.value.key == "pipeline.size" and "must be >= 1, got 0" in str(caught.value)
    with pytest.raises(AssertionError):
        ParallelLayout(world_size=8, pipeline=0)


def test_stage_layer_ranges_as_internlm_partition_uniform():
    assert stage_layer_ranges(32, 1) == [[(0, 32)]]
    assert stage_layer_ranges(32, 3) == [[(0, 10)], [(10, 21)], [(21, 32)]]
    assert stage_layer_ranges(32, 2, num_chunks=2) == [[(0, 8), (16, 24)], [(8, 16), (24, 32)]]
    with pytest.raises(LayoutError):
        stage_layer_ranges(4, 8)


# --- FLOPs ---


def test_megatron_flops_by_hand():
    # B=2, s=4, h=8, L=2, V=10, mlp_ratio=2 -> 3 with SwiGLU:
    # per layer (8 + 4*3) * 2*4*64 = 10240 plus attention 4 * 2 * 16 * 8 = 1024 -> 11264
    # head 6 * 2*4*8*10 = 3840
    common = dict(global_batch_size=2, seq_len=4, hidden_size=8, num_layers=2, vocab_size=10, mlp_ratio=2)
    assert megatron_flops_per_step(**common) == 3 * 11264 * 2 + 3840 == 71424
    assert megatron_flops_per_step(**common, checkpoint=True) == 4 * 11264 * 2 + 3840 == 93952
    assert megatron_flops_per_step(**common, checkpoint=0.25) == 93952  # InternLM: any checkpointing is "on"
    # Without SwiGLU the ratio stays 2: (8 + 8) * 512 = 8192 + 1024 -> 9216.
    assert megatron_flops_per_step(**common, use_swiglu=False) == 3 * 9216 * 2 + 3840
    assert tflops(2e12, step_seconds=0.5, world_size=2) == 2.0


def test_seed_flops_match_the_logged_tflops(seed):
    flops = flops_per_step(seed, data_parallel_size=8)
    # B = 2 * 4 * 8 = 64 sequences; (8 + 4*4) * 64*2048*4096^2 + 4*64*2048^2*4096 per layer, x3 x32, + head
    b, s, h = 64, 2048, 4096
    assert flops == 3 * (24 * b * s * h**2 + 4 * b * s**2 * h) * 32 + 6 * b * s * h * 103168
    # Step 5 of the log: tgs 4179.64 tokens/gpu/s -> 16384 tokens per GPU take 3.92 s; tflops=185.6236...
    assert tflops(flops, step_seconds=16384 / 4179.64, world_size=8) == pytest.approx(
        185.6236609556878, rel=1e-5
    )
    assert tflops(flops, step_seconds=16384 / 1424.93, world_size=8) == pytest.approx(
        63.283263603947816, rel=1e-5
    )


def test_memory_fit_warning_names_the_settings_that_shrink_a_rank(seed):
    gib = 2**30
    one_gpu = make_plan(
        load_config(SEED_CONFIG, ["parallel.zero1=1"]), world_size=1
    )  # the 7B alone: ~140 GiB
    warning = memory_fit_warning(one_gpu, 140 * gib)
    assert warning is not None
    assert "140.00 GiB" in warning and "more data-parallel ranks" in warning and "pipeline.size" in warning
    assert memory_fit_warning(one_gpu, one_gpu.memory.total) is None
    # Eight ranks of data parallel with zero1 = 8 (the seed's layout) fit an 80 GiB GPU.
    assert memory_fit_warning(make_plan(seed, world_size=8), 80 * gib) is None
    no_zero = make_plan(load_config(SEED_CONFIG, ["parallel.zero1=1"]), world_size=8)
    assert "a larger parallel.zero1 (now 1, at most the data-parallel size 8)" in memory_fit_warning(
        no_zero, 80 * gib
    )
