"""RMSNorm: fp32 arithmetic, result in the weight dtype; apex's fused kernel is taken when it applies."""

from __future__ import annotations

import torch

from train_kernel.model import layers
from train_kernel.model.layers import RMSNorm


def test_matches_the_reference_formula_in_bf16():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6, dtype=torch.bfloat16)
    norm.weight.data = (1 + 0.1 * torch.randn(64)).to(torch.bfloat16)
    x = torch.randn(3, 5, 64).to(torch.bfloat16)
    x32 = x.float()
    reference = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_apex_fused_kernel_is_used_where_it_applies(monkeypatch):
    # No CUDA or apex here: the dispatch is checked with a stand-in for apex's function (the GPU
    # check script runs the real one where apex is installed).
    calls = []

    def fused(x, weight, shape, eps):
        calls.append((x, weight, shape, eps))
        return torch.zeros_like(x)

    monkeypatch.setattr(layers, "mixed_dtype_fused_rms_norm_affine", fused)
    monkeypatch.setattr(layers, "apex_rms_norm_applies", lambda x: True)
    norm = RMSNorm(8, eps=1e-5)
    x = torch.randn(2, 8)
    assert torch.equal(norm(x), torch.zeros(2, 8))
    assert calls[0][1] is norm.weight and calls[0][2] == (8,) and calls[0][3] == 1e-5
