"""ckpt_type "hf_llama" and "llama": Hugging Face Llama folders (safetensors or pytorch_model*.bin)
and Meta's consolidated.*.pth (model-parallel shards, interleaved RoPE rows, Meta's w2 = down),
read into this model with grouped-query attention and compared with transformers' logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train_kernel.interop.test_internlm_folder import (
    HEADS,
    LAYERS,
    TOKENS,
    hf_llama,
    model_config,
    our_logits,
)
from train_kernel.checkpoint.locations import open_location
from train_kernel.interop.foreign import read_foreign_model

KV = 2
HEAD_DIM = 64 // HEADS


def _meta_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate_half rows -> Meta's interleaved rows (the inverse of transformers'
    convert_llama_weights_to_hf permute)."""
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_folder(folder, hf_state: dict[str, torch.Tensor], tp: int) -> None:
    """Meta's layout: rows split for wq/wk/wv/w1/w3/output, columns for wo/w2/tok_embeddings."""
    full = {
        "tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "norm.weight": hf_state["model.norm.weight"],
        "output.weight": hf_state["lm_head.weight"],
        "rope.freqs": torch.ones(HEAD_DIM // 2),
    }
    for i in range(LAYERS):
        hf = f"model.layers.{i}."
        full.update(
            {
                f"layers.{i}.attention.wq.weight": _meta_rows(
                    hf_state[hf + "self_attn.q_proj.weight"], HEADS
                ),
                f"layers.{i}.attention.wk.weight": _meta_rows(hf_state[hf + "self_attn.k_proj.weight"], KV),
                f"layers.{i}.attention.wv.weight": hf_state[hf + "self_attn.v_proj.weight"],
                f"layers.{i}.attention.wo.weight": hf_state[hf + "self_attn.o_proj.weight"],
                f"layers.{i}.feed_forward.w1.weight": hf_state[hf + "mlp.gate_proj.weight"],
                f"layers.{i}.feed_forward.w2.weight": hf_state[hf + "mlp.down_proj.weight"],
                f"layers.{i}.feed_forward.w3.weight": hf_state[hf + "mlp.up_proj.weight"],
                f"layers.{i}.attention_norm.weight": hf_state[hf + "input_layernorm.weight"],
                f"layers.{i}.ffn_norm.weight": hf_state[hf + "post_attention_layernorm.weight"],
            }
        )
    folder.mkdir(parents=True)
    rows = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
    columns = ("wo.weight", "w2.weight", "tok_embeddings.weight")
    for rank in range(tp):
        shard = {}
        for key, value in full.items():
            if key.endswith(rows):
                shard[key] = value.chunk(tp, dim=0)[rank].clone()
            elif key.endswith(columns):
                shard[key] = value.chunk(tp, dim=1)[rank].clone()
            else:
                shard[key] = value
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    params = {
        "dim": 64,
        "n_layers": LAYERS,
        "n_heads": HEADS,
        "n_kv_heads": KV,
        "norm_eps": 1e-5,
        "vocab_size": -1,
    }
    (folder / "params.json").write_text(json.dumps(params))


@pytest.fixture(scope="module")
def gqa_llama():
    hf = hf_llama(kv_heads=KV, bias=False, seed=2)
    with torch.no_grad():
        expected = hf(TOKENS.view(1, -1)).logits[0]
    return hf, expected


def test_meta_consolidated_shards(tmp_path, gqa_llama):
    hf, expected = gqa_llama
    write_meta_folder(tmp_path / "meta", hf.state_dict(), tp=2)
    config = model_config(num_kv_attention_heads=KV)
    state = read_foreign_model(open_location(f"local:{tmp_path / 'meta'}"), "llama", config, tmp_path / "s")
    torch.testing.assert_close(our_logits(config, state, TOKENS), expected, atol=1e-4, rtol=0)
    # params.json must describe the configured model.
    with pytest.raises(ValueError, match="n_kv_heads is 2, but model.num_kv_attention_heads is 4"):
        read_foreign_model(open_location(str(tmp_path / "meta")), "llama", model_config(), tmp_path / "s")


@pytest.mark.parametrize("safe", [True, False])
def test_hugging_face_folder_safetensors_or_bin(tmp_path, gqa_llama, safe):
    hf, expected = gqa_llama
    hf.save_pretrained(tmp_path / "hf")
    if not safe:  # the older pickle layout (transformers 5 writes safetensors only)
        weights = tmp_path / "hf" / "model.safetensors"
        torch.save(load_file(weights), tmp_path / "hf" / "pytorch_model.bin")
        weights.unlink()
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert any(n.endswith(".safetensors" if safe else ".bin") for n in names), names
    config = model_config(num_kv_attention_heads=KV)
    state = read_foreign_model(open_location(str(tmp_path / "hf")), "hf_llama", config, tmp_path / "s")
    torch.testing.assert_close(our_logits(config, state, TOKENS), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="kv_heads is 2, but model.num_kv_attention_heads gives 4"):
        read_foreign_model(open_location(str(tmp_path / "hf")), "hf_llama", model_config(), tmp_path / "s")
