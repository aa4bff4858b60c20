"""InternLM checkpoint folders: `model_tp{t}_pp{p}.pt`, one torch.save'd state dict per tensor rank t
and pipeline stage p, read with torch.load(weights_only=True).

What InternLM writes (internlm/utils/model_checkpoint.py, save_model_checkpoint):
- keys are stage-local: every stage numbers its layers from 0 (`blocks.{i}` for model_type INTERNLM,
  `layers.{i}` for LLAMA2); with model.num_chunks > 1 each key starts with its chunk index, and chunk
  c of stage p holds the (c * pipeline + p)-th run of layers. A "model." prefix (the AMP wrapper) may
  come first.
- tensor-parallel shards split column-parallel weights (Wqkv, wq/wk/wv, w1, w2, the head) by rows
  and row-parallel ones (out_proj/wo, w3) by columns; a row-parallel bias lives on rank 0 only; norms
  are replicated. The embedding is split along hidden (Embedding1D, `embedding.weight`) or, with
  embed_split_hidden=False, along the vocabulary (`embedding.word_embeddings.weight`). A rank's Wqkv
  rows are its own heads as "(three heads head_dim)".
- rotary inverse-frequency buffers may be saved; they are recomputed here and dropped.
- LLAMA2's wq/wk rows follow its adapt_hf: False (InternLM's default) keeps Meta's interleaved RoPE
  pairs, which InternLM regroups into halves at run time (cat(x[..., ::2], x[..., 1::2])); that
  regrouping is applied to the rows here, once. True: Hugging Face's halves, taken as they are.
  The folder's model_config.pt says which when it names adapt_hf; else the run's model.adapt_hf.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from train_kernel.model.config import ModelConfig
from train_kernel.model.hf_interop import check_shapes, qkv_sizes, torch_load_weights

from .meta_llama import unpermute_rope_rows

SHARD = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")
_FSDP_SHARD = re.compile(r"^model_tp\d+_pp\d+_dp\d+\.pt$")
_CHUNK = re.compile(r"^(\d+)\.(.+)$")
_LAYER = re.compile(r"^(blocks|layers)\.(\d+)\.(.+)$")
_BUFFERS = ("rotary_emb.inv_freq", "rope.freqs")
log = logging.getLogger(__name__)

# How InternLM splits each weight over tensor ranks (key suffix -> rule): ("cat", dim) concatenates
# the shards, "qkv" regroups per-rank [q; k; v] rows, "rank0" takes rank 0's copy (replicated, or
# a row-parallel bias that only rank 0 holds).
_SPLIT_RULES: tuple[tuple[str, object], ...] = (
    ("mixer.Wqkv.weight", "qkv"),
    ("mixer.Wqkv.bias", "qkv"),
    ("embedding.word_embeddings.weight", ("cat", 0)),
    ("tok_embeddings.word_embeddings.weight", ("cat", 0)),
    ("embedding.weight", ("cat", 1)),
    ("tok_embeddings.weight", ("cat", 1)),
    ("head.weight", ("cat", 0)),
    ("output.weight", ("cat", 0)),
    ("mixer.out_proj.weight", ("cat", 1)),
    ("attention.wo.weight", ("cat", 1)),
    ("w3.weight", ("cat", 1)),
    ("out_proj.bias", "rank0"),
    ("wo.bias", "rank0"),
    ("w3.bias", "rank0"),
    ("norm.weight", "rank0"),
    ("norm.bias", "rank0"),
    ("norm1.weight", "rank0"),
    ("norm1.bias", "rank0"),
    ("norm2.weight", "rank0"),
    ("norm2.bias", "rank0"),
    ("attention_norm.weight", "rank0"),
    ("attention_norm.bias", "rank0"),
    ("ffn_norm.weight", "rank0"),
    ("ffn_norm.bias", "rank0"),
    ("wq.weight", ("cat", 0)),
    ("wk.weight", ("cat", 0)),
    ("wv.weight", ("cat", 0)),
    ("wq.bias", ("cat", 0)),
    ("wk.bias", ("cat", 0)),
    ("wv.bias", ("cat", 0)),
    ("w1.weight", ("cat", 0)),
    ("w2.weight", ("cat", 0)),
)

# InternLM names -> ours, per layer (after "blocks.{i}." / "layers.{i}.") and global.
_LAYER_NAMES = {
    "mixer.Wqkv.weight": "attention.Wqkv.weight",
    "mixer.Wqkv.bias": "attention.Wqkv.bias",
    "mixer.out_proj.weight": "attention.out_proj.weight",
    "mixer.out_proj.bias": "attention.out_proj.bias",
    "attention.wo.weight": "attention.out_proj.weight",
    "attention.wo.bias": "attention.out_proj.bias",
    "norm1.weight": "attention_norm.weight",
    "norm1.bias": "attention_norm.bias",
    "norm2.weight": "mlp_norm.weight",
    "norm2.bias": "mlp_norm.bias",
    "attention_norm.weight": "attention_norm.weight",
    "attention_norm.bias": "attention_norm.bias",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_norm.bias": "mlp_norm.bias",
    # The same roles on both sides: w1 gate, w2 up, w3 down.
    "mlp.w1.weight": "mlp.w1.weight",
    "mlp.w2.weight": "mlp.w2.weight",
    "mlp.w3.weight": "mlp.w3.weight",
    "feed_forward.w1.weight": "mlp.w1.weight",
    "feed_forward.w2.weight": "mlp.w2.weight",
    "feed_forward.w3.weight": "mlp.w3.weight",
}
_GLOBAL_NAMES = {
    "embedding.weight": "embedding.weight",
    "embedding.word_embeddings.weight": "embedding.weight",
    "tok_embeddings.weight": "embedding.weight",
    "tok_embeddings.word_embeddings.weight": "embedding.weight",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "head.weight": "head.weight",
    "output.weight": "head.weight",
}


def is_internlm_folder(names: list[str]) -> bool:
    return any(SHARD.match(name) for name in names)


def shard_grid(names: list[str], where: Path | str) -> dict[tuple[int, int], str]:
    """(tp rank, pp rank) -> file name; every file of the tp x pp grid must be there."""
    if any(_FSDP_SHARD.match(name) for name in names):
        raise ValueError(f"{where}: FSDP-sharded InternLM checkpoints (model_tp*_pp*_dp*.pt) are not read")
    grid = {(int(m.group(1)), int(m.group(2))): name for name in names if (m := SHARD.match(name))}
    if not grid:
        raise FileNotFoundError(f"{where} holds no model_tp*_pp*.pt file: not an InternLM checkpoint folder")
    tp, pp = max(t for t, _ in grid) + 1, max(p for _, p in grid) + 1
    for t in range(tp):
        for p in range(pp):
            if (t, p) not in grid:
                raise FileNotFoundError(
                    f"{where}: model_tp{t}_pp{p}.pt is missing (the folder has files up to tensor rank "
                    f"{tp - 1} and pipeline stage {pp - 1})"
                )
    return grid


def read_internlm_folder(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The full model's state dict under our names, in config's dtype, from an InternLM folder."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    grid = shard_grid(names, folder)
    adapt_hf = config.adapt_hf
    if "model_config.pt" in names:
        adapt_hf = _check_saved_config(folder / "model_config.pt", config)
    tp, pp = max(t for t, _ in grid) + 1, max(p for _, p in grid) + 1
    ranks = []
    for t in range(tp):
        stages = [(grid[t, p], torch_load_weights(folder / grid[t, p])) for p in range(pp)]
        ranks.append(_number_layers(stages, folder))
    for t in range(1, tp):
        if ranks[t].keys() - ranks[0].keys():
            extra = sorted(ranks[t].keys() - ranks[0].keys())[:3]
            raise ValueError(f"{folder}: tensor rank {t} holds weights rank 0 lacks, e.g. {extra}")
    merged = _merge_tensor_parallel(ranks, folder)
    state = _to_our_names(merged, config, folder, adapt_hf)
    check_shapes(config, state, folder)
    return state


def _check_saved_config(path: Path, config: ModelConfig) -> bool:
    """InternLM saves its model section as model_config.pt: sizes it names must be the config's.
    Returns the folder's adapt_hf: the file's when it names it, else the config's."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # holds objects weights_only refuses (it is optional): the shapes still get checked
        log.info("%s: not readable with weights_only; checking the weights' shapes only", path)
        return config.adapt_hf
    if not isinstance(saved, dict):
        return config.adapt_hf
    for key, ours in (
        ("num_layers", config.num_layers),
        ("hidden_size", config.hidden_size),
        ("num_attention_heads", config.num_attention_heads),
        ("num_kv_attention_heads", config.kv_heads),
        ("vocab_size", config.vocab_size),
    ):
        if saved.get(key) is not None and saved[key] != ours:
            raise ValueError(f"{path}: {key} is {saved[key]}, but model.{key} gives {ours}")
    if saved.get("no_bias") and config.has_attention_bias:
        log.info("%s: no_bias=True; the model's attention biases start at zero", path)
    if "adapt_hf" in saved and config.adapt_hf and not saved["adapt_hf"]:
        # The run's key would otherwise lose silently (model.adapt_hf=False cannot be told from unset).
        raise ValueError(
            f"{path}: adapt_hf is {saved['adapt_hf']!r} (Meta's interleaved q/k rows), but "
            "model.adapt_hf=True says Hugging Face's halves; remove model.adapt_hf (the folder says how "
            "it was written)"
        )
    return bool(saved.get("adapt_hf", config.adapt_hf))


