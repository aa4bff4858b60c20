"""Conversion between our checkpoint layout and a Hugging Face Llama checkpoint.

InternLM-7B is a Llama with biased q/k/v/o projections: export writes a LlamaConfig with
attention_bias=True that `transformers.LlamaForCausalLM.from_pretrained` loads (attention_bias=False
for model_type LLAMA2 with no_bias). use_dynamic_ntk_rope is Hugging Face's "dynamic" RoPE scaling with
factor 1 (the same formula, s = the largest position + 1). Both sides use
GPT-NeoX ("rotate_half") RoPE on head-major q/k, so splitting Wqkv needs no permutation; grouped-query
attention maps onto num_key_value_heads. MLP: w1 = gate_proj, w2 = up_proj, w3 = down_proj (InternLM's
tools/transformers/convert2hf.py). Needs only safetensors and torch; transformers is not imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DTYPES, ModelConfig
from .state_files import expected_shapes, load_model_state, write_model_state

HF_WEIGHTS_FILE = "model.safetensors"
# Our per-layer key (after "layers.{i}.") -> HF key (after "model.layers.{i}.").
_LAYER_KEYS = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.out_proj.weight": "self_attn.o_proj.weight",
    "attention.out_proj.bias": "self_attn.o_proj.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w2.weight": "mlp.up_proj.weight",
    "mlp.w3.weight": "mlp.down_proj.weight",
}
_GLOBAL_KEYS = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def qkv_sizes(config: ModelConfig) -> tuple[int, int, int]:
    """Rows of q, k and v in the fused Wqkv."""
    kv = config.kv_heads * config.head_dim
    return config.hidden_size, kv, kv


def export_hf(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, max_position_embeddings: int | None = None
) -> Path:
    """Writes config.json and model.safetensors of a LlamaForCausalLM into `out_dir`, from a local
    model folder (model_config.json + model_tp0_pp*.safetensors). max_position_embeddings defaults
    to the model config's."""
    config, state = load_model_state(ckpt_dir)
    if config.norm_type != "rmsnorm" or config.apply_post_layer_norm:
        raise ValueError(
            f"{ckpt_dir}: only pre-norm RMSNorm models map onto Llama "
            f"(model.norm_type={config.norm_type!r}, "
            f"model.apply_post_layer_norm={config.apply_post_layer_norm})"
        )
    positions = config.max_position_embeddings if max_position_embeddings is None else max_position_embeddings
    if config.use_dynamic_ntk_rope and positions != config.max_position_embeddings:
        # Dynamic NTK scales from max_position_embeddings: another value would be another model.
        raise ValueError(
            f"{ckpt_dir}: model.use_dynamic_ntk_rope scales RoPE beyond model.max_position_embeddings "
            f"{config.max_position_embeddings}; exporting with max_position_embeddings {positions} would "
            "change the model's outputs"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_from_ours(config, state), str(out_dir / HF_WEIGHTS_FILE), metadata={"format": "pt"})
    text = json.dumps(llama_config(config, positions), indent=2)
    (out_dir / "config.json").write_text(text, encoding="utf-8")
    return out_dir


def hf_state_from_ours(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf_state = {hf: state[ours] for ours, hf in _GLOBAL_KEYS.items()}
    sizes = qkv_sizes(config)
    parts = ("weight", "bias") if config.has_attention_bias else ("weight",)
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for our_key, hf_key in _LAYER_KEYS.items():
            if our_key.endswith(".bias") and not config.has_attention_bias:
                continue
            hf_state[hf + hf_key] = state[ours + our_key]
        for part in parts:
            pieces = state[f"{ours}attention.Wqkv.{part}"].split(sizes)
            for proj, piece in zip(_QKV, pieces, strict=True):
                hf_state[f"{hf}self_attn.{proj}.{part}"] = piece.contiguous()
    return hf_state


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
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": config.layer_norm_epsilon,
        # rope_theta (and rope_scaling) for transformers 4.x, rope_parameters for 5.x.
        "rope_theta": config.rope_base,
        **_rope_entries(config),
        "attention_bias": config.has_attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "initializer_range": 0.006,
        "use_cache": True,
    }


def _rope_entries(config: ModelConfig) -> dict:
    """The RoPE keys of a LlamaConfig: plain, or dynamic NTK with factor 1 (InternLM's)."""
    if not config.use_dynamic_ntk_rope:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base}}
    dynamic = {"rope_type": "dynamic", "factor": DYNAMIC_NTK_FACTOR}
    return {
        "rope_scaling": {**dynamic, "type": "dynamic"},
        "rope_parameters": {**dynamic, "rope_theta": config.rope_base},
    }


# InternLM builds DynamicNTKScalingRotaryEmbedding with scaling_factor=1.0, and has no key for it.
DYNAMIC_NTK_FACTOR = 1.0


def import_hf(
    hf_dir: str | os.PathLike, out_ckpt_dir: str | os.PathLike, model_type: str = "INTERNLM"
) -> ModelConfig:
    """Turns a Llama checkpoint (safetensors or pytorch_model*.bin; grouped-query attention kept)
    into our layout (`model_tp0_pp0.safetensors` + `model_config.json`); returns its config.
    model_type "INTERNLM": attention biases kept, zeros where the checkpoint has none (InternLM's
    model always has them); "LLAMA2": no_bias when the checkpoint has no attention biases (no zeros
    invented), biases kept when it has them."""
    hf_dir = Path(hf_dir)
    hf_state = read_hf_weights(hf_dir)
    no_bias = model_type == "LLAMA2" and not any(key.endswith("_proj.bias") for key in hf_state)
    hf_config = read_llama_config(hf_dir)
    config = model_config_from_llama(hf_config, hf_dir, model_type=model_type, no_bias=no_bias)
    state = ours_from_hf_state(config, hf_state, hf_dir)
    write_model_state(config, state, out_ckpt_dir)
    load_model_state(out_ckpt_dir)  # checks keys and shapes against the config
    return config


