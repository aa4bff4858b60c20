"""The InternLM model: packing equivalence, activation checkpointing, embed_grad_scale,
initialisation, pipeline splitting, parameter count and stable state-dict names."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tests.train_kernel.model.helpers import lively, packed_batch, run_single, small_config, small_model
from train_kernel.model import InternLM, ModelConfig, build_model, count_parameters, internlm

SEED_7B = ModelConfig(  # the model block of the 7B demo seed config
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    mlp_ratio=8 / 3,
    vocab_size=103168,
    dtype="torch.float16",
    embed_grad_scale=1,
)
ROWS = [[5, 11, 16], [32]]  # two rows of 32 tokens: three documents, then one


def weighted_loss(logits: torch.Tensor, seed: int = 1) -> torch.Tensor:
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return (logits.float() * weights).sum()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_packed_row_equals_documents_run_alone():
    model = lively(small_model(num_layers=3))
    input_ids, position_ids, cu_seqlens, docs = packed_batch(ROWS)
    logits = model(input_ids, position_ids, cu_seqlens, max_seqlen=32)
    assert logits.shape == (2, 32, 300) and logits.dtype == torch.float32
    weighted_loss(logits.view(-1, 300)).backward()
    packed_grads = grads(model)

    model.zero_grad()
    alone = torch.cat([run_single(model, doc) for doc in docs])
    torch.testing.assert_close(logits.view(-1, 300), alone, atol=1e-5, rtol=0)
    weighted_loss(alone).backward()  # same weights: the rows are the same tokens in order
    for name, grad in grads(model).items():
        # Grads are sums over all tokens (|g| up to ~200): compare relative to each tensor's scale.
        scale = grad.abs().max().item()
        torch.testing.assert_close(packed_grads[name], grad, atol=2e-6 * scale, rtol=0, msg=name)


@pytest.mark.parametrize("checkpoint,recomputed", [(True, 4), (0.5, 2)])
def test_activation_checkpointing_changes_nothing_but_recomputes(checkpoint, recomputed):
    plain = lively(small_model(num_layers=4))
    ckpt = InternLM(small_config(num_layers=4, checkpoint=checkpoint))
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.num_checkpointed_layers() == recomputed
    calls = {name: 0 for name in ckpt.layers}
    for name, layer in ckpt.layers.items():  # (module hooks do not fire during recomputation)
        layer.mlp.forward = counting(layer.mlp.forward, calls, name)

    batch = packed_batch(ROWS)[:3]
    loss_plain, loss_ckpt = weighted_loss(plain(*batch)), weighted_loss(ckpt(*batch))
    loss_plain.backward()
    loss_ckpt.backward()
    assert torch.equal(loss_plain, loss_ckpt)
    plain_grads = grads(plain)
    for name, grad in grads(ckpt).items():
        assert torch.equal(grad, plain_grads[name]), name
    # Checkpointed layers ran their forward twice (once more in backward), the others once.
    assert [calls[str(i)] for i in range(4)] == [2] * recomputed + [1] * (4 - recomputed)


def counting(forward, calls: dict[str, int], name: str):
    def wrapped(*args):
        calls[name] += 1
        return forward(*args)

    return wrapped


def test_embed_grad_scale_scales_only_the_embedding_gradient():
    full = lively(small_model(embed_grad_scale=1.0))
    scaled = InternLM(small_config(embed_grad_scale=0.25))
    scaled.load_state_dict(full.state_dict())
    batch = packed_batch(ROWS)[:3]
    out_full, out_scaled = full(*batch), scaled(*batch)
    torch.testing.assert_close(out_full, out_scaled, atol=1e-6, rtol=0)
    weighted_loss(out_full).backward()
    weighted_loss(out_scaled).backward()
    g_full, g_scaled = grads(full), grads(scaled)
    torch.testing.assert_close(
        g_scaled["embedding.weight"], 0.25 * g_full["embedding.weight"], atol=1e-7, rtol=1e-5
    )
    torch.testing.assert_close(g_scaled["head.weight"], g_full["head.weight"], atol=1e-7, rtol=1e-5)


def test_seed_7b_parameter_count_on_meta():
    model = build_model(SEED_7B, "meta")
    assert SEED_7B.mlp_hidden_size == 11008
    assert count_parameters(model) == 7_321_948_160
    assert all(p.is_meta and p.dtype == torch.float16 for p in model.parameters())


def test_init_follows_internlm():
    model = small_model(num_layers=4, hidden_size=128, seed=3)
    params = dict(model.named_parameters())
    expected = {
        "embedding.weight": 0.0052,
        "head.weight": 0.0052,
        "layers.0.attention.Wqkv.weight": 0.006,
        "layers.2.mlp.w1.weight": 0.006,
        "layers.0.attention.out_proj.weight": 0.006 / math.sqrt(2),
        # InternLM's roles (w1 gate, w2 up, w3 down) and its init by those names: scaled init on
        # w2, the smaller std on w3.
        "layers.3.mlp.w2.weight": 0.006 / math.sqrt(8),
        "layers.1.mlp.w3.weight": 0.0015,
    }
    for name, std in expected.items():
        tensor = params[name].double()
        # n >= 16k samples: the sample std is within ~1% of the true one; 5% leaves margin.
        assert abs(tensor.std().item() / std - 1) < 0.05, name
        assert abs(tensor.mean().item()) < 4 * std / math.sqrt(tensor.numel()), name
    assert torch.all(params["layers.1.attention.Wqkv.bias"] == 0)
    assert torch.all(params["layers.1.attention.out_proj.bias"] == 0)
    assert torch.all(params["layers.1.attention_norm.weight"] == 1)
    assert torch.all(params["norm.weight"] == 1)


def test_same_seed_same_weights_and_stage_init_matches_full_model():
    first, second, other = small_model(seed=7), small_model(seed=7), small_model(seed=8)
    for (name, a), b, c in zip(
        first.state_dict().items(), second.state_dict().values(), other.state_dict().values()
    ):
        assert torch.equal(a, b), name
        if internlm.init_std(name) is not None:
            assert not torch.equal(a, c), name
    # A pipeline stage built on meta and materialised alone draws the same values.
    with torch.device("meta"):
        stage = InternLM(small_config())
    del stage.layers["0"]
    stage.embedding = None
    stage.to_empty(device="cpu")
    stage.init_weights(seed=7)
    full = first.state_dict()
    for name, tensor in stage.state_dict().items():
        assert torch.equal(tensor, full[name]), name


def test_pipeline_stages_compose_to_the_full_model():
    model = lively(small_model(num_layers=4))
    batch = packed_batch(ROWS)[:3]
    expected = model(*batch)

    first, last = InternLM(model.config), InternLM(model.config)
    first.load_state_dict(model.state_dict())
    last.load_state_dict(model.state_dict())
    for name in ("2", "3"):
        del first.layers[name]
    for name in ("0", "1"):
        del last.layers[name]
    first.norm = first.head = None
    last.embedding = None
    assert next(iter(last.state_dict())) == "layers.2.attention_norm.weight"  # global names kept

    hidden = first(*batch)
    assert hidden.shape == (2, 32, 64)
    torch.testing.assert_close(last(hidden, *batch[1:]), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"dtype": "torch.bfloat16"},
        {"dtype": "torch.bfloat16", "residual_in_fp32": True},
        {"norm_type": "layernorm"},
        {"apply_post_layer_norm": True},
        {"drop_rate": 0.1, "attn_drop_rate": 0.1},
    ],
)
def test_variants_run_forward_and_backward(overrides):
    model = small_model(**overrides)
    dtype = model.config.torch_dtype
    assert all(p.dtype == dtype for p in model.parameters())
    logits = model(*packed_batch(ROWS)[:3])
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    weighted_loss(logits).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if overrides.get("apply_post_layer_norm"):
        assert model.norm is None


def test_bad_head_count_names_the_keys():
    with pytest.raises(ValueError, match="num_attention_heads"):
        InternLM(small_config(num_attention_heads=5), device="meta")


def test_state_dict_keys_are_the_documented_ones():
    keys = list(small_model().state_dict())
    per_layer = [
        "attention_norm.weight",
        "attention.Wqkv.weight",
        "attention.Wqkv.bias",
        "attention.out_proj.weight",
        "attention.out_proj.bias",
        "mlp_norm.weight",
        "mlp.w1.weight",
        "mlp.w2.weight",
        "mlp.w3.weight",
    ]
    expected = ["embedding.weight"] + [f"layers.{i}.{k}" for i in range(2) for k in per_layer]
    assert keys == expected + ["norm.weight", "head.weight"]
    # Every key pattern appears in the module docstring that other code is told to rely on.
    for key in keys:
        assert re.sub(r"layers\.\d+\.", "layers.{i}.", key) in internlm.__doc__, key
