"""The model section of an InternLM config, as a typed record (the `model = dict(...)` block).

Field names and defaults are InternLM's, so a published config maps onto it one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

DTYPES = {
    "torch.float16": torch.float16,
    "torch.half": torch.float16,
    "torch.bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
    "torch.float": torch.float32,
    # tf32 keeps fp32 storage; matmuls may use TensorFloat-32 on Ampere and newer GPUs.
    "torch.tf32": torch.float32,
}
# model.dtype may also be "auto": the fastest dtype the device computes natively, chosen at start
# (train_kernel.device_speed); DTYPE_CHOICES is what a config may write.
AUTO_DTYPE = "auto"
DTYPE_CHOICES = (*DTYPES, AUTO_DTYPE)
# InternLM rounds the SwiGLU hidden size up to a multiple of this.
MLP_MULTIPLE_OF = 256
# InternLM's model_type (a top-level config name): "INTERNLM" (internlm/model/modeling_internlm.py)
# or "LLAMA2" (internlm/model/modeling_llama.py, the same decoder with separate wq/wk/wv and the keys
# no_bias, adapt_hf and the *_init_std below).
MODEL_TYPES = ("INTERNLM", "LLAMA2")
INIT_TYPES = ("normal", "uniform")
# InternLM's LLAMA2 default for every *_init_std key.
LLAMA2_INIT_STD = 0.02
# Keys InternLM's INTERNLM model does not take (its builder raises TypeError on them): only
# model_type "LLAMA2" may set them, each to something other than this default.
LLAMA2_ONLY_DEFAULTS = {
    "no_bias": False,
    "adapt_hf": False,
    "embedding_init_std": None,
    "attn_wqkv_init_std": None,
    "attn_other_init_std": None,
    "ffn_uplayer_init_std": None,
    "ffn_other_init_std": None,
    "out_head_init_std": None,
    "init_type": "normal",
}


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 48
    """Transformer blocks."""
    hidden_size: int = 2048
    """Model width."""
    num_attention_heads: int = 32
    """Attention heads; hidden_size must be a multiple of it."""
    vocab_size: int = 50304
    """Embedding and output-head rows; at least the tokenizer's vocabulary."""
    mlp_ratio: float = 4.0
    """SwiGLU hidden size = round_up(int(hidden_size * mlp_ratio), 256): 8/3 and 4096 give 11008."""
    dtype: str = "torch.float16"
    """Parameter/activation dtype: torch.float16 | torch.half | torch.bfloat16 | torch.float32 | torch.tf32,
    or auto (bf16 where the device computes it natively; else fp16 with the loss scaler on GPUs, fp32
    on CPUs). A run resolves auto once at start; its checkpoints record the dtype it took."""
    checkpoint: bool | float = False
    """Activation checkpointing: True/False, or the fraction of layers (the first ones) recomputed."""
    embed_grad_scale: float = 0.1
    """Scales the gradient reaching the embedding (InternLM's trick against early spikes); 1 = off."""
    embed_split_hidden: bool = False
    """Tensor parallel: split the embedding along the hidden size (False: along the vocabulary);
    no effect with parallel.tensor=1."""
    parallel_output: bool = True
    """Tensor parallel: the loss runs on the vocabulary-parallel logits (False: the head's weight is
    gathered and every rank computes the whole vocabulary); no effect with parallel.tensor=1."""
    apply_post_layer_norm: bool = False
    """Post-norm instead of pre-norm blocks (InternLM option)."""
    norm_type: str = "rmsnorm"
    """rmsnorm (InternLM) or layernorm."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    use_flash_attn: bool = True
    """On CUDA in fp16/bf16, a varlen flash kernel: flash-attn's when importable, else PyTorch's own
    (torch >= 2.10, no dropout); PyTorch SDPA over length buckets otherwise."""
    num_chunks: int = 1
    """Model chunks per pipeline stage; > 1 selects the interleaved pipeline schedule."""
    residual_in_fp32: bool = False
    """Keep the residual stream in fp32."""
    drop_rate: float = 0.0
    """Dropout after attention / MLP."""
    attn_drop_rate: float = 0.0
    """Dropout on attention probabilities."""
    rope_base: float = 10000.0
    """RoPE base (Hugging Face's rope_theta): 10000 for InternLM and Llama 2, 500000 for Llama 3."""
    num_kv_attention_heads: int | None = None
    """Key/value heads (grouped-query attention, InternLM's LLAMA2 key); None = num_attention_heads.
    Must divide num_attention_heads: query head j reads key/value head j // (heads / kv heads)."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is meant for; written into an exported Hugging Face config."""
    use_dynamic_ntk_rope: bool = False
    """InternLM's dynamic NTK RoPE scaling: when a micro-batch's longest position + 1 (s) exceeds
    max_position_embeddings (m), the RoPE base becomes rope_base * (s / m) ** (d / (d - 2)) (d the
    head dim; InternLM's scaling factor is fixed at 1); at s <= m plain RoPE. Exported to Hugging
    Face as rope_scaling {"rope_type": "dynamic", "factor": 1.0}, the same definition."""
    model_type: str = "INTERNLM"
    """The config file's top-level model_type (INTERNLM or LLAMA2), copied here so the checkpoint's
    model_config.json says which model it holds; a config file writes it at the top level, not in
    model = dict(...). Files without it are INTERNLM."""
    no_bias: bool = False
    """LLAMA2 only (InternLM's key): no biases in the q/k/v and output projections (Llama's
    attention_bias=False); False keeps them, InternLM's default."""
    adapt_hf: bool = False
    """LLAMA2 only (InternLM's key): the layout of q/k rows in InternLM LLAMA2 checkpoint folders read
    with ckpt_type="internlm" when the folder's model_config.pt does not say: False (InternLM's
    default) = Meta's interleaved RoPE pairs, which InternLM permutes at run time, so they are
    permuted per head on reading; True = Hugging Face's halves, read as they are. This model always
    computes in Hugging Face's layout (the same function either way)."""
    embedding_init_std: float | None = None
    """LLAMA2 only (InternLM's key): std of the embedding's init; None = 0.02 (InternLM's LLAMA2
    default). INTERNLM draws its fixed stds (embedding and head 0.0052, projections 0.006, w3 0.0015)."""
    attn_wqkv_init_std: float | None = None
    """LLAMA2 only: std of wq/wk/wv (our Wqkv); None = 0.02."""
    attn_other_init_std: float | None = None
    """LLAMA2 only: std of wo (our out_proj), scaled by 1/sqrt(2 (layer + 1)) with use_scaled_init;
    None = 0.02."""
    ffn_uplayer_init_std: float | None = None
    """LLAMA2 only: std of w1 (gate) and w3 (down), as InternLM assigns it by name; None = 0.02."""
    ffn_other_init_std: float | None = None
    """LLAMA2 only: std of w2 (up), scaled by 1/sqrt(2 (layer + 1)) with use_scaled_init; None = 0.02."""
    out_head_init_std: float | None = None
    """LLAMA2 only: std of the output head; None = 0.02."""
    init_type: str = "normal"
    """LLAMA2 only: "normal" or "uniform": InternLM's uniform_, U(-a, a) with a = sqrt(3 * std) as its
    code computes it (so the draw's std is sqrt(std / 3), not std)."""
    use_scaled_init: bool = True
    """InternLM's key: out_proj/wo and w2 drawn with std / sqrt(2 (layer + 1)); False: unscaled, as
    InternLM then draws them (INTERNLM: out_proj 0.0015 and w2 0.006; LLAMA2: their *_init_std)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == AUTO_DTYPE:
            raise ValueError(
                "model.dtype 'auto' has no torch dtype until a device is chosen: resolve it with "
                "train_kernel.device_speed.choose_dtype first"
            )
        return DTYPES[self.dtype]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_attention_bias(self) -> bool:
        """Whether Wqkv and out_proj carry biases (all but LLAMA2 with no_bias)."""
        return not self.no_bias

    @property
    def kv_heads(self) -> int:
        kv = self.num_kv_attention_heads
        return self.num_attention_heads if kv is None else kv

    @property
    def qkv_size(self) -> int:
        """Rows of the fused Wqkv: q (heads) then k and v (kv_heads each), head_dim rows per head."""
        return (self.num_attention_heads + 2 * self.kv_heads) * self.head_dim

    @property
    def mlp_hidden_size(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        return MLP_MULTIPLE_OF * ((hidden + MLP_MULTIPLE_OF - 1) // MLP_MULTIPLE_OF)

    def to_json(self) -> dict:
        return asdict(self)


# Version of the weights' naming in a checkpoint's model_config.json ("weights_format").
# 1 (no key; before this field): mlp.w2 was the down and mlp.w3 the up projection.
# 2: InternLM's meaning: w1 gate, w2 up, w3 down (tools/transformers/convert2hf.py maps them so).
WEIGHTS_FORMAT = 2
WEIGHTS_FORMAT_KEY = "weights_format"
# Keys older model_config.json files wrote under another name.
_RENAMED_KEYS = {"rotary_base": "rope_base"}


def model_config_json(config: ModelConfig) -> dict:
    """What a checkpoint's model_config.json holds: the config and the weights' naming version."""
    return {**config.to_json(), WEIGHTS_FORMAT_KEY: WEIGHTS_FORMAT}


def model_config_from_json(data: dict, source: str) -> tuple[ModelConfig, int]:
    """(config, weights_format) of a model_config.json; older files (no weights_format, rotary_base)
    are read as what they meant. An unknown key or a newer format is an error naming `source`."""
    data = dict(data)
    weights_format = data.pop(WEIGHTS_FORMAT_KEY, 1)
    if weights_format not in (1, WEIGHTS_FORMAT):
        raise ValueError(
            f"{source}: {WEIGHTS_FORMAT_KEY} {weights_format!r} is unknown (this version reads 1 and "
            f"{WEIGHTS_FORMAT}); written by a newer train-kernel?"
        )
    for old, new in _RENAMED_KEYS.items():
        if old in data:
            data[new] = data.pop(old)
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(data.keys() - known)
    if unknown:
        raise ValueError(f"{source}: unknown model keys {unknown}")
    return ModelConfig(**data), weights_format


def upgrade_weight_names(state: dict, weights_format: int) -> dict:
    """A state dict of `weights_format` under today's names: format 1 stored the down projection as
    mlp.w2 and the up projection as mlp.w3, so the two swap."""
    if weights_format == WEIGHTS_FORMAT:
        return state
    swap = {".mlp.w2.": ".mlp.w3.", ".mlp.w3.": ".mlp.w2."}
    upgraded = {}
    for key, value in state.items():
        for old, new in swap.items():
            if old in key:
                key = key.replace(old, new)
                break
        upgraded[key] = value
    return upgraded
