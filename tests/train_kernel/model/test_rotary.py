"""RoPE: the hand-written backward equals autograd through the plain rotate-half formula."""

from __future__ import annotations

import torch

from train_kernel.model.layers import apply_rotary, rotary_cos_sin


def _plain_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotate_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * torch.cat((cos, cos), -1) + rotate_half * torch.cat((sin, sin), -1)


def test_values_and_gradients_match_the_plain_formula():
    torch.manual_seed(0)
    positions = torch.tensor([0, 1, 2, 0, 1, 5, 9])  # restarts, as in a packed row
    cos, sin = (t.double() for t in rotary_cos_sin(positions, head_dim=8, base=10000.0))
    x = torch.randn(7, 3, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(7, 3, 8, dtype=torch.float64)
    ours = apply_rotary(x, cos, sin)
    (grad_ours,) = torch.autograd.grad(ours, x, upstream)
    plain = _plain_rotary(x, cos, sin)
    (grad_plain,) = torch.autograd.grad(plain, x, upstream)
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))


def test_low_precision_input_keeps_its_dtype_and_is_rotated_in_fp32():
    positions = torch.arange(16)
    cos, sin = rotary_cos_sin(positions, head_dim=64, base=10000.0)
    x = torch.randn(16, 2, 64).to(torch.bfloat16)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _plain_rotary(x.float(), cos, sin).to(torch.bfloat16), rtol=0, atol=0)
