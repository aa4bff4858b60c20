"""Conversion between our checkpoint layout and a Hugging Face Llama checkpoint.

InternLM-7B is a Llama with biased q/k/v/o projections: export writes a LlamaConfig with
attention_bias=True that `transformers.LlamaForCausalLM.from_pretrained` loads. Both sides use
GPT-NeoX ("rotate_half") RoPE on head-major q/k, so splitting Wqkv needs no permutation.
Needs only safetensors; transformers is not imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DTYPES, ModelConfig
from .state_files import load_model_state, write_model_state

HF_WEIGHTS_FILE = "model.safetensors"
# Our per-layer key (after "layers.{i}.") -> HF key (after "model.layers.{i}.").
_LAYER_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.out_proj.weight": "self_attn.o_proj.weight",
    "attention.out_proj.bias": "self_attn.o_proj.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_GLOBAL_KEYS = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}


def export_hf(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, max_position_embeddings: int = 2048
) -> Path:
    """Writes config.json and model.safetensors of a LlamaForCausalLM into `out_dir`."""
    config, state = load_model_state(ckpt_dir)
    if config.norm_type != "rmsnorm" or config.apply_post_layer_norm:
        raise ValueError(
            f"{ckpt_dir}: only pre-norm RMSNorm models map onto Llama "
            f"(model.norm_type={config.norm_type!r}, "
            f"model.apply_post_layer_norm={config.apply_post_layer_norm})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_state = {hf: state[ours] for ours, hf in _GLOBAL_KEYS.items()}
    hidden = config.hidden_size
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for our_key, hf_key in _LAYER_KEYS.items():
            hf_state[hf + hf_key] = state[ours + our_key]
        for part in ("weight", "bias"):
            fused = state[f"{ours}attention.Wqkv.{part}"]
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                hf_state[f"{hf}self_attn.{proj}.{part}"] = fused[j * hidden : (j + 1) * hidden].contiguous()
    save_file(hf_state, str(out_dir / HF_WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(
        json.dumps(llama_config(config, max_position_embeddings), indent=2), encoding="utf-8"
    )
    return out_dir


def llama_config(config: ModelConfig, max_position_embeddings: int) -> dict:
    """The LlamaConfig (as JSON) of our model."""
    dtype = str(config.torch_dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.mlp_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": config.layer_norm_epsilon,
        # rope_theta for transformers 4.x, rope_parameters for 5.x.
        "rope_theta": config.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "attention_bias": True,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "initializer_range": 0.006,
        "use_cache": True,
    }


def import_hf(hf_dir: str | os.PathLike, out_ckpt_dir: str | os.PathLike) -> ModelConfig:
    """Turns a Llama checkpoint (safetensors; with or without attention biases, zeros if absent)
    into our layout (`model_tp0_pp0.safetensors` + `model_config.json`); returns its config."""
    hf_dir = Path(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    config = _model_config_from_llama(hf_config, hf_dir)
    hf_state = _read_safetensors(hf_dir)
    dtype = config.torch_dtype

    def take(key: str) -> torch.Tensor:
        if key not in hf_state:
            raise KeyError(f"{hf_dir}: weight {key} is missing")
        return hf_state[key].to(dtype)

    hidden = config.hidden_size
    state = {
        "embedding.weight": take("model.embed_tokens.weight"),
        "norm.weight": take("model.norm.weight"),
        # Tied checkpoints store no lm_head; ours is untied, so it starts as a copy.
        "head.weight": take(
            "lm_head.weight" if "lm_head.weight" in hf_state else "model.embed_tokens.weight"
        ).clone(),
    }
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for our_key, hf_key in _LAYER_KEYS.items():
            if hf_key.endswith("bias") and hf + hf_key not in hf_state:
                state[ours + our_key] = torch.zeros(hidden, dtype=dtype)
            else:
                state[ours + our_key] = take(hf + hf_key)
        projections = [f"{hf}self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        state[f"{ours}attention.Wqkv.weight"] = torch.cat([take(p + ".weight") for p in projections])
        biases = [
            take(p + ".bias") if p + ".bias" in hf_state else torch.zeros(hidden, dtype=dtype)
            for p in projections
        ]
        state[f"{ours}attention.Wqkv.bias"] = torch.cat(biases)
    write_model_state(config, state, out_ckpt_dir)
    load_model_state(out_ckpt_dir)  # checks keys and shapes against the config
    return config


def _model_config_from_llama(hf: dict, where: Path) -> ModelConfig:
    def require(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{where}/config.json: {what}; cannot map onto InternLM")

    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    require(
        hf.get("num_key_value_heads", heads) == heads,
        "grouped-query attention (num_key_value_heads != heads)",
    )
    require(hf.get("head_dim") in (None, hidden // heads), "head_dim != hidden_size / num_attention_heads")
    require(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} is not silu")
    require(not hf.get("mlp_bias", False), "mlp_bias=True")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    require(rope.get("rope_type", rope.get("type", "default")) == "default", f"RoPE scaling {rope}")
    dtype_name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    require(f"torch.{dtype_name}" in DTYPES, f"dtype {dtype_name!r}")
    config = ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        vocab_size=hf["vocab_size"],
        mlp_ratio=hf["intermediate_size"] / hidden,
        dtype=f"torch.{dtype_name}",
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
    )
    require(
        config.mlp_hidden_size == hf["intermediate_size"],
        f"intermediate_size {hf['intermediate_size']} is not hidden_size * mlp_ratio rounded up to 256",
    )
    return config


def _read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} holds no *.safetensors weights (pickle checkpoints are not read)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                state[key] = handle.get_tensor(key)
    return state