def read_llama_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a Hugging Face model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def ours_from_hf_state(
    config: ModelConfig, hf_state: dict[str, torch.Tensor], where: Path | str
) -> dict[str, torch.Tensor]:
    """Our full state dict (in config's dtype) from a Llama state dict; a missing weight or a
    shape that does not fit `config` is an error naming `where`."""
    dtype = config.torch_dtype

    def take(key: str) -> torch.Tensor:
        if key not in hf_state:
            raise KeyError(f"{where}: weight {key} is missing")
        return hf_state[key].to(dtype)

    state = {
        "embedding.weight": take("model.embed_tokens.weight"),
        "norm.weight": take("model.norm.weight"),
        # Tied checkpoints store no lm_head; ours is untied, so it starts as a copy.
        "head.weight": take(
            "lm_head.weight" if "lm_head.weight" in hf_state else "model.embed_tokens.weight"
        ).clone(),
    }
    sizes = qkv_sizes(config)
    if not config.has_attention_bias:
        biased = sorted(key for key in hf_state if key.endswith("_proj.bias"))
        if biased:
            raise ValueError(
                f"{where}: holds attention biases (e.g. {biased[0]}), but model.no_bias=True would drop "
                "them; set model.no_bias=False"
            )
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for our_key, hf_key in _LAYER_KEYS.items():
            if hf_key.endswith("bias") and not config.has_attention_bias:
                continue
            if hf_key.endswith("bias") and hf + hf_key not in hf_state:
                state[ours + our_key] = torch.zeros(config.hidden_size, dtype=dtype)
            else:
                state[ours + our_key] = take(hf + hf_key)
        projections = [f"{hf}self_attn.{p}" for p in _QKV]
        state[f"{ours}attention.Wqkv.weight"] = torch.cat([take(p + ".weight") for p in projections])
        if not config.has_attention_bias:
            continue
        biases = [
            take(p + ".bias") if p + ".bias" in hf_state else torch.zeros(size, dtype=dtype)
            for p, size in zip(projections, sizes, strict=True)
        ]
        state[f"{ours}attention.Wqkv.bias"] = torch.cat(biases)
    check_shapes(config, state, where)
    return state


def check_shapes(config: ModelConfig, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """Every weight of the model `config` describes is present with its shape, and nothing else."""
    expected = expected_shapes(config)
    unexpected = sorted(state.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"{where}: weights this model does not have, e.g. {unexpected[:3]}")
    for key, shape in expected.items():
        if key not in state:
            raise KeyError(f"{where}: weight {key} is missing")
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(state[key].shape)}, the model config implies {shape}"
            )


def model_config_from_llama(
    hf: dict, where: Path, model_type: str = "INTERNLM", no_bias: bool = False
) -> ModelConfig:
    def require(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"{where}/config.json: {what}; cannot map onto InternLM")

    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads = hf.get("num_key_value_heads") or heads
    require(heads % kv_heads == 0, f"num_key_value_heads {kv_heads} does not divide {heads} heads")
    require(hf.get("head_dim") in (None, hidden // heads), "head_dim != hidden_size / num_attention_heads")
    require(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} is not silu")
    require(not hf.get("mlp_bias", False), "mlp_bias=True")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    require(
        rope_type == "default" or (rope_type == "dynamic" and rope.get("factor") == DYNAMIC_NTK_FACTOR),
        f"RoPE scaling {rope} (default, or dynamic with factor {DYNAMIC_NTK_FACTOR} as InternLM's "
        "use_dynamic_ntk_rope, map)",
    )
    dtype_name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    require(f"torch.{dtype_name}" in DTYPES, f"dtype {dtype_name!r}")
    config = ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_attention_heads=None if kv_heads == heads else kv_heads,
        vocab_size=hf["vocab_size"],
        mlp_ratio=hf["intermediate_size"] / hidden,
        dtype=f"torch.{dtype_name}",
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        use_dynamic_ntk_rope=rope_type == "dynamic",
        model_type=model_type,
        no_bias=no_bias,
    )
    require(
        config.mlp_hidden_size == hf["intermediate_size"],
        f"intermediate_size {hf['intermediate_size']} is not hidden_size * mlp_ratio rounded up to 256",
    )
    return config


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: *.safetensors, else pytorch_model*.bin read with
    torch.load(weights_only=True) (never unpickling arbitrary objects)."""
    files = sorted(hf_dir.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                        state[key] = handle.get_tensor(key)
            except Exception as error:  # safetensors raises its own SafetensorError (not exported)
                raise ValueError(f"{path}: unreadable safetensors file ({error})") from error
        return state
    files = sorted(hf_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} holds no *.safetensors and no pytorch_model*.bin weights")
    for path in files:
        state.update(torch_load_weights(path))
    return state


def torch_load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd dict of tensors, read with weights_only=True; a damaged file is a ValueError
    naming it."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip / unpickler errors come in many types
        raise ValueError(f"{path}: unreadable weights file ({type(error).__name__}: {error})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, expected a dict of tensors")
    return loaded
