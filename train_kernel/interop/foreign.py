"""`load_ckpt_info=dict(path=..., content=("model",), ckpt_type=...)` for weights written elsewhere:
ckpt_type "internlm" with a folder of InternLM's `model_tp*_pp*.pt` files, "hf_llama" (a Hugging
Face Llama folder) and "llama" (Meta's consolidated.*.pth). A folder of this project's own layout
(manifest.json) stays with train_kernel.checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from train_kernel.checkpoint.locations import Location
from train_kernel.model.config import ModelConfig
from train_kernel.model.hf_interop import (
    model_config_from_llama,
    ours_from_hf_state,
    read_hf_weights,
    read_llama_config,
)

from . import internlm_folder, meta_llama
from .fetch import local_folder

CKPT_TYPES = ("internlm", "hf_llama", "llama")
# Fields a Hugging Face config must agree on with the run's model section.
_COMPARED = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "kv_heads",
    "vocab_size",
    "mlp_hidden_size",
    "rope_base",
    "layer_norm_epsilon",
    "use_dynamic_ntk_rope",
)


def is_foreign(location: Location, ckpt_type: str, manifest_name: str) -> bool:
    """Whether `location` holds weights of another program (read here) rather than a checkpoint of
    this project (whose ckpt_type is "internlm" too, as in InternLM)."""
    if ckpt_type != "internlm":
        return True
    return not location.exists(manifest_name) and internlm_folder.is_internlm_folder(location.files())


def read_foreign_model(
    location: Location, ckpt_type: str, config: ModelConfig, scratch: Path
) -> dict[str, torch.Tensor]:
    """The full model's state dict (our names, config's dtype) from `location`."""
    if ckpt_type == "internlm":
        folder = local_folder(location, lambda n: bool(internlm_folder.SHARD.match(n)), scratch)
        return internlm_folder.read_internlm_folder(folder, config)
    if ckpt_type == "hf_llama":
        folder = local_folder(location, _is_hf_file, scratch)
        return read_hf_llama(folder, config)
    if ckpt_type == "llama":
        folder = local_folder(
            location, lambda n: bool(meta_llama.SHARD.match(n)) or n == "params.json", scratch
        )
        return meta_llama.read_meta_llama(folder, config)
    raise ValueError(f"ckpt_type {ckpt_type!r} is not one of {CKPT_TYPES}")


def _is_hf_file(name: str) -> bool:
    return (
        name == "config.json"
        or name.endswith(".safetensors")
        or (name.startswith("pytorch_model") and name.endswith(".bin"))
    )


def read_hf_llama(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face Llama folder whose config.json must describe the run's model."""
    theirs = model_config_from_llama(read_llama_config(folder), folder)
    for name in _COMPARED:
        if getattr(theirs, name) != getattr(config, name):
            key = "num_kv_attention_heads" if name == "kv_heads" else name
            raise ValueError(
                f"{folder}/config.json: {name} is {getattr(theirs, name)}, but model.{key} gives "
                f"{getattr(config, name)}"
            )
    return ours_from_hf_state(config, read_hf_weights(folder), folder)
