"""The fused head + cross entropy equals the plain logits -> cross entropy, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train_kernel.train import fused_loss
from train_kernel.train.fused_loss import head_cross_entropy


# fp64 goes through the fp32 working copies that bf16 / fp16 use; fp32 computes in place.
@pytest.mark.parametrize(
    ("dtype", "rel"), [(torch.float64, 1e-6), (torch.float32, 1e-5)], ids=["fp64", "fp32"]
)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_plain_cross_entropy(monkeypatch, label_smoothing, dtype, rel):
    monkeypatch.setattr(fused_loss, "CHUNK_TOKENS", 7)  # several chunks, a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (30,))
    labels[[3, 11, 29]] = -100
    out = head_cross_entropy(hidden, weight, labels, label_smoothing)
    (out.loss * 3).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.t()
    plain = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=label_smoothing)
    (plain * 3).backward()
    assert out.loss.item() == pytest.approx(plain.item(), rel=rel)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=10 * rel, atol=rel / 10)
    torch.testing.assert_close(grads[1], weight.grad, rtol=10 * rel, atol=rel / 10)
    per_token = F.cross_entropy(logits.detach(), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(out.token_losses.to(dtype), per_token, rtol=10 * rel, atol=rel)
    keep = labels != -100
    assert torch.equal(out.correct, (logits.argmax(-1) == labels) & keep)


def test_all_tokens_ignored_gives_zero_loss_and_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    out = head_cross_entropy(hidden, weight, torch.full((4,), -100))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_accuracy_follows_argmax_first_index_on_ties():
    # Rows 0 and 1 of the head are equal, so tokens pointing along them tie between classes 0 and 1:
    # argmax says 0, and a label 1 is a miss even though its logit is the maximum.
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    hidden = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])
    out = head_cross_entropy(hidden, weight, labels)
    assert out.correct.tolist() == [True, False, True, False]
    assert torch.equal(out.correct, (hidden @ weight.t()).argmax(-1) == labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_reused_buffers_give_the_same_result(dtype):
    # The gradient and chunk buffers are reused across calls: a second micro-batch with other
    # ignored rows must not see anything of the first (fp32 writes all logits into the reused
    # gradient buffer, lower precisions go through reused chunk buffers).
    torch.manual_seed(1)
    weight = torch.randn(64, 16, dtype=dtype, requires_grad=True)
    hidden = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    results = []
    for ignored in ([0, 5], [7], [0, 5]):
        labels = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(2))
        labels[ignored] = -100
        out = head_cross_entropy(hidden, weight, labels)
        out.loss.backward()
        results.append((out.loss.item(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
        logits = hidden.detach().float() @ weight.detach().float().t()
        plain = F.cross_entropy(logits, labels, ignore_index=-100)
        assert out.loss.item() == pytest.approx(plain.item(), rel=1e-2)
    assert results[0][0] == results[2][0]
    assert torch.equal(results[0][1], results[2][1]) and torch.equal(results[0][2], results[2][2])
    assert not torch.equal(results[0][1], results[1][1])


def test_buffer_pool_keeps_the_newest_and_only_cpu_buffers():
    pool = fused_loss._HostBuffers(keep=2)
    old, mid, new = (torch.empty(n, 3) for n in (1, 2, 4))
    for buffer in (old, mid, new):
        pool.give_back(buffer)
    assert pool.take((1, 3), torch.float32, torch.device("cpu")) is not old  # evicted: a fresh one
    assert pool.take((4, 3), torch.float32, torch.device("cpu")) is new
    assert pool.take((2, 3), torch.float32, torch.device("cpu")) is mid
    assert pool.free == []
    pool.give_back(torch.empty(2, 3, device="meta"))
    assert pool.free == []