def _number_layers(stages: list[tuple[str, dict]], folder: Path) -> dict[str, torch.Tensor]:
    """One tensor rank's stage files as one state dict with global layer numbers."""
    runs: dict[tuple[int, int], dict[int, dict[str, torch.Tensor]]] = {}
    state: dict[str, torch.Tensor] = {}
    for stage, (name, weights) in enumerate(stages):
        for key, value in weights.items():
            chunk = 0
            if match := _CHUNK.match(key):
                chunk, key = int(match.group(1)), match.group(2)
            key = key.removeprefix("model.")
            if key.endswith(_BUFFERS):
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{folder / name}: {key} is a {type(value).__name__}, not a tensor")
            if layer := _LAYER.match(key):
                run = runs.setdefault((chunk, stage), {})
                run.setdefault(int(layer.group(2)), {})[f"{layer.group(1)}.{{}}.{layer.group(3)}"] = value
            elif key in state:
                raise ValueError(f"{folder / name}: {key} also appears in another stage file")
            else:
                state[key] = value
    offset = 0
    # Chunk-major, then stage: InternLM's partition of layers over (chunk, stage).
    for chunk, stage in sorted(runs):
        layers = runs[chunk, stage]
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(
                f"{folder / stages[stage][0]}: stage-local layer numbers {sorted(layers)} are not 0..n-1"
            )
        for local in sorted(layers):
            for pattern, value in layers[local].items():
                state[pattern.format(offset + local)] = value
        offset += len(layers)
    return state


