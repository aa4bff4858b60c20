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


class _HostBuffers:
    """Reused CPU buffers for the [T, V] gradient and the per-chunk logits. On CPU a fresh tensor
    of tens of MB is a new mapping from the C allocator whose every page faults on first write:
    about 3% of a CPU training step at V=32k (BENCHMARKS.md). Backward hands the gradient buffer
    back once its two matmuls are done, so the loss must be backpropagated once (no retain_graph),
    as the trainer does. CUDA's caching allocator already reuses memory: no pool there."""

    def __init__(self, keep: int = 6) -> None:
        self.keep = keep
        self.free: list[torch.Tensor] = []
        self.pooling = True  # False: the gradient buffer is not pooled (see backward_more_than_once)

    def take(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        for index, buffer in enumerate(self.free):
            if buffer.shape == shape and buffer.dtype == dtype and buffer.device == device:
                return self.free.pop(index)
        return torch.empty(shape, dtype=dtype, device=device)

    def give_back(self, buffer: torch.Tensor) -> None:
        if buffer.device.type == "cpu":
            self.free.append(buffer)
            if len(self.free) > self.keep:  # the oldest goes: shapes of the past do not pin memory
                self.free.pop(0)


_HOST_BUFFERS = _HostBuffers()


class backward_more_than_once:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within it, the loss's gradient buffer is its own tensor, not the pool's: a schedule that
    runs the loss's backward twice (zero-bubble: input gradients, later weight gradients) reads it
    in both."""

    def __enter__(self) -> None:
        self._before = _HOST_BUFFERS.pooling
        _HOST_BUFFERS.pooling = False

    def __exit__(self, *exc) -> None:
        _HOST_BUFFERS.pooling = self._before


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, label_smoothing, token_losses_out, correct_out):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != IGNORE_INDEX
        count = int(valid.sum())
        ctx.pooled = _HOST_BUFFERS.pooling
        grad_logits = (
            _HOST_BUFFERS.take((tokens, vocab), hidden.dtype, hidden.device)
            if ctx.pooled
            else torch.empty((tokens, vocab), dtype=hidden.dtype, device=hidden.device)
        )
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        safe_labels = labels.clamp(min=0)
        rows = min(CHUNK_TOKENS, tokens)
        # fp32 models: one matmul writes every token's logits into the gradient buffer, and each
        # chunk's softmax turns its rows into the gradient in place (lower precisions go through
        # fp32 working copies per chunk). One GEMM, not T / 256: MKL's fp32 GEMM runs 190 GFLOP/s
        # at [2048 x 512] x [512 x 32000] against 148 at 256 rows (oneDNN's bf16: 418 vs 408).
        in_fp32 = hidden.dtype == torch.float32
        chunk_logits = None if in_fp32 else _HOST_BUFFERS.take((rows, vocab), hidden.dtype, hidden.device)
        chunk_float = None if in_fp32 else _HOST_BUFFERS.take((rows, vocab), torch.float32, hidden.device)
        chunk_probs = None if in_fp32 else _HOST_BUFFERS.take((rows, vocab), torch.float32, hidden.device)
        if in_fp32:
            torch.mm(hidden, weight.t(), out=grad_logits)
        for start in range(0, tokens, CHUNK_TOKENS):
            end = min(start + CHUNK_TOKENS, tokens)
            if in_fp32:
                logits = grad_logits[start:end]
            else:
                logits = chunk_float[: end - start]
                logits.copy_(torch.mm(hidden[start:end], weight.t(), out=chunk_logits[: end - start]))
            target = safe_labels[start:end].unsqueeze(1)
            keep = valid[start:end]
            target_logit = logits.gather(1, target).squeeze(1)
            row_max = logits.amax(-1)
            correct_out[start:end] = _argmax_hits(logits, target, target_logit, row_max) & keep
            mean_logit = logits.mean(-1) if label_smoothing else None
            # PyTorch's softmax kernel works row by row in cache: one pass over the chunk's memory
            # where max / subtract / exp / sum / divide as separate ops made five. Its sum comes
            # back through the probability at the row's maximum, exp(0) / sum = 1 / sum, which
            # never underflows (>= 1 / vocab): log-sum-exp = max - log(p_max).
            grad = grad_logits[start:end]
            # In fp32 in place (logits and gradient share the rows): the kernel reads a row before
            # it writes it, equal bit for bit to the out-of-place softmax (the fp64 tests check).
            probs = grad if in_fp32 else chunk_probs[: end - start]
            torch.ops.aten._softmax.out(logits, -1, False, out=probs)
            lse = row_max - probs.amax(-1).log()
            nll = lse - target_logit
            token_losses_out[start:end] = torch.where(keep, nll, torch.zeros_like(nll))
            loss = nll
            if label_smoothing:
                # Cross entropy against the uniform distribution is lse - mean(logits).
                loss = (1 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
            total += torch.where(keep, loss, torch.zeros_like(loss)).double().sum()
            # d loss / d logits = softmax - target distribution, stored without the 1/count of the
            # mean: values stay in [-1, 1], which fp16 holds without underflow; backward applies
            # 1/count together with the upstream gradient.
            if label_smoothing:
                probs.sub_(label_smoothing / vocab)
            probs.scatter_add_(1, target, torch.full_like(target_logit, -(1 - label_smoothing)).unsqueeze(1))
            if not in_fp32:
                grad.copy_(probs)
            if not bool(keep.all()):
                grad.index_fill_(0, (~keep).nonzero().squeeze(1), 0)
        for buffer in (chunk_logits, chunk_float, chunk_probs):
            if buffer is not None:
                _HOST_BUFFERS.give_back(buffer)
        ctx.save_for_backward(hidden, weight, grad_logits)
        ctx.count = max(count, 1)
        return (total / max(count, 1)).float()

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_logits = _head_gradients(ctx, grad_output)
        if ctx.pooled:
            _HOST_BUFFERS.give_back(grad_logits)
        return grad_hidden, grad_weight, None, None, None, None


def _head_gradients(ctx, grad_output: torch.Tensor) -> tuple:
    """The head's input and weight gradients from the saved d(loss)/d(logits), and those logits'
    gradient buffer (the caller may pool it)."""
    hidden, weight, grad_logits = ctx.saved_tensors
    scale = (grad_output / ctx.count).to(hidden.dtype)
    grad_hidden = (grad_logits @ weight) * scale if ctx.needs_input_grad[0] else None
    # Scaling the [T, h] input rather than the [V, h] product: one rounding either way, and
    # T/V of the work (1/16 at T = 2048, V = 32k).
    grad_weight = grad_logits.t() @ (hidden * scale) if ctx.needs_input_grad[1] else None
    return grad_hidden, grad_weight, grad_logits


def _argmax_hits(
    logits: torch.Tensor, target: torch.Tensor, target_logit: torch.Tensor, row_max: torch.Tensor
) -> torch.Tensor:
    """argmax(logits) == target per row, argmax's first-index rule for ties included, without a
    full argmax pass (the slowest reduction on CPU): only rows whose target logit equals the row
    maximum can hit, and only those rows are searched. On GPUs argmax is cheap and the row search
    would cost a host sync per chunk: plain argmax there."""
    if logits.device.type != "cpu":
        return logits.argmax(-1) == target.squeeze(1)
    hits = target_logit == row_max
    rows = hits.nonzero().squeeze(1)
    if rows.numel():
        hits[rows] = logits.index_select(0, rows).argmax(-1) == target.squeeze(1).index_select(0, rows)
    return hits


def head_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> HeadLossOutput:
    """hidden [..., h] (normed final hidden states), weight [V, h] (the head), labels [...].
    A tensor-parallel head's weight ([V/k, h], carrying `vocab_shard`) gives the same loss: on
    the rank's vocabulary slice (parallel_output), or on the gathered weight."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    token_losses = torch.empty(flat_labels.shape[0], dtype=torch.float32, device=hidden.device)
    correct = torch.empty(flat_labels.shape[0], dtype=torch.bool, device=hidden.device)
    shard = getattr(weight, "vocab_shard", None)
    if shard is not None:
        from train_kernel.parallel.tensor_parallel import copy_to_region, gather_vocab

        if shard.parallel_output:
            # The hidden states enter the head's parallel region: their gradient is summed over it.
            flat_hidden = copy_to_region(flat_hidden, shard.tg)
            loss = _VocabParallelCrossEntropy.apply(
                flat_hidden, weight, flat_labels, float(label_smoothing), token_losses, correct, shard
            )
            return HeadLossOutput(loss, token_losses, correct)
        # Every rank computes the whole vocabulary's loss (and the same hidden-state gradient).
        weight = gather_vocab(weight, shard.tg)
    loss = _HeadCrossEntropy.apply(
        flat_hidden, weight, flat_labels, float(label_smoothing), token_losses, correct
    )
    return HeadLossOutput(loss, token_losses, correct)


def _all_reduce(x: torch.Tensor, group, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    torch.distributed.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The fused head + cross entropy on this tensor rank's vocabulary slice [V/k, h]: per chunk
    of tokens the row maximum is all-reduced (max), then the sum of exponentials, the target logit
    (from the rank that owns the target) and, with label smoothing, the sum of logits (one sum),
    then the first index of the maximum (min; argmax's tie rule). No rank holds [T, V]."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, label_smoothing, token_losses_out, correct_out, shard):
        group = shard.tg.group
        tokens, local_vocab = hidden.shape[0], weight.shape[0]
        vocab, start = shard.vocab_size, shard.start
        valid = labels != IGNORE_INDEX
        count = int(valid.sum())
        grad_logits = torch.empty((tokens, local_vocab), dtype=hidden.dtype, device=hidden.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        owned = valid & (labels >= start) & (labels < start + local_vocab)
        local_labels = torch.where(owned, labels - start, torch.zeros_like(labels))
        for lo in range(0, tokens, CHUNK_TOKENS):
            hi = min(lo + CHUNK_TOKENS, tokens)
            logits = torch.mm(hidden[lo:hi], weight.t()).float()
            target = local_labels[lo:hi].unsqueeze(1)
            mine, keep = owned[lo:hi], valid[lo:hi]
            local_max, local_arg = logits.max(-1)
            row_max = _all_reduce(local_max.clone(), group, torch.distributed.ReduceOp.MAX)
            probs = logits.sub(row_max.unsqueeze(1)).exp_()
            sums = torch.stack(
                (
                    probs.sum(-1),
                    torch.where(mine, logits.gather(1, target).squeeze(1), torch.zeros_like(row_max)),
                    logits.sum(-1) if label_smoothing else torch.zeros_like(row_max),
                )
            )
            sum_exp, target_logit, logit_sum = _all_reduce(sums, group)
            first = torch.where(local_max == row_max, local_arg + start, torch.full_like(local_arg, vocab))
            first = _all_reduce(first, group, torch.distributed.ReduceOp.MIN)
            correct_out[lo:hi] = (first == labels[lo:hi]) & keep
            lse = row_max + sum_exp.log()
            nll = lse - target_logit
            token_losses_out[lo:hi] = torch.where(keep, nll, torch.zeros_like(nll))
            loss = nll
            if label_smoothing:
                loss = (1 - label_smoothing) * nll + label_smoothing * (lse - logit_sum / vocab)
            total += torch.where(keep, loss, torch.zeros_like(loss)).double().sum()
            # softmax - target distribution on this slice (the 1/count applied in backward)
            probs.div_(sum_exp.unsqueeze(1))
            if label_smoothing:
                probs.sub_(label_smoothing / vocab)
            hit = torch.where(mine, -(1 - label_smoothing), 0.0).to(probs.dtype).unsqueeze(1)
            probs.scatter_add_(1, target, hit)
            probs.mul_(keep.unsqueeze(1))
            grad_logits[lo:hi].copy_(probs)
        ctx.save_for_backward(hidden, weight, grad_logits)
        ctx.count = max(count, 1)
        return (total / max(count, 1)).float()

    @staticmethod
    def backward(ctx, grad_output):
        # grad_hidden is this vocabulary slice's share; copy_to_region sums the shares.
        grad_hidden, grad_weight, _ = _head_gradients(ctx, grad_output)
        return grad_hidden, grad_weight, None, None, None, None, None
