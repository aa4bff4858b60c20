"""The packed (varlen) attention kernel: never crosses a segment, equals a naive masked reference
in value and gradient, for every bucket shape the planner can produce."""

from __future__ import annotations

import math

import pytest
import torch

from train_kernel.model import attention
from train_kernel.model.attention import PackedSegments, _optimal_cuts, varlen_causal_attention

HEADS, HEAD_DIM = 4, 16
# Segment layouts of the flattened tokens: one row; equal back-to-back segments (view path);
# mixed lengths (gather path, several buckets); many short documents.
LAYOUTS = {
    "single": [96],
    "equal": [32, 32, 32],
    "mixed": [7, 40, 1, 23, 40, 9, 64],
    "short": [3, 5, 2, 8, 6, 4, 1, 7, 9, 3],
}


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Reference in fp32: explicit block-diagonal causal mask over all tokens."""
    total = sum(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.arange(total)
    allowed = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])
    q32, k32, v32 = (x.float().transpose(0, 1) for x in (q, k, v))  # [heads, T, d]
    scores = q32 @ k32.transpose(1, 2) / math.sqrt(q.shape[-1])
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ v32).transpose(0, 1)


def qkv(total: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(dtype).requires_grad_() for _ in range(3)]


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


@pytest.fixture(params=["planner", "one_bucket", "bucket_per_length"])
def bucketing(request, monkeypatch):
    """Runs each test with the real cost model and with both extremes of it."""
    overhead = {"planner": None, "one_bucket": 1e30, "bucket_per_length": 0.0}[request.param]
    if overhead is not None:
        monkeypatch.setattr(attention, "_CALL_OVERHEAD_UNITS", {"cpu": overhead, "cuda": overhead})
    return request.param


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_path_matches_naive_masked_attention(layout, dtype, atol, bucketing):
    lengths = LAYOUTS[layout]
    q, k, v = qkv(sum(lengths), dtype)
    out = varlen_causal_attention(q, k, v, PackedSegments(cu_seqlens_of(lengths)), use_flash_attn=False)
    ref = naive_attention(q, k, v, lengths)
    assert out.dtype == dtype and out.shape == q.shape
    # bf16: the kernel rounds q.k and probabilities to bf16; 2e-2 is ~3 bf16 ulps at |out| ~ 1.
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)

    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=atol * 4, rtol=0)


def test_segments_do_not_see_each_other():
    lengths = [10, 6, 12]
    q, k, v = qkv(sum(lengths), torch.float32)
    segments = PackedSegments(cu_seqlens_of(lengths))
    base = varlen_causal_attention(q, k, v, segments, use_flash_attn=False)
    # Changing the middle document's keys/values leaves the other documents' outputs unchanged.
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[10:16] += 5.0
    v2[10:16] -= 3.0
    moved = varlen_causal_attention(q, k2, v2, segments, use_flash_attn=False)
    torch.testing.assert_close(moved[:10], base[:10], atol=0, rtol=0)
    torch.testing.assert_close(moved[16:], base[16:], atol=0, rtol=0)
    assert not torch.allclose(moved[10:16], base[10:16])


def test_plan_is_cached_per_forward():
    segments = PackedSegments(cu_seqlens_of([5, 9, 2]))
    plan = segments.sdpa_plan(16, 64, torch.device("cpu"))
    assert segments.sdpa_plan(16, 64, torch.device("cpu")) is plan
    assert segments.max_seqlen == 9


@pytest.mark.parametrize("bad", [[1, 5, 16], [0, 5, 15], [0, 5, 5, 16]])
def test_bad_cu_seqlens_are_rejected(bad):
    q, k, v = qkv(16, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_causal_attention(q, k, v, PackedSegments(torch.tensor(bad)), use_flash_attn=False)


def test_optimal_cuts_trade_padding_against_calls():
    lengths = [100, 99, 98, 10, 9, 8]
    assert _optimal_cuts(lengths, overhead=1e9) == [0, 6]  # calls are dear: one padded batch
    assert _optimal_cuts(lengths, overhead=0.0) == [0, 1, 2, 3, 4, 5, 6]  # calls are free
    assert _optimal_cuts(lengths, overhead=5000.0) == [0, 3, 6]  # long and short apart


def test_torch_varlen_kernel_gets_the_segments_and_a_causal_request(monkeypatch):
    # PyTorch's varlen kernel is CUDA-only: the dispatch is checked with a stand-in that computes
    # the reference from the arguments it is given (the GPU check runs the real kernel).
    lengths = LAYOUTS["mixed"]
    q, k, v = qkv(sum(lengths), torch.float32)
    calls = []

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, **causal):
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k, causal))
        return naive_attention(q, k, v, torch.diff(cu_q).tolist())

    monkeypatch.setattr(attention, "torch_varlen_attn", stand_in)
    monkeypatch.setattr(attention, "_TORCH_VARLEN_CAUSAL", {"window_size": (-1, 0)})
    monkeypatch.setattr(attention, "attention_kernel", lambda q, use_flash, dropout: "torch_varlen")
    out = varlen_causal_attention(q, k, v, PackedSegments(cu_seqlens_of(lengths)))
    torch.testing.assert_close(out, naive_attention(q, k, v, lengths))
    cu = cu_seqlens_of(lengths).tolist()
    assert calls == [(cu, cu, max(lengths), max(lengths), {"window_size": (-1, 0)})]


def test_torch_varlen_causal_request_fits_the_installed_signature():
    import inspect

    # Imported here: the attention module imports the kernel only where CUDA is available.
    varlen = pytest.importorskip("torch.nn.attention.varlen", reason="this PyTorch has no varlen kernel")
    parameters = inspect.signature(varlen.varlen_attn).parameters
    ((name, value),) = attention.causal_request(varlen.varlen_attn).items()
    assert name in parameters
    assert value in (True, (-1, 0))


def test_kernel_choice_on_cpu_and_with_dropout():
    q, _, _ = qkv(4, torch.bfloat16)
    assert attention.attention_kernel(q) == "sdpa_buckets"
    assert attention.attention_kernel(q, use_flash_attn=False) == "sdpa_buckets"
    assert attention.attention_kernel(q, dropout_p=0.1) == "sdpa_buckets"