def _rule(key: str, folder: Path) -> object:
    for suffix, rule in _SPLIT_RULES:
        if key.endswith(suffix):
            return rule
    raise ValueError(f"{folder}: weight {key} is not one of InternLM's (cannot merge its tensor shards)")


def _merge_tensor_parallel(ranks: list[dict[str, torch.Tensor]], folder: Path) -> dict[str, torch.Tensor]:
    merged = {}
    for key in ranks[0]:
        rule = _rule(key, folder)
        if rule == "rank0" or len(ranks) == 1:
            merged[key] = ranks[0][key]
            continue
        missing = [t for t, rank in enumerate(ranks) if key not in rank]
        if missing:
            raise ValueError(f"{folder}: {key} is missing from tensor rank {missing[0]}'s files")
        shards = [rank[key] for rank in ranks]
        if rule == "qkv":
            # Each rank's rows are [q; k; v] of its own heads: regroup into [q; k; v] of all heads.
            per_rank = [s.reshape(3, -1, *s.shape[1:]) for s in shards]
            merged[key] = torch.cat(per_rank, dim=1).reshape(-1, *shards[0].shape[1:])
        else:
            merged[key] = torch.cat(shards, dim=rule[1])
    return merged


def _to_our_names(
    merged: dict[str, torch.Tensor], config: ModelConfig, folder: Path, adapt_hf: bool
) -> dict[str, torch.Tensor]:
    dtype = config.torch_dtype
    state: dict[str, torch.Tensor] = {}
    separate: dict[int, dict[str, torch.Tensor]] = {}  # LLAMA2's wq / wk / wv per layer
    for key, value in merged.items():
        if layer := _LAYER.match(key):
            i, rest = int(layer.group(2)), layer.group(3)
            if rest.startswith("attention.w") and rest[len("attention.w")] in "qkv":
                separate.setdefault(i, {})[rest] = value
                continue
            ours = _LAYER_NAMES.get(rest)
            if ours is None:
                raise ValueError(f"{folder}: weight {key} has no counterpart in this model")
            state[f"layers.{i}.{ours}"] = value
        elif key in _GLOBAL_NAMES:
            state[_GLOBAL_NAMES[key]] = value
        else:
            raise ValueError(f"{folder}: weight {key} has no counterpart in this model")
    layers = {int(key.split(".")[1]) for key in state if key.startswith("layers.")} | set(separate)
    if len(layers) != config.num_layers:
        raise ValueError(f"{folder}: holds {len(layers)} layers, model.num_layers is {config.num_layers}")
    sizes = qkv_sizes(config)
    for i, parts in separate.items():
        weights = [parts.get(f"attention.w{p}.weight") for p in "qkv"]
        if any(w is None for w in weights):
            raise ValueError(f"{folder}: layer {i} lacks one of attention.wq/wk/wv.weight")
        biases = [parts.get(f"attention.w{p}.bias") for p in "qkv"]
        if not adapt_hf:  # Meta's interleaved pairs -> halves, as InternLM regroups them at run time
            heads = (config.num_attention_heads, config.kv_heads)
            weights[:2] = [unpermute_rope_rows(w, n) for w, n in zip(weights[:2], heads, strict=True)]
            biases[:2] = [
                None if b is None else unpermute_rope_rows(b.view(-1, 1), n).view(-1)
                for b, n in zip(biases[:2], heads, strict=True)
            ]
        state[f"layers.{i}.attention.Wqkv.weight"] = torch.cat(weights)
        if any(b is not None for b in biases):
            state[f"layers.{i}.attention.Wqkv.bias"] = torch.cat(
                [b if b is not None else torch.zeros(n) for b, n in zip(biases, sizes, strict=True)]
            )
    if not config.has_attention_bias:
        biased = sorted(key for key in state if key.endswith((".Wqkv.bias", ".out_proj.bias")))
        if biased:
            raise ValueError(
                f"{folder}: holds attention biases (e.g. {biased[0]}), but model.no_bias=True would drop "
                "them; set model.no_bias=False"
            )
        return {key: value.to(dtype) for key, value in state.items()}
    for i in layers:  # attention biases a checkpoint may not have (no_bias, or rank 0 saved none)
        for key, size in (
            ("attention.out_proj.bias", config.hidden_size),
            ("attention.Wqkv.bias", sum(sizes)),
        ):
            state.setdefault(f"layers.{i}.{key}", torch.zeros(size))
    return {key: value.to(dtype) for key, value in state.items()}
