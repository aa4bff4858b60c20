"""A small writer of InternLM checkpoint folders, following what InternLM's save_model_checkpoint
writes (internlm/utils/model_checkpoint.py; its models' parallel layers): one torch.save'd state
dict per (tensor rank t, pipeline stage p) in `model_tp{t}_pp{p}.pt`, layer numbers local to the
stage, column-parallel weights split by rows, row-parallel ones by columns (their bias on rank 0
only), norms replicated, the embedding split along hidden (`embedding.weight`) or the vocabulary
(`embedding.word_embeddings.weight`), each rank's Wqkv rows its own heads as (three heads dim), and
the rotary inverse-frequency buffers saved too. Input: a full state dict under InternLM's names
(v1 `blocks.{i}...` or LLAMA2 `layers.{i}...`)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

_LAYER = re.compile(r"^(blocks|layers)\.(\d+)\.(.+)$")
_COLUMN = ("w1.weight", "w2.weight", "wq.weight", "wk.weight", "wv.weight", "head.weight", "output.weight")
_ROW = ("out_proj.weight", "wo.weight", "w3.weight")
_ROW_BIAS = ("out_proj.bias", "wo.bias")


def _split(key: str, value: torch.Tensor, tp: int, heads: int) -> list[torch.Tensor | None]:
    if tp == 1:
        return [value]
    if key.endswith("Wqkv.weight") or key.endswith("Wqkv.bias"):
        grouped = value.reshape(3, heads, -1, *value.shape[1:])  # (three, heads, head_dim, ...)
        return [c.reshape(-1, *value.shape[1:]).clone() for c in grouped.chunk(tp, dim=1)]
    if key.endswith(_COLUMN) or key == "embedding.word_embeddings.weight":
        return [c.clone() for c in value.chunk(tp, dim=0)]
    if key.endswith(_ROW) or key in ("embedding.weight", "tok_embeddings.weight"):
        return [c.clone() for c in value.chunk(tp, dim=1)]
    if key.endswith(_ROW_BIAS):
        return [value] + [None] * (tp - 1)
    return [value] * tp  # norms


def _stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous, as even as possible, the remainder on the first stages."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for p in range(pp):
        n = base + (1 if p < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def write_internlm_folder(
    folder: Path, state: dict[str, torch.Tensor], num_layers: int, heads: int, tp: int = 1, pp: int = 1
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stages = _stage_layers(num_layers, pp)
    first, last = 0, pp - 1
    files = []
    for p, layers in enumerate(stages):
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        for key, value in state.items():
            match = _LAYER.match(key)
            if match:
                global_index = int(match.group(2))
                if global_index not in layers:
                    continue
                local_key = f"{match.group(1)}.{global_index - layers.start}.{match.group(3)}"
            else:
                is_input = key.startswith(("embedding", "tok_embeddings"))
                if (is_input and p != first) or (not is_input and p != last):
                    continue
                local_key = key
            for t, piece in enumerate(_split(key, value, tp, heads)):
                if piece is not None:
                    shards[t][local_key] = piece
        for t in range(tp):
            for local in range(len(layers)):  # the rotary buffers InternLM's modules register
                prefix = "blocks" if any(k.startswith("blocks.") for k in state) else "layers"
                module = "mixer" if prefix == "blocks" else "attention"
                shards[t][f"{prefix}.{local}.{module}.rotary_emb.inv_freq"] = torch.ones(4)
            path = folder / f"model_tp{t}_pp{p}.pt"
            torch.save(shards[t], path)
            files.append(path)
    torch.save({"num_layers": num_layers, "num_attention_heads": heads}, folder / "model_config.pt")
    return files


# InternLM's tools/transformers/convert2hf.py, v1 names -> Hugging Face Llama names (per layer after
# "blocks.{i}." / "model.layers.{i}."): w1 -> gate_proj, w2 -> up_proj, w3 -> down_proj.
CONVERT2HF_LAYER = {
    "mixer.out_proj.weight": "self_attn.o_proj.weight",
    "mixer.out_proj.bias": "self_attn.o_proj.bias",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.down_proj.weight",
    "mlp.w2.weight": "mlp.up_proj.weight",
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
}
CONVERT2HF_GLOBAL = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}

# InternLM's load_hf_llama_pretrained_weights (model_type LLAMA2): HF names -> InternLM's.
LLAMA2_FROM_HF_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w2.weight",
    "mlp.down_proj.weight": "feed_forward.w3.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
LLAMA2_FROM_HF_GLOBAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def internlm_v1_from_hf(hf_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of convert2hf: v1 names from a Llama state dict with q/k/v biases."""
    state = {ours: hf_state[hf] for ours, hf in CONVERT2HF_GLOBAL.items()}
    for i in range(num_layers):
        hf = f"model.layers.{i}."
        for ours, theirs in CONVERT2HF_LAYER.items():
            state[f"blocks.{i}.{ours}"] = hf_state[hf + theirs]
        for part in ("weight", "bias"):
            state[f"blocks.{i}.mixer.Wqkv.{part}"] = torch.cat(
                [hf_state[f"{hf}self_attn.{p}_proj.{part}"] for p in "qkv"]
            )
    return state


def internlm_llama2_from_hf(hf_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    state = {ours: hf_state[hf] for hf, ours in LLAMA2_FROM_HF_GLOBAL.items()}
    for i in range(num_layers):
        for theirs, ours in LLAMA2_FROM_HF_LAYER.items():
            state[f"layers.{i}.{ours}"] = hf_state[f"model.layers.{i}.{theirs}"]
    return state
