"""Causal self-attention over packed rows: each document (segment) attends only to itself.

A packed micro-batch is flattened to T = B*L tokens; `cu_seqlens` ([n+1], 0 .. T) marks where the
segments start. Three kernels give the same result:

- flash-attn's varlen kernel (CUDA, fp16/bf16, `flash_attn` importable) takes cu_seqlens directly.
- Without flash-attn, PyTorch's own varlen flash kernel (`torch.nn.attention.varlen`, PyTorch >= 2.10,
  CUDA, fp16/bf16, no dropout) does the same: a CUDA install gets a varlen kernel with nothing to build.
- PyTorch SDPA: segments are gathered into padded batches of similar length ("buckets") and run
  with is_causal=True. The padding sits at the end of each segment, so under the causal mask no
  real query sees a padded key, and padded outputs are dropped. Work is ~sum(len^2), not the
  T^2 of one block-diagonal mask over the whole row: on one CPU core, T=8192 in 29 segments of
  50-600 tokens, forward+backward takes 2.9 s against 42 s for the masked SDPA (fp32; bf16 2.1 s
  against 33 s). `python -m bench.bench_attention` measures it.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

try:  # optional CUDA kernel; absent on CPU-only installs
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_varlen_func = None


def causal_request(kernel: Callable) -> dict:
    """How to ask torch's varlen kernel for causal attention: PyTorch 2.10/2.11 take is_causal=True,
    later versions a window of (-1, 0) (everything before, nothing after)."""
    if "is_causal" in inspect.signature(kernel).parameters:
        return {"is_causal": True}
    return {"window_size": (-1, 0)}


# PyTorch >= 2.10; its CUDA kernel is FlashAttention-2's. Imported only where CUDA is: the module
# pulls in torch._dynamo, about 1 s of start-up in every CPU process (each trainer, each rank) for a
# kernel that never runs there.
torch_varlen_attn = None
if torch.cuda.is_available():
    try:
        from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
    except ImportError:  # pragma: no cover - depends on the PyTorch version
        pass
_TORCH_VARLEN_CAUSAL: dict = {} if torch_varlen_attn is None else causal_request(torch_varlen_attn)

# Rough fixed cost of one extra SDPA call (kernel launch, autograd nodes, thread wake-up) in units
# of padded work "one query-key pair of one head-dim channel". Measured on CPU: ~15 us per call
# against ~2.6e-10 s per unit on one core (6e4 units); more cores shrink the unit cost, so 1e6
# covers ~16. On CUDA (no flash-attn) launches dominate. The planner trades calls for padding.
_CALL_OVERHEAD_UNITS = {"cpu": 1e6, "cuda": 1e10}


@dataclass(frozen=True)
class _SdpaPlan:
    """Buckets of segments with similar lengths, each run as one padded SDPA batch."""

    buckets: list[tuple[int, int]]  # (segments, padded length) per bucket
    # Token index of every padded slot, buckets concatenated (pad slots repeat the segment's
    # last token), and for every token its slot in the concatenated outputs. Both None when
    # the tokens already form one padding-free bucket (equal segments back to back).
    gather_index: torch.Tensor | None
    output_index: torch.Tensor | None


class PackedSegments:
    """Segment boundaries of one flattened packed batch, built once per forward and shared by all
    layers; it caches the SDPA bucket plan (which needs cu_seqlens on the host)."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}"
            )
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self._on_device: dict[torch.device, torch.Tensor] = {cu_seqlens.device: self.cu_seqlens}
        self._max_seqlen = max_seqlen
        self._plan: _SdpaPlan | None = None
        self._plan_key: tuple | None = None

    def cu_seqlens_on(self, device: torch.device) -> torch.Tensor:
        """int32 copy on `device`, made once per forward rather than once per layer."""
        if device not in self._on_device:
            self._on_device[device] = self.cu_seqlens.to(device)
        return self._on_device[device]

    @property
    def max_seqlen(self) -> int:
        if self._max_seqlen is None:  # costs a device sync on CUDA; callers should pass it
            self._max_seqlen = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        return self._max_seqlen

    def sdpa_plan(self, num_tokens: int, head_dim_total: int, device: torch.device) -> _SdpaPlan:
        key = (num_tokens, head_dim_total, device)
        if self._plan is None or self._plan_key != key:
            self._plan = _plan_buckets(self.cu_seqlens.tolist(), num_tokens, head_dim_total, device)
            self._plan_key = key
        return self._plan


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: PackedSegments,
    dropout_p: float = 0.0,
    use_flash_attn: bool = True,
) -> torch.Tensor:
    """Causal attention within each segment. q: [T, heads, head_dim], k and v: [T, kv_heads,
    head_dim] with kv_heads dividing heads (grouped-query: query head j reads kv head
    j // (heads / kv_heads)); returns q's shape."""
    kernel = attention_kernel(q, use_flash_attn, dropout_p)
    if k.shape[1] != q.shape[1] and kernel != "flash_attn":
        # flash-attn groups heads itself; the other kernels get each kv head repeated per group.
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if kernel == "sdpa_buckets":
        return _bucketed_sdpa(q, k, v, segments, dropout_p)
    cu = segments.cu_seqlens_on(q.device)
    max_len = segments.max_seqlen
    if kernel == "flash_attn":
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p, causal=True)
    return torch_varlen_attn(q, k, v, cu, cu, max_len, max_len, **_TORCH_VARLEN_CAUSAL)


