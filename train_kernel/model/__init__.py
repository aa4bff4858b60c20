"""The InternLM model: config, construction, parameter counting and weight files.

- build_model(config, device="cpu", seed=0) -> InternLM
- count_parameters(model) -> int
- save_model_checkpoint(model, folder, pipeline_stage=0) -> Path; load_model_state(folder)
- hf_interop.export_hf(ckpt_dir, out_dir) / hf_interop.import_hf(hf_dir, out_ckpt_dir)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ModelConfig
from .internlm import InternLM
from .state_files import load_model_state, save_model_checkpoint

__all__ = [
    "InternLM",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "load_model_state",
    "save_model_checkpoint",
]


def build_model(
    config: ModelConfig,
    device: torch.device | str = "cpu",
    seed: int | None = 0,
    shard: Callable[[InternLM], None] | None = None,
) -> InternLM:
    """Builds the model on the meta device (no memory, no init cost), then materialises it on
    `device` and initialises it; on "meta" it stays uninitialised (for planning/counting).
    `shard` (tensor parallelism, applied from outside) cuts the meta model first."""
    with torch.device("meta"):
        model = InternLM(config)
    if shard is not None:
        shard(model)
    device = torch.device(device)
    if device.type == "meta":
        return model
    model.materialize(device, seed)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
