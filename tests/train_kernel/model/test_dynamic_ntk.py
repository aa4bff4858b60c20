"""model.use_dynamic_ntk_rope: InternLM's DynamicNTKScalingRotaryEmbedding (scaling factor 1). Up to
max_position_embeddings the model is plain RoPE to the bit; beyond it the base grows with the
micro-batch's longest position, as a reference formula written here says, and as transformers'
"dynamic" RoPE (the same definition) computes it after export-hf."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_kernel.model.helpers import lively, packed_batch, run_single, small_config
from train_kernel.model import InternLM, save_model_checkpoint
from train_kernel.model.hf_interop import export_hf, import_hf
from train_kernel.model.layers import rotary_cos_sin

HEAD_DIM, BASE, MAX_POSITIONS = 16, 10000.0, 16


def reference_inv_freq(longest_position: int) -> torch.Tensor:
    """InternLM's _update: seqlen = the largest index + 1; past max_position_embeddings the base is
    base * ((factor * seqlen / max) - (factor - 1)) ** (dim / (dim - 2)), factor 1."""
    seqlen = longest_position + 1
    base = BASE
    if seqlen > MAX_POSITIONS:
        base = BASE * (seqlen / MAX_POSITIONS) ** (HEAD_DIM / (HEAD_DIM - 2))
    return 1.0 / (base ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))


def test_tables_up_to_max_positions_are_plain_rope_to_the_bit():
    positions = torch.arange(MAX_POSITIONS).view(1, -1)  # the longest: max_position_embeddings itself
    plain = rotary_cos_sin(positions, HEAD_DIM, BASE)
    dynamic = rotary_cos_sin(positions, HEAD_DIM, BASE, MAX_POSITIONS)
    assert all(torch.equal(a, b) for a, b in zip(plain, dynamic, strict=True))


def test_tables_past_max_positions_follow_the_reference_formula():
    # Packed: two documents; the longer one (24 tokens) sets the base for both, as InternLM's
    # indexes.max() + 1 does.
    positions = torch.cat([torch.arange(24), torch.arange(8)]).view(1, -1)
    cos, sin = rotary_cos_sin(positions, HEAD_DIM, BASE, MAX_POSITIONS)
    angles = positions.reshape(-1, 1).float() * reference_inv_freq(23)
    torch.testing.assert_close(cos[:, 0], angles.cos(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], angles.sin(), rtol=1e-6, atol=1e-6)
    plain_cos, _ = rotary_cos_sin(positions, HEAD_DIM, BASE)
    assert not torch.allclose(cos, plain_cos, atol=1e-3)  # the scaling really changes the angles


def config(**overrides):
    return small_config(
        max_position_embeddings=MAX_POSITIONS, rope_base=BASE, layer_norm_epsilon=1e-6, **overrides
    )


def pair():
    """One set of weights in a plain and a dynamic-NTK model."""
    plain = lively(InternLM(config())).eval()
    dynamic = InternLM(config(use_dynamic_ntk_rope=True)).eval()
    dynamic.load_state_dict(plain.state_dict())
    return plain, dynamic


def test_model_is_plain_rope_up_to_max_positions_and_differs_beyond():
    plain, dynamic = pair()
    short = packed_batch([[10, 6], [16]])[:3]  # every document within max_position_embeddings
    long = packed_batch([[24, 8]])[:3]
    with torch.no_grad():
        assert torch.equal(plain(*short), dynamic(*short))
        first_16 = dynamic(*long)[0, :MAX_POSITIONS] - plain(*long)[0, :MAX_POSITIONS]
    assert first_16.abs().max() > 1e-3  # the 24-token row rescales every position of the batch


transformers = pytest.importorskip("transformers")


def test_export_hf_writes_transformers_dynamic_rope_with_the_same_logits(tmp_path):
    _, model = pair()
    save_model_checkpoint(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == "dynamic"
    assert written["rope_parameters"]["factor"] == 1.0
    assert written["max_position_embeddings"] == MAX_POSITIONS
    for length in (12, 27):  # below and beyond max_position_embeddings
        # A fresh HF model per length: its dynamic RoPE keeps the largest length it has seen.
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        tokens = torch.randint(0, 300, (length,), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            theirs = hf(tokens.view(1, -1)).logits[0]
            ours = run_single(model, tokens)
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    assert back.use_dynamic_ntk_rope and back.max_position_embeddings == MAX_POSITIONS


def test_export_refuses_another_max_positions_and_import_refuses_other_factors(tmp_path):
    _, model = pair()
    save_model_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="use_dynamic_ntk_rope scales RoPE beyond"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf", max_position_embeddings=4096)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    written = json.loads(path.read_text())
    written["rope_parameters"]["factor"] = 2.0
    path.write_text(json.dumps(written))
    with pytest.raises(ValueError, match="RoPE scaling"):
        import_hf(tmp_path / "hf", tmp_path / "back")
