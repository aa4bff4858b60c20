"""Meta's Llama releases: `consolidated.{t:02d}.pth` (one per model-parallel rank) and params.json.

Meta's names: tok_embeddings (split along hidden), layers.{i}.attention.wq/wk/wv (rows), wo
(columns), feed_forward.w1 (gate, rows), w3 (up, rows), w2 (down, columns), attention_norm,
ffn_norm, norm (replicated), output (rows). Meta's w2 and w3 are the other way round from InternLM's
(InternLM's load_llama_pretrained_weights swaps them too). Meta applies RoPE to interleaved pairs,
this model to halves ("rotate_half", as Hugging Face): q and k rows are permuted per head, as
transformers' convert_llama_weights_to_hf does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from train_kernel.model.config import ModelConfig
from train_kernel.model.hf_interop import check_shapes, torch_load_weights

SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
_ROW_SPLIT = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
_COLUMN_SPLIT = ("wo.weight", "w2.weight", "tok_embeddings.weight")
_LAYER_NAMES = {
    "attention_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "attention.wo.weight": "attention.out_proj.weight",
    "feed_forward.w1.weight": "mlp.w1.weight",  # gate
    "feed_forward.w3.weight": "mlp.w2.weight",  # up
    "feed_forward.w2.weight": "mlp.w3.weight",  # down
}


def is_meta_folder(names: list[str]) -> bool:
    return any(SHARD.match(name) for name in names)


def read_meta_llama(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The full model's state dict under our names, in config's dtype."""
    ranks = sorted((int(m.group(1)), p.name) for p in folder.iterdir() if (m := SHARD.match(p.name)))
    if not ranks:
        raise FileNotFoundError(f"{folder} holds no consolidated.*.pth file: not a Meta Llama folder")
    for expected, (rank, name) in enumerate(ranks):
        if rank != expected:
            raise FileNotFoundError(f"{folder}: consolidated.{expected:02d}.pth is missing (found {name})")
    _check_params(folder / "params.json", config)
    shards = [torch_load_weights(folder / name) for _, name in ranks]
    merged = {}
    for key in shards[0]:
        if key == "rope.freqs":
            continue
        parts = [shard[key] for shard in shards if key in shard]
        if len(parts) != len(shards):
            raise ValueError(f"{folder}: {key} is missing from some consolidated.*.pth files")
        if len(parts) > 1 and key.endswith(_ROW_SPLIT):
            merged[key] = torch.cat(parts, dim=0)
        elif len(parts) > 1 and key.endswith(_COLUMN_SPLIT):
            merged[key] = torch.cat(parts, dim=1)
        else:
            merged[key] = parts[0]
    state = _to_our_names(merged, config, folder)
    check_shapes(config, state, folder)
    return state


def _check_params(path: Path, config: ModelConfig) -> None:
    """params.json, when present, must describe the configured model (no silent mismatch)."""
    if not path.is_file():
        return
    params = json.loads(path.read_text(encoding="utf-8"))
    pairs = {
        "dim": ("hidden_size", config.hidden_size),
        "n_layers": ("num_layers", config.num_layers),
        "n_heads": ("num_attention_heads", config.num_attention_heads),
        "n_kv_heads": ("num_kv_attention_heads", config.kv_heads),
        "norm_eps": ("layer_norm_epsilon", config.layer_norm_epsilon),
        "rope_theta": ("rope_base", config.rope_base),
    }
    for key, (ours, value) in pairs.items():
        if key in params and params[key] is not None and float(params[key]) != float(value):
            raise ValueError(f"{path}: {key} is {params[key]}, but model.{ours} is {value}")
    if params.get("use_scaled_rope"):
        raise ValueError(f"{path}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported")


def unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE rows -> rotate_half rows, per head."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_our_names(
    merged: dict[str, torch.Tensor], config: ModelConfig, folder: Path
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    globals_ = {
        "tok_embeddings.weight": "embedding.weight",
        "norm.weight": "norm.weight",
        "output.weight": "head.weight",
    }
    for key, ours in globals_.items():
        if key not in merged:
            raise KeyError(f"{folder}: weight {key} is missing")
        state[ours] = merged[key]
    for i in range(config.num_layers):
        meta = f"layers.{i}."
        for key, ours in _LAYER_NAMES.items():
            if meta + key not in merged:
                raise KeyError(f"{folder}: weight {meta}{key} is missing")
            state[f"layers.{i}.{ours}"] = merged[meta + key]
        q = unpermute_rope_rows(merged[f"{meta}attention.wq.weight"], config.num_attention_heads)
        k = unpermute_rope_rows(merged[f"{meta}attention.wk.weight"], config.kv_heads)
        v = merged[f"{meta}attention.wv.weight"]
        state[f"layers.{i}.attention.Wqkv.weight"] = torch.cat((q, k, v))
        if config.has_attention_bias:  # Meta's Llama has none: zeros (LLAMA2's no_bias: none)
            state[f"layers.{i}.attention.Wqkv.bias"] = torch.zeros(config.qkv_size)
            state[f"layers.{i}.attention.out_proj.bias"] = torch.zeros(config.hidden_size)
    extra = sorted(k for k in merged if k.startswith("layers.") and int(k.split(".")[1]) >= config.num_layers)
    if extra:
        raise ValueError(
            f"{folder}: holds more layers than model.num_layers {config.num_layers}, e.g. {extra[0]}"
        )
    return {key: value.to(config.torch_dtype) for key, value in state.items()}
