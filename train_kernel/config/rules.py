"""Config rules that objects built without a TrainConfig also need (the model in tests and benchmarks,
the interleaved schedule): each rule is said once, here, and raises ConfigError naming its key.

The model and the schedule call these instead of checking the same thing with their own message.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from train_kernel.config.errors import ConfigError
from train_kernel.config.typecheck import checked_fields
from train_kernel.model.config import (
    DTYPE_CHOICES,
    INIT_TYPES,
    LLAMA2_ONLY_DEFAULTS,
    MODEL_TYPES,
    ModelConfig,
)

NORM_TYPES = ("rmsnorm", "layernorm")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(message, key=key)


def check_stage_partition(
    num_layers: int, pipeline_size: int, num_chunks: int, error: type[ConfigError] = ConfigError
) -> None:
    """Every pipeline stage of every model chunk gets at least one layer (num_chunks divides
    num_layers: check_model)."""
    if num_layers // num_chunks < pipeline_size:
        raise error(
            f"{pipeline_size} stages x {num_chunks} chunks is more than num_layers {num_layers}: "
            "each chunk's layers are fewer than the stages",
            key="parallel.pipeline.size",
        )


def dtype_name(value: Any) -> Any:
    """`dtype=torch.bfloat16` (a torch.dtype, with `import torch` in the file) -> "torch.bfloat16"."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return value
    return str(value) if isinstance(value, torch.dtype) else value


def check_model(model: ModelConfig) -> ModelConfig:
    """The model section checked (types and ranges; ModelConfig is a plain record) and normalised
    (a torch.dtype as its name, an int made float); errors are keyed `model.<field>`."""
    try:
        return _check_model(model)
    except ConfigError as error:
        raise error.within("model") from None


def _check_model(model: ModelConfig) -> ModelConfig:
    if not isinstance(model.dtype, str):
        model = dataclasses.replace(model, dtype=dtype_name(model.dtype))
    changed = checked_fields(model)
    if changed:
        model = dataclasses.replace(model, **changed)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "num_chunks"):
        _require(getattr(model, name) >= 1, name, f"must be >= 1, got {getattr(model, name)}")
    _require(
        model.hidden_size % model.num_attention_heads == 0,
        "num_attention_heads",
        f"{model.num_attention_heads} heads do not divide hidden_size {model.hidden_size}",
    )
    _require(
        model.head_dim % 2 == 0,
        "num_attention_heads",
        f"head dim hidden_size / num_attention_heads = {model.head_dim} must be even (rotary embedding)",
    )
    _require(model.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {model.mlp_ratio}")
    _require(
        model.dtype in DTYPE_CHOICES,
        "dtype",
        f"{model.dtype!r} is not supported; use one of: " + ", ".join(DTYPE_CHOICES),
    )
    if not isinstance(model.checkpoint, bool):
        _require(
            0 <= model.checkpoint <= 1,
            "checkpoint",
            f"must be True/False or a fraction of layers in [0, 1], got {model.checkpoint}",
        )
    _require(model.norm_type in NORM_TYPES, "norm_type", f"{model.norm_type!r} is not one of {NORM_TYPES}")
    _require(
        model.layer_norm_epsilon > 0, "layer_norm_epsilon", f"must be > 0, got {model.layer_norm_epsilon}"
    )
    _require(model.embed_grad_scale > 0, "embed_grad_scale", f"must be > 0, got {model.embed_grad_scale}")
    for name in ("drop_rate", "attn_drop_rate"):
        _require(0 <= getattr(model, name) < 1, name, f"must be in [0, 1), got {getattr(model, name)}")
    _require(model.rope_base > 0, "rope_base", f"must be > 0, got {model.rope_base}")
    kv = model.kv_heads
    _require(
        kv >= 1 and model.num_attention_heads % kv == 0,
        "num_kv_attention_heads",
        f"{kv} key/value heads must be >= 1 and divide num_attention_heads {model.num_attention_heads}",
    )
    _require(
        model.max_position_embeddings >= 1,
        "max_position_embeddings",
        f"must be >= 1, got {model.max_position_embeddings}",
    )
    _check_model_type(model)
    _require(
        model.num_layers % model.num_chunks == 0,
        "num_chunks",
        f"{model.num_chunks} chunks do not divide num_layers {model.num_layers}",
    )
    return model


def _check_model_type(model: ModelConfig) -> None:
    """model_type's keys: LLAMA2's own keys are refused under INTERNLM (whose InternLM builder does
    not take them), rather than accepted and ignored."""
    _require(
        model.model_type in MODEL_TYPES,
        "model_type",
        f"{model.model_type!r} is not one of {MODEL_TYPES} (set at the top level: model_type = ...)",
    )
    if model.model_type != "LLAMA2":
        for name, default in LLAMA2_ONLY_DEFAULTS.items():
            _require(
                getattr(model, name) == default,
                name,
                f"{getattr(model, name)!r}: a key of model_type 'LLAMA2' (InternLM's {model.model_type} "
                "model does not take it); write model_type = 'LLAMA2' at the top level, or remove it",
            )
    _require(model.init_type in INIT_TYPES, "init_type", f"{model.init_type!r} is not one of {INIT_TYPES}")
    for name in LLAMA2_ONLY_DEFAULTS:
        if name.endswith("_init_std") and getattr(model, name) is not None:
            _require(getattr(model, name) > 0, name, f"must be > 0, got {getattr(model, name)}")


def check_interleaved(
    pipeline_size: int, num_chunks: int, micro_num: int, key: str = "data.micro_num"
) -> None:
    """The interleaved schedule (pipeline size > 1, model.num_chunks > 1) runs a step of micro_num
    micro-batches only when micro_num is a multiple of the pipeline size."""
    if pipeline_size > 1 and num_chunks > 1 and micro_num % pipeline_size:
        raise ConfigError(
            f"{micro_num} with model.num_chunks {num_chunks}: the interleaved schedule "
            f"needs a multiple of the pipeline size {pipeline_size}",
            key=key,
        )
