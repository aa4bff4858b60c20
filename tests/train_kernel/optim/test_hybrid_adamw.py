"""HybridAdamW's step: InternLM's overflow skip, and AdamW on the unscaled, clipped gradients."""

from __future__ import annotations

import pytest
import torch

from train_kernel.optim.hybrid_adamw import AdamSettings, HybridAdamW
from train_kernel.optim.loss_scaler import DynamicLossScaler


def test_overflow_skips_the_update_and_leaves_weights_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).half()
    scaler = DynamicLossScaler(initial_scale=1024, hysteresis=1)
    optimizer = HybridAdamW(list(model.parameters()), AdamSettings(lr=0.1), scaler)
    before = [p.detach().clone() for p in model.parameters()]
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    model.bias.grad = torch.ones_like(model.bias)
    result = optimizer.step(lr=0.1, beta2=0.95)
    assert not result.updated and scaler.scale == 512
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    model.weight.grad = torch.ones_like(model.weight)
    model.bias.grad = torch.ones_like(model.bias)
    assert optimizer.step(lr=0.1, beta2=0.95).updated
    assert not torch.equal(before[0], model.weight)


@pytest.mark.parametrize("clip", [0.0, 1.0, 1e9])
def test_step_equals_adamw_on_the_unscaled_clipped_gradients(clip):
    # The loss-scaled gradients are unscaled and clipped in one factor, inside PyTorch's fused
    # AdamW where it is available: the update must be plain AdamW on grad / scale, clipped.
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5)
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    scaler = DynamicLossScaler(initial_scale=256, hysteresis=1)
    settings = AdamSettings(lr=0.01, eps=1e-3, weight_decay=0.1)  # eps large enough that a wrong scale shows
    optimizer = HybridAdamW(list(model.parameters()), settings, scaler, clip_grad_norm=clip)
    plain = torch.optim.AdamW(reference, lr=0.01, betas=(0.9, 0.95), eps=settings.eps, weight_decay=0.1)
    for step in range(3):
        grads = [torch.randn_like(p) * (step + 1) for p in reference]
        for p, g in zip(model.parameters(), grads):
            p.grad = g * scaler.scale
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
        result = optimizer.step(lr=0.01, beta2=0.95)
        assert result.updated and result.grad_norm == pytest.approx(norm, rel=1e-6)
        shrink = clip / norm if 0 < clip < norm else 1.0
        for p, g in zip(reference, grads):
            p.grad = g * shrink
        plain.step()
        for ours, theirs in zip(model.parameters(), reference):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
