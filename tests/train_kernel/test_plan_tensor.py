"""`train-kernel plan` with tensor and sequence parallelism: communication per step, and the
layouts it proposes for InternLM-20B- and 70B-shaped configs on 80 GiB GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from train_kernel.cli import main
from train_kernel.config.loader import load_config
from train_kernel.plan import make_plan
from train_kernel.plan_layouts import propose_layouts

SEED_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "7B_sft.py"
GIB = 2**30
BF16 = ["model.dtype=torch.bfloat16", "parallel.zero1=1", "data.micro_bsz=1", "data.seq_len=4096"]
SHAPE_20B = [
    *BF16,
    "model.num_layers=60",
    "model.hidden_size=5120",
    "model.num_attention_heads=40",
    "model.vocab_size=103168",
    "data.micro_num=8",
]
SHAPE_70B = [
    *BF16,
    "model.num_layers=80",
    "model.hidden_size=8192",
    "model.num_attention_heads=64",
    "model.num_kv_attention_heads=8",
    "model.mlp_ratio=3.5",
    "model.vocab_size=103168",
    "data.micro_num=16",
]


def _plan(overrides, world):
    return make_plan(load_config(SEED_CONFIG, overrides), world)


def test_tensor_communication_follows_the_formula():
    base = ["parallel.zero1=1", "model.checkpoint=False", "model.dtype=torch.bfloat16"]
    one = _plan([*base, "parallel.tensor=1"], 1).communication
    assert one.tensor == 0 and one.data == 0 and one.zero == 0
    two = _plan([*base, "parallel.tensor=2"], 2)
    config = two.config
    tokens, hidden, layers = config.data.packed_length, config.model.hidden_size, config.model.num_layers
    x = tokens * hidden * 2  # bf16 activations of one micro-batch
    # 4 all-reduces of x per layer (2 forward, 2 backward), the head's gradient all-reduce and its
    # loss statistics, the embedding's all-gather (embed_split_hidden in the seed): ring over 2 ranks.
    per_micro = (4 * layers + 1) * x + 24 * tokens + x / 2
    assert two.communication.tensor == int(config.data.micro_num * per_micro)
    sequence = _plan([*base, "parallel.tensor=2", "parallel.sequence_parallel=True"], 2)
    # The same bytes in other collectives, plus the final norm's all-gather, (embed_split_hidden)
    # the embedding's backward all-gather along the tokens, and the replicated parameters' gradient
    # all-reduce (2 RMSNorms and out_proj's bias per layer, the final norm; bf16).
    replicated = (3 * layers + 1) * hidden * 2
    assert sequence.communication.tensor == int(config.data.micro_num * (per_micro + x + replicated))
    assert sequence.memory.activations < two.memory.activations
    recompute = _plan(
        ["parallel.zero1=1", "model.checkpoint=True", "model.dtype=torch.bfloat16", "parallel.tensor=2"], 2
    )
    assert recompute.communication.tensor - two.communication.tensor == config.data.micro_num * 2 * layers * x
    data = _plan([*base, "parallel.zero1=2"], 2).communication
    assert data.data == int(2 * 0.5 * two.parameters * 2) and data.zero == int(0.5 * two.parameters * 2)


def test_proposals_for_20b_on_32_gpus_of_80_gib():
    proposals = propose_layouts(load_config(SEED_CONFIG, SHAPE_20B), 32, 80 * GIB)
    assert proposals, "a 20B model fits 32 GPUs of 80 GiB"
    rates = [p.tokens_per_s_per_gpu for p in proposals]
    assert rates == sorted(rates, reverse=True)
    assert all(p.plan.memory.total <= 0.9 * 80 * GIB for p in proposals)
    assert all(p.tensor * p.pipeline * p.data == 32 and 40 % p.tensor == 0 for p in proposals)
    # Without any split or ZeRO the 20B model's weights, gradients and Adam state (20 B/parameter) do not fit.
    assert not any(p.tensor == p.pipeline == p.zero1 == 1 for p in proposals)


def test_proposals_for_70b_on_64_gpus_of_80_gib():
    config = load_config(SEED_CONFIG, SHAPE_70B)
    proposals = propose_layouts(config, 64, 80 * GIB)
    assert proposals and all(p.tensor * p.pipeline >= 4 for p in proposals)
    assert all(p.tensor <= 8 for p in proposals)  # within a node, and 8 kv heads
    assert propose_layouts(config, 4, 80 * GIB) == []  # 70B on 4 GPUs: nothing fits


def test_cli_plan_proposes_layouts():
    result = CliRunner().invoke(
        main, ["plan", "--config", str(SEED_CONFIG), "--gpus", "8", "--gpu-memory-gib", "80", "--json"]
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.output[result.output.index("{") :])
    assert body["communication_per_rank_bytes"]["total"] >= 0
    assert (
        body["proposals"]
        and {"tensor", "pipeline", "data", "zero1", "checkpoint"} <= body["proposals"][0].keys()
    )


@pytest.mark.parametrize("gpus", [3])
def test_odd_gpu_counts_still_get_layouts(gpus):
    proposals = propose_layouts(load_config(SEED_CONFIG, ["parallel.zero1=1"]), gpus, 80 * GIB)
    assert proposals and all(p.tensor == 1 for p in proposals)  # 32 heads: no tensor split of 3
