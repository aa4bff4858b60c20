"""Micro-batches for the training step: rows from pack_stage's reader (or InternLM-style random
tokens when no data folder is configured), as tensors on the training device.

One micro-batch is one packed row of ``micro_bsz * seq_len`` tokens whose documents are kept
apart by ``cu_seqlens``; a step takes ``micro_num`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pack_stage.reader import PackedBatch, PackedReader

# InternLM's DATASET_TYPE_IDS_MAP: the type names shown for random data.
DEFAULT_TYPE_NAMES = {0: "en", 1: "cn", 2: "code"}


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # [1, L] int64
    position_ids: torch.Tensor  # [1, L] int64
    labels: torch.Tensor  # [1, L] int64, -100 = no target
    type_ids: torch.Tensor  # [1, L] int64, -1 = padding
    cu_seqlens: torch.Tensor  # [segments + 1] int32
    max_seqlen: int

    @property
    def segments(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


class RowSource(Protocol):
    type_names: dict[int, str]

    def __len__(self) -> int: ...

    def batch(self, rows: Sequence[int]) -> PackedBatch: ...


class PackedRows:
    """A split of a pack_stage output folder, checked against the config."""

    def __init__(self, folder: str | Path, split: str, seq_len: int, micro_bsz: int, vocab_size: int) -> None:
        self.reader = PackedReader(
            folder, split, expect_seq_len=seq_len, expect_micro_bsz=micro_bsz, expect_vocab_size=vocab_size
        )
        self.type_names = {i: name for name, i in self.reader.manifest.types.items()}

    def __len__(self) -> int:
        return len(self.reader)

    def batch(self, rows: Sequence[int]) -> PackedBatch:
        return self.reader.batch(rows)


class RandomRows:
    """InternLM's random dataset: uniform random tokens, one document per ``seq_len`` tokens.
    Row r is a pure function of (seed, r), so any rank can produce any row."""

    def __init__(self, num_rows: int, seq_len: int, micro_bsz: int, vocab_size: int, seed: int) -> None:
        self.num_rows = num_rows
        self.seq_len = seq_len
        self.micro_bsz = micro_bsz
        self.vocab_size = vocab_size
        self.seed = seed
        self.type_names = dict(DEFAULT_TYPE_NAMES)

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, rows: Sequence[int]) -> PackedBatch:
        length = self.seq_len * self.micro_bsz
        input_ids = np.stack(
            [
                np.random.default_rng([self.seed, int(r)]).integers(
                    0, self.vocab_size, length, dtype=np.int32
                )
                for r in rows
            ]
        )
        labels = np.roll(input_ids, -1, axis=1)
        labels[:, self.seq_len - 1 :: self.seq_len] = -100  # each document's last token
        cu = np.arange(0, length + 1, self.seq_len, dtype=np.int32)
        positions = np.tile(np.arange(self.seq_len, dtype=np.int32), self.micro_bsz)
        return PackedBatch(
            input_ids=input_ids,
            labels=labels,
            type_ids=np.zeros_like(input_ids, dtype=np.int8),
            position_ids=np.broadcast_to(positions, input_ids.shape).copy(),
            cu_seqlens=[cu.copy() for _ in rows],
        )


def to_micro_batches(batch: PackedBatch, device: torch.device) -> list[MicroBatch]:
    """One MicroBatch per row, moved to ``device`` (pinned and asynchronous on CUDA)."""
    cuda = device.type == "cuda"
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(getattr(batch, name))).long()
        for name in ("input_ids", "position_ids", "labels", "type_ids")
    }
    if cuda:
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    micro_batches = []
    for r, cu in enumerate(batch.cu_seqlens):
        moved = {k: v[r : r + 1].to(device, non_blocking=cuda) for k, v in tensors.items()}
        micro_batches.append(
            MicroBatch(
                cu_seqlens=torch.from_numpy(np.ascontiguousarray(cu, dtype=np.int32)).to(
                    device, non_blocking=cuda
                ),
                max_seqlen=int(np.diff(cu).max()) if len(cu) > 1 else 0,
                **moved,
            )
        )
    return micro_batches
