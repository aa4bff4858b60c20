"""The InternLM (v1, 7B family) decoder as one plain nn.Module.

State-dict keys (stable: checkpoints, ZeRO partitioning and HF interop rely on them; `i` is the
global layer index, kept when a pipeline stage drops the layers it does not own):

    embedding.weight                          [vocab, hidden]
    layers.{i}.attention_norm.weight          [hidden]          (+ .bias with norm_type=layernorm)
    layers.{i}.attention.Wqkv.weight          [qkv, hidden]  rows [q; k; v], head-major; qkv =
                                              (heads + 2 * kv_heads) * head_dim (3*hidden without GQA)
    layers.{i}.attention.Wqkv.bias            [qkv]             (absent with LLAMA2's no_bias)
    layers.{i}.attention.out_proj.weight      [hidden, hidden]
    layers.{i}.attention.out_proj.bias        [hidden]          (absent with LLAMA2's no_bias)
    layers.{i}.mlp_norm.weight                [hidden]          (+ .bias with norm_type=layernorm)
    layers.{i}.mlp.w1.weight                  [mlp_hidden, hidden]  gate
    layers.{i}.mlp.w2.weight                  [mlp_hidden, hidden]  up
    layers.{i}.mlp.w3.weight                  [hidden, mlp_hidden]  down
    norm.weight                               [hidden]          (absent with apply_post_layer_norm)
    head.weight                               [vocab, hidden]   (not tied to the embedding)

model_type "LLAMA2" (InternLM's modeling_llama) is this same module: its separate wq/wk/wv are the
rows of Wqkv, wo is out_proj, feed_forward.w1/w2/w3 are mlp.w1/w2/w3, attention_norm / ffn_norm /
tok_embeddings / output are attention_norm / mlp_norm / embedding / head; it differs only in the
biases (no_bias) and the initialisation (init_std). InternLM v1's names map one to one:
blocks.{i}.mixer -> layers.{i}.attention, blocks.{i}.norm1 -> attention_norm, blocks.{i}.norm2 ->
mlp_norm; the rest are equal (w1/w2/w3 included: checkpoints
whose model_config.json has no weights_format stored down as w2 and up as w3, and are read so, see
config.upgrade_weight_names). There are no buffers.

Pipeline stages split the model by setting `embedding` / `norm` / `head` to None and deleting
entries of `layers`; forward then takes or returns hidden states [B, L, hidden].
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import PackedSegments
from .config import LLAMA2_INIT_STD, ModelConfig
from .layers import Device, TransformerBlock, build_norm, rotary_cos_sin

EMBEDDING_STD = 0.0052
LINEAR_STD = 0.006
# InternLM draws the down projection (w3) with a smaller std.
DOWN_STD = 0.0015


class InternLM(nn.Module):
    def __init__(self, config: ModelConfig, device: Device = None) -> None:
        super().__init__()
        # The config's rules (a ConfigError naming model.<key>), also for a model built without a file.
        # Imported here: train_kernel.config imports this package's ModelConfig.
        from train_kernel.config.rules import check_model

        check_model(config)
        self.config = config
        dtype = config.torch_dtype
        self.embedding: nn.Embedding | None = nn.Embedding(
            config.vocab_size, config.hidden_size, device=device, dtype=dtype
        )
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(config, i, device) for i in range(config.num_layers)}
        )
        # Post-norm blocks already end in a norm, so InternLM has no final one then.
        self.norm: nn.Module | None = None if config.apply_post_layer_norm else build_norm(config, device)
        self.head: nn.Linear | None = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None = None,
        apply_head: bool = True,
    ) -> torch.Tensor:
        """input_ids [B, L] (or hidden states [B, L, hidden] when this stage has no embedding),
        position_ids [B, L] restarting at 0 in every packed segment, cu_seqlens [n+1] segment
        boundaries of the flattened B*L tokens. Returns logits [B, L, vocab] in the model dtype
        (hidden states when this stage has no head, or with apply_head=False: the trainer's fused
        head + cross entropy takes the normed hidden states)."""
        if self.embedding is not None:
            h = self.embedding(input_ids)
            scale = self.config.embed_grad_scale
            if scale != 1:
                # Same forward value; only a fraction `scale` of the gradient reaches the embedding.
                h = scale * h + (1 - scale) * h.detach()
        else:
            h = input_ids
        config = self.config
        ntk_positions = config.max_position_embeddings if config.use_dynamic_ntk_rope else None
        rope = rotary_cos_sin(position_ids, config.head_dim, config.rope_base, ntk_positions)
        segments = PackedSegments(cu_seqlens, max_seqlen)
        recompute = self.num_checkpointed_layers()
        for n, layer in enumerate(self.layers.values()):
            if n < recompute and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, segments, use_reentrant=False)
            else:
                h = layer(h, rope, segments)
        if self.norm is not None:
            h = self.norm(h)
        if self.head is not None and apply_head:
            h = self.head(h.to(self.head.weight.dtype))
        return h

    def num_checkpointed_layers(self) -> int:
        """The first layers this module holds that recompute activations: `checkpoint` is a
        fraction of the layers present (InternLM applies it per pipeline stage)."""
        fraction = self.config.checkpoint
        if isinstance(fraction, bool):
            return len(self.layers) if fraction else 0
        return int(fraction * len(self.layers))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """InternLM's initialisation. With a seed every tensor draws from its own generator seeded
        by (seed, key name), so a pipeline stage gets the same values as the full model and
        results do not depend on module order. seed=None uses the global RNG."""
        for name, param in self.named_parameters():
            if param.is_meta:
                raise RuntimeError(
                    f"init_weights: {name} is on the meta device; call model.to_empty(device=...) first"
                )
            std = init_std(name, self.config)
            if std is None:
                param.fill_(1.0 if _is_norm_weight(name) else 0.0)
                continue
            generator = None
            if seed is not None:
                generator = torch.Generator(device=param.device)
                generator.manual_seed(_tensor_seed(seed, name))
            pieces = getattr(param, "tensor_pieces", None)
            if pieces is None:
                _draw(param, std, self.config.init_type, generator)
                continue
            # A tensor-parallel shard (cut from outside, parallel/tensor_parallel.py): the full
            # tensor drawn as one process draws it, this rank's pieces kept.
            full = torch.empty(param.full_shape, device=param.device, dtype=param.dtype)
            _draw(full, std, self.config.init_type, generator)
            boxes = [tuple(slice(lo, hi) for lo, hi in piece.box) for piece in pieces]
            param.copy_(torch.cat([full[box].reshape(-1) for box in boxes]).view(param.shape))

    def materialize(self, device: Device, seed: int | None) -> None:
        """Allocates the (meta-device) parameters on `device` and initialises them. to_empty makes
        new Parameter objects: attributes set on the old ones from outside (a tensor shard's pieces)
        are carried over."""
        kept = {name: dict(vars(p)) for name, p in self.named_parameters() if vars(p)}
        self.to_empty(device=torch.device(device))
        for name, param in self.named_parameters():
            for key, value in kept.get(name, {}).items():
                setattr(param, key, value)
        self.init_weights(seed)


def init_std(name: str, config: ModelConfig | None = None) -> float | None:
    """Std of the init of a parameter by its key, as InternLM's reset_parameters (use_swiglu) draws
    it for config's model_type (None: an INTERNLM model's defaults); None for biases (zero) and
    norms (one)."""
    if name.endswith(".bias") or "norm" in name:
        return None
    llama2 = config is not None and config.model_type == "LLAMA2"
    stds = _llama2_stds(config) if llama2 else _INTERNLM_STDS
    if name == "embedding.weight":
        return stds["embedding"]
    if name == "head.weight":
        return stds["head"]
    if name.endswith(("out_proj.weight", "mlp.w2.weight")):
        # InternLM's scaled init (sigma / sqrt(2 * (layer + 1))); it applies it to w2, the up
        # projection, by name.
        key = "out_proj" if name.endswith("out_proj.weight") else "w2"
        if config is not None and not config.use_scaled_init:
            return stds[f"{key}_unscaled"]
        layer_idx = int(name.split(".")[1])
        return stds[key] / math.sqrt(2.0 * (layer_idx + 1))
    if name.endswith("mlp.w3.weight"):
        return stds["w3"]
    if name.endswith("mlp.w1.weight"):
        return stds["w1"]
    return stds["Wqkv"]


# INTERNLM's (modeling_internlm's reset_parameters) fixed stds, by our names; *_unscaled: with
# use_scaled_init=False, where its out_proj takes 0.0015, not the 0.006 it scales.
_INTERNLM_STDS = {
    "embedding": EMBEDDING_STD,
    "head": EMBEDDING_STD,
    "Wqkv": LINEAR_STD,
    "out_proj": LINEAR_STD,
    "out_proj_unscaled": DOWN_STD,
    "w1": LINEAR_STD,
    "w2": LINEAR_STD,
    "w2_unscaled": LINEAR_STD,
    "w3": DOWN_STD,
}


def _llama2_stds(config: ModelConfig) -> dict[str, float]:
    """LLAMA2's (modeling_llama's) keys by our names: w1 and w3 take ffn_uplayer_init_std, w2
    ffn_other_init_std (InternLM assigns them by name); unset keys are 0.02, InternLM's default."""

    def std(value: float | None) -> float:
        return LLAMA2_INIT_STD if value is None else value

    return {
        "embedding": std(config.embedding_init_std),
        "head": std(config.out_head_init_std),
        "Wqkv": std(config.attn_wqkv_init_std),
        "out_proj": std(config.attn_other_init_std),
        "out_proj_unscaled": std(config.attn_other_init_std),
        "w1": std(config.ffn_uplayer_init_std),
        "w2": std(config.ffn_other_init_std),
        "w2_unscaled": std(config.ffn_other_init_std),
        "w3": std(config.ffn_uplayer_init_std),
    }


def _draw(tensor: torch.Tensor, std: float, init_type: str, generator: torch.Generator | None) -> None:
    """InternLM's normal_ (N(0, std)) or uniform_: U(-a, a) with a = sqrt(3 * std), as InternLM's
    initialize_tensor.py computes it (its docstring means a std of `std`; the draw's is sqrt(std / 3))."""
    if init_type == "uniform":
        bound = math.sqrt(3.0 * std)
        tensor.uniform_(-bound, bound, generator=generator)
    else:
        tensor.normal_(0.0, std, generator=generator)


def _is_norm_weight(name: str) -> bool:
    return "norm" in name and name.endswith(".weight")


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)
