"""Accuracy, loss and perplexity over the tokens that have a label, overall and per data type
(InternLM's AccPerplex metric: the acc/<type>, tokens/<type>, loss/<type> fields of the log line).

Sums are kept as float64 tensors so that data-parallel ranks can all-reduce them in one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Rows of logits upcast to fp32 at a time: bounds the extra memory for large vocabularies.
_CHUNK_TOKENS = 8192


class TokenMetrics:
    def __init__(self, type_names: dict[int, str]) -> None:
        self.type_names = dict(sorted(type_names.items()))
        self.num_types = max(self.type_names, default=-1) + 1
        # Columns: tokens, correct, loss sum. Row t is type t; the last row is the total.
        self.sums = torch.zeros(self.num_types + 1, 3, dtype=torch.float64)

    @torch.no_grad()
    def update_from_losses(
        self, token_losses: torch.Tensor, correct: torch.Tensor, labels: torch.Tensor, type_ids: torch.Tensor
    ) -> None:
        """Accumulates per-token losses and hits already computed by the training step (one cross
        entropy pass serves both the loss and the metrics)."""
        keep = labels.reshape(-1) != IGNORE_INDEX
        if not bool(keep.any()):
            return
        losses = token_losses.reshape(-1)[keep].float()
        hits = correct.reshape(-1)[keep]
        self._accumulate(losses, hits, type_ids.reshape(-1).to(losses.device)[keep].long())

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, type_ids: torch.Tensor) -> None:
        """logits [..., V], labels and type_ids [...] (type id -1 marks padding)."""
        logits = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1).to(logits.device)
        type_ids = type_ids.reshape(-1).to(logits.device).long()
        keep = labels != IGNORE_INDEX
        if not bool(keep.any()):
            return
        logits, labels, type_ids = logits[keep], labels[keep].long(), type_ids[keep]
        losses = torch.empty(len(labels), dtype=torch.float32, device=logits.device)
        correct = torch.empty(len(labels), dtype=torch.bool, device=logits.device)
        for start in range(0, len(labels), _CHUNK_TOKENS):
            chunk = logits[start : start + _CHUNK_TOKENS].float()
            target = labels[start : start + _CHUNK_TOKENS]
            losses[start : start + len(target)] = F.cross_entropy(chunk, target, reduction="none")
            correct[start : start + len(target)] = chunk.argmax(-1) == target
        self._accumulate(losses, correct, type_ids)

    def _accumulate(self, losses: torch.Tensor, correct: torch.Tensor, type_ids: torch.Tensor) -> None:
        columns = torch.stack([torch.ones_like(losses), correct.float(), losses], dim=1).double().cpu()
        self.sums[-1] += columns.sum(0)
        type_ids = type_ids.clamp(min=0, max=max(self.num_types - 1, 0)).cpu()
        if self.num_types:
            self.sums[:-1].index_add_(0, type_ids, columns)

    def reset(self) -> None:
        self.sums.zero_()

    def summary(self) -> dict[str, float]:
        """The metric fields of the log line, in InternLM's order and rounding."""
        tokens, correct, loss_sum = self.sums[-1].tolist()
        loss = loss_sum / tokens if tokens else math.nan
        fields: dict[str, float] = {
            "acc": round(correct / tokens, 4) if tokens else 0.0,
            "perplexity": round(math.exp(min(loss, 700.0)), 4) if tokens else math.nan,
        }
        for type_id, name in self.type_names.items():
            type_tokens, type_correct, _ = self.sums[type_id].tolist()
            fields[f"acc/{name}"] = round(type_correct / type_tokens, 4) if type_tokens else 0.0
        for type_id, name in self.type_names.items():
            fields[f"tokens/{name}"] = int(self.sums[type_id, 0])
        fields["loss_from_metric"] = round(loss, 4) if tokens else math.nan
        for type_id, name in self.type_names.items():
            type_tokens, _, type_loss = self.sums[type_id].tolist()
            fields[f"loss/{name}"] = round(type_loss / type_tokens, 4) if type_tokens else math.nan
        return fields
