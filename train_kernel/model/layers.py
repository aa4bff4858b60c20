"""Building blocks of the InternLM transformer: norms, rotary embedding, attention, SwiGLU MLP,
and the block that joins them. Plain PyTorch; parallelism is applied from outside."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PackedSegments, varlen_causal_attention
from .config import ModelConfig

try:  # NVIDIA apex's fused RMSNorm (CUDA only; never the unrelated PyPI package named apex)
    from apex.normalization.fused_layer_norm import mixed_dtype_fused_rms_norm_affine
except ImportError:  # pragma: no cover - depends on the install
    mixed_dtype_fused_rms_norm_affine = None

Device = torch.device | str | None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight (as InternLM and HF Llama do)."""

    def __init__(
        self, size: int, eps: float, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if apex_rms_norm_applies(x):
            # One CUDA kernel, fp32 inside, result in the weight's dtype (what InternLM runs).
            return mixed_dtype_fused_rms_norm_affine(x, self.weight, (x.shape[-1],), self.eps)
        if x.device.type == "cpu":
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        # Elsewhere autograd's graph of F.rms_norm: on an H200 its fused kernels beat the
        # hand-written backward (0.43 ms against 0.67 per norm at 4096 x 4096, bench.bench_rms_norm).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(self.weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """weight * to_weight_dtype(x32 * rstd), rstd = rsqrt(mean(x32^2) + eps): PyTorch's fused
    forward kernel, a hand-written backward. Autograd's backward of the same expression runs the
    decomposed norm's graph (pow, mean, rsqrt, ... each a pass) and keeps x in fp32: this one makes
    about half the passes (per norm, forward + backward, hidden 512, 2048 tokens on CPU: 2.0 ms
    against 4.3) and keeps x in its own dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        if _fused_rms_norm is not None:  # the kernel F.rms_norm runs, which also returns rstd
            normed, rstd = _fused_rms_norm(x32, [x.shape[-1]], None, eps)
        else:  # pragma: no cover - PyTorch without the fused kernel
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
            normed = x32 * rstd
        normed_low = normed.to(weight.dtype)
        ctx.save_for_backward(x, weight, rstd, normed_low)
        return weight * normed_low

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd, normed_low = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed_low).sum(tuple(range(grad.dim() - 1)))
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd: rstd * (g - n * mean(g * n)), with n = x * rstd, g the gradient
            # reaching the fp32 normed value.
            grad_normed = (grad * weight).float()
            normed = x.to(torch.float32, copy=True).mul_(rstd)  # a copy: never x itself (fp32 models)
            projection = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = grad_normed.sub_(normed.mul_(projection)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


_fused_rms_norm = getattr(torch.ops.aten, "_fused_rms_norm", None)


def apex_rms_norm_applies(x: torch.Tensor) -> bool:
    return mixed_dtype_fused_rms_norm_affine is not None and x.is_cuda


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, result in the parameter dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(self.weight.dtype)


def build_norm(config: ModelConfig, device: Device) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.hidden_size, config.layer_norm_epsilon, device, config.torch_dtype)
    if config.norm_type == "layernorm":
        return FP32LayerNorm(
            config.hidden_size, config.layer_norm_epsilon, device=device, dtype=config.torch_dtype
        )
    raise ValueError(f"model.norm_type must be 'rmsnorm' or 'layernorm', got {config.norm_type!r}")


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, base: float, dynamic_ntk_positions: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B*L, 1, head_dim/2] in fp32 for GPT-NeoX style ("rotate_half") RoPE, the
    convention of HF Llama; positions restart per packed segment. dynamic_ntk_positions (the
    model's max_position_embeddings, with use_dynamic_ntk_rope): dynamic NTK scaling of the base."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if dynamic_ntk_positions is not None:
        inv_freq = dynamic_ntk_inv_freq(position_ids, inv_freq, exponents, base, dynamic_ntk_positions)
    angles = (position_ids.reshape(-1, 1).float() * inv_freq).unsqueeze(1)  # [T, 1, head_dim/2]
    return angles.cos(), angles.sin()


def dynamic_ntk_inv_freq(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    exponents: torch.Tensor,
    base: float,
    max_positions: int,
) -> torch.Tensor:
    """InternLM's DynamicNTKScalingRotaryEmbedding (scaling factor 1, as InternLM builds it): with
    s = the largest position in the micro-batch + 1 and m = max_positions, the base becomes
    base * (s / m) ** (d / (d - 2)) when s > m; at s <= m the plain frequencies, unchanged to the bit.
    Kept on the device (no host sync): torch.where picks the scaled or the plain table."""
    head_dim = 2 * exponents.numel()
    length = position_ids.max().double() + 1
    scaled_base = base * (length / max_positions) ** (head_dim / (head_dim - 2))
    scaled = 1.0 / (scaled_base.float() ** exponents)
    return torch.where(length > max_positions, scaled, inv_freq)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotates the pairs (i, i + head_dim/2) in fp32 (at least), result in
    x's dtype."""
    return _Rotary.apply(x, cos, sin)


class _Rotary(torch.autograd.Function):
    """RoPE with a hand-written backward: the gradient of a rotation is the rotation by minus the
    angle. Autograd's version of the same arithmetic zero-fills and accumulates a full-size
    gradient for every half-slice it reads (a quarter of a layer's non-GEMM backward time on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    half = wide.shape[-1] // 2
    first, second = wide[..., :half], wide[..., half:]
    out = torch.empty_like(x)
    # Each half computed in fp32 and written once into the output's dtype (no cat, no extra cast).
    rotated_first = first * cos
    out[..., :half] = rotated_first.sub_(second * sin)
    rotated_second = second * cos
    out[..., half:] = rotated_second.add_(first * sin)
    return out


class Attention(nn.Module):
    """Self-attention with a fused Wqkv whose output rows are [q; k; v]: q has num_attention_heads
    heads, k and v have kv_heads each (grouped-query attention when fewer), every head head_dim
    consecutive rows. With kv_heads == heads this is InternLM's "(three heads head_dim)" layout."""

    def __init__(self, config: ModelConfig, device: Device = None) -> None:
        super().__init__()
        hidden, dtype = config.hidden_size, config.torch_dtype
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.dropout_p = config.attn_drop_rate
        self.use_flash_attn = config.use_flash_attn
        bias = config.has_attention_bias  # LLAMA2's no_bias: none
        self.Wqkv = nn.Linear(hidden, config.qkv_size, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(hidden, hidden, bias=bias, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: PackedSegments
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv = self.Wqkv(x).view(batch * seq, self.num_heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split((self.num_heads, self.kv_heads, self.kv_heads), dim=1)
        # q and k rotated apart: one call on both (viewed as [T, 2 * heads, d]) is 4x slower on
        # CPU, its working set falls out of the cache.
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        dropout_p = self.dropout_p if self.training else 0.0
        out = varlen_causal_attention(q, k, v, segments, dropout_p, self.use_flash_attn)
        # -1: with tensor parallelism this rank's heads are a slice of the hidden size.
        return self.out_proj(out.reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    """w3(silu(w1(x)) * w2(x)): w1 is the gate, w2 the up and w3 the down projection, as in InternLM
    (its FeedForward; tools/transformers/convert2hf.py maps w1/w2/w3 to gate/up/down_proj)."""

    def __init__(self, config: ModelConfig, device: Device = None) -> None:
        super().__init__()
        hidden, inner, dtype = config.hidden_size, config.mlp_hidden_size, config.torch_dtype
        self.w1 = nn.Linear(hidden, inner, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(hidden, inner, bias=False, device=device, dtype=dtype)
        self.w3 = nn.Linear(inner, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gate and up projections as one GEMM (one pass over x, one input-gradient GEMM in
        # backward: ~20% faster MLP on CPU); w1 and w2 stay separate parameters, so checkpoint and
        # Hugging Face names are unchanged.
        gate, up = F.linear(x, torch.cat((self.w1.weight, self.w2.weight))).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm block (InternLM default): x + attn(norm(x)), then + mlp(norm(.)).
    Post-norm (apply_post_layer_norm): norm(x + attn(x)), then norm(. + mlp(.))."""

    def __init__(self, config: ModelConfig, layer_idx: int, device: Device = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.post_norm = config.apply_post_layer_norm
        self.residual_in_fp32 = config.residual_in_fp32
        self.dtype = config.torch_dtype
        self.attention_norm = build_norm(config, device)
        self.attention = Attention(config, device)
        self.mlp_norm = build_norm(config, device)
        self.mlp = SwiGLU(config, device)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: PackedSegments
    ) -> torch.Tensor:
        if self.post_norm:
            x = self.attention_norm(x + self.dropout(self.attention(x, rope, segments)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        # The residual stream may stay fp32 (residual_in_fp32); sublayers see the model dtype.
        residual = x.float() if self.residual_in_fp32 else x
        residual = residual + self.dropout(self.attention(self.attention_norm(residual), rope, segments))
        return residual + self.dropout(self.mlp(self.mlp_norm(residual)))
