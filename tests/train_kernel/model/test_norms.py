"""RMSNorm: fp32 arithmetic, result in the weight dtype; apex's fused kernel is taken when it applies."""

from __future__ import annotations

import pytest
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


def reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_hand_written_backward_matches_autograd_of_the_formula(dtype, tolerance):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6, dtype=dtype)
    norm.weight.data = (1 + 0.3 * torch.randn(48)).to(dtype)
    x = (3 * torch.randn(2, 7, 48)).to(dtype).requires_grad_()
    upstream = torch.randn(2, 7, 48).to(dtype)
    norm(x).backward(upstream)
    ours = x.grad.clone(), norm.weight.grad.clone()
    x.grad = None
    weight = norm.weight.detach().clone().requires_grad_()
    reference_norm(x, weight, 1e-6).backward(upstream)
    torch.testing.assert_close(ours[0], x.grad, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(ours[1], weight.grad, rtol=tolerance, atol=tolerance)


def test_gradient_only_where_asked():
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    frozen_input = torch.randn(3, 16)
    norm.weight.requires_grad_(True)
    norm(frozen_input).sum().backward()
    assert norm.weight.grad is not None