def attention_kernel(q: torch.Tensor, use_flash_attn: bool = True, dropout_p: float = 0.0) -> str:
    """Which kernel `varlen_causal_attention` runs for `q`: "flash_attn", "torch_varlen" or
    "sdpa_buckets" (what the GPU check records)."""
    if use_flash_attn and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash_attn_varlen_func is not None:
            return "flash_attn"
        if torch_varlen_attn is not None and dropout_p == 0.0:  # torch's varlen kernel has no dropout
            return "torch_varlen"
    return "sdpa_buckets"


def _bucketed_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: PackedSegments, dropout_p: float
) -> torch.Tensor:
    num_tokens, heads, head_dim = q.shape
    plan = segments.sdpa_plan(num_tokens, heads * head_dim, q.device)
    if plan.gather_index is not None:
        # One gather (and so one scatter-add in backward) for all buckets: per-bucket gathers
        # would each zero-fill and scatter into a full [T, heads, head_dim] gradient.
        q, k, v = (x.index_select(0, plan.gather_index) for x in (q, k, v))
    sizes = [n * length for n, length in plan.buckets]
    outputs = []
    for (n, length), *batch in zip(plan.buckets, *(x.split(sizes) for x in (q, k, v))):
        # SDPA wants [batch, heads, seq, dim]. PyTorch's CPU flash kernel runs faster on
        # head-major copies than on the transposed views, copies included (forward + backward of
        # one attention layer: 101 ms against 104, hidden 512, 2048 tokens); CUDA kernels take the
        # views as they are.
        batch = [x.view(n, length, heads, head_dim).transpose(1, 2) for x in batch]
        if q.device.type == "cpu":
            batch = [x.contiguous() for x in batch]
        out = F.scaled_dot_product_attention(*batch, dropout_p=dropout_p, is_causal=True)
        outputs.append(out.transpose(1, 2).reshape(n * length, heads, head_dim))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out if plan.output_index is None else out.index_select(0, plan.output_index)


def _plan_buckets(
    cu_seqlens: list[int], num_tokens: int, head_dim_total: int, device: torch.device
) -> _SdpaPlan:
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    lengths = [e - s for s, e in zip(starts, ends)]
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != num_tokens or min(lengths) <= 0:
        raise ValueError(
            f"cu_seqlens must rise strictly from 0 to the number of tokens ({num_tokens}); got "
            f"{cu_seqlens[:8]}{'...' if len(cu_seqlens) > 8 else ''} ending {cu_seqlens[-1]}"
        )
    if len(set(lengths)) == 1:  # e.g. unpacked rows: a view, no gather
        return _SdpaPlan([(len(lengths), lengths[0])], None, None)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    overhead = _CALL_OVERHEAD_UNITS.get(device.type, _CALL_OVERHEAD_UNITS["cpu"]) / head_dim_total
    cuts = _optimal_cuts([lengths[i] for i in order], overhead)

    buckets, gather, output_index, offset = [], [], np.empty(num_tokens, dtype=np.int64), 0
    for lo, hi in itertools.pairwise(cuts):
        padded = lengths[order[lo]]
        buckets.append((hi - lo, padded))
        slot = np.arange(padded)
        for m in order[lo:hi]:
            gather.append(starts[m] + np.minimum(slot, lengths[m] - 1))
            output_index[starts[m] : ends[m]] = offset + np.arange(lengths[m])
            offset += padded
    gather_index = torch.from_numpy(np.concatenate(gather)).to(device)
    return _SdpaPlan(buckets, gather_index, torch.from_numpy(output_index).to(device))


def _optimal_cuts(sorted_lengths: list[int], overhead: float) -> list[int]:
    """Split lengths (sorted longest first) into runs minimising sum(overhead + n * longest^2).

    Dynamic programme over run ends; O(n^2) numpy work, n = segments in the batch (tens)."""
    n = len(sorted_lengths)
    area = np.asarray(sorted_lengths, dtype=np.float64) ** 2
    best = np.zeros(n + 1)
    prev = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        first = np.arange(end)
        cost = best[:end] + overhead + (end - first) * area[:end]
        prev[end] = int(np.argmin(cost))
        best[end] = cost[prev[end]]
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(int(prev[cuts[-1]]))
    return cuts[::-1]
