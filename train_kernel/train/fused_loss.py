"""The output head and the cross entropy in one pass over chunks of tokens.

The plain way materialises the logits [T, V] in the model dtype, again in fp32, then the fp32
softmax and its gradient: several passes over a tensor that is the largest of the step for a
32k-100k vocabulary. Here each chunk of tokens computes its logits, their fp32 log-sum-exp, the
per-token loss and hit, and at once the gradient of the loss with respect to its logits (softmax
minus the target distribution), stored in the model dtype; backward only runs the two matmuls that
carry that gradient to the hidden states and the head weight. Peak extra memory is one chunk in fp32
plus the [T, V] gradient in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
CHUNK_TOKENS = 256


@dataclass(frozen=True)
class HeadLossOutput:
    loss: torch.Tensor  # scalar, mean over tokens with a label; differentiable
    token_losses: torch.Tensor  # [T] fp32 plain cross entropy per token (0 where no label)
    correct: torch.Tensor  # [T] bool, argmax == label


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, label_smoothing, token_losses_out, correct_out):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != IGNORE_INDEX
        count = int(valid.sum())
        grad_logits = torch.empty(tokens, vocab, dtype=hidden.dtype, device=hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        safe_labels = labels.clamp(min=0)
        for start in range(0, tokens, CHUNK_TOKENS):
            end = min(start + CHUNK_TOKENS, tokens)
            logits = (hidden[start:end] @ weight.t()).float()
            target = safe_labels[start:end]
            keep = valid[start:end]
            target_logit = logits.gather(1, target.unsqueeze(1)).squeeze(1)
            correct_out[start:end] = (logits.argmax(-1) == target) & keep
            mean_logit = logits.mean(-1) if label_smoothing else None
            # Softmax in place, one exp per element: exp(x - max) / sum.
            row_max = logits.amax(-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            sums = probs.sum(-1, keepdim=True)
            lse = sums.log().squeeze(1) + row_max.squeeze(1)
            probs.div_(sums)
            nll = lse - target_logit
            token_losses_out[start:end] = torch.where(keep, nll, torch.zeros_like(nll))
            loss = nll
            if label_smoothing:
                # Cross entropy against the uniform distribution is lse - mean(logits).
                loss = (1 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
                probs.sub_(label_smoothing / vocab)
            total += torch.where(keep, loss, torch.zeros_like(loss)).double().sum()
            # d loss / d logits = softmax - target distribution, stored without the 1/count of the
            # mean: values stay in [-1, 1], which fp16 holds without underflow; backward applies
            # 1/count together with the upstream gradient.
            probs.scatter_add_(1, target.unsqueeze(1), torch.full_like(target_logit, -(1 - label_smoothing)).unsqueeze(1))
            if not bool(keep.all()):
                probs.mul_(keep.unsqueeze(1).to(probs.dtype))
            grad_logits[start:end] = probs
        ctx.save_for_backward(hidden, weight, grad_logits)
        ctx.count = max(count, 1)
        return (total / max(count, 1)).float()

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, grad_logits = ctx.saved_tensors
        scale = (grad_output / ctx.count).to(hidden.dtype)
        grad_hidden = (grad_logits @ weight) * scale if ctx.needs_input_grad[0] else None
        grad_weight = (grad_logits.t() @ hidden) * scale if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> HeadLossOutput:
    """hidden [..., h] (normed final hidden states), weight [V, h] (the head), labels [...]."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    token_losses = torch.empty(flat_labels.shape[0], dtype=torch.float32, device=hidden.device)
    correct = torch.empty(flat_labels.shape[0], dtype=torch.bool, device=hidden.device)
    loss = _HeadCrossEntropy.apply(flat_hidden, weight, flat_labels, float(label_smoothing), token_losses, correct)
    return HeadLossOutput(loss, token_losses, correct)
