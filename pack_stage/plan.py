"""Which documents go into which split, and in what order: one int64 array per split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitPlan:
    """One split's documents in packing order. Their stream offsets are not kept (8 bytes a
    document): the row builder walks the split in order and sums lengths as it goes."""

    name: str
    docs: np.ndarray  # global document indices, int64
    tokens: int

    @property
    def documents(self) -> int:
        return len(self.docs)

    def rows(self, packed_length: int) -> int:
        return -(-self.tokens // packed_length)


@dataclass(frozen=True)
class CorpusPlan:
    splits: tuple[SplitPlan, ...]
    dropped_documents: int
    dropped_tokens: int


def plan_documents(
    lengths: np.ndarray, *, min_length: int, valid_fraction: float, seed: int, shuffle: bool
) -> CorpusPlan:
    """Drops documents under ``min_length`` (and empty ones), sends exactly
    ``round(valid_fraction * kept)`` of them, chosen from the seed, to ``valid``, and shuffles each
    split with ``np.random.RandomState(seed)`` as InternLM's packed dataset does."""
    keep = lengths >= max(min_length, 1)
    kept = np.flatnonzero(keep)
    dropped_tokens = int(lengths[~keep].sum())
    dropped_documents = len(lengths) - len(kept)
    del keep

    split_docs: dict[str, np.ndarray] = {"train": kept}
    if valid_fraction > 0:
        n_valid = round(valid_fraction * len(kept))
        in_valid = np.zeros(len(kept), dtype=bool)
        # A generator apart from the shuffle's, so that the split does not echo the order.
        in_valid[np.random.default_rng(seed).choice(len(kept), size=n_valid, replace=False)] = True
        split_docs = {"train": kept[~in_valid], "valid": kept[in_valid]}
        del kept, in_valid

    splits = []
    for name, docs in split_docs.items():
        if shuffle:
            np.random.RandomState(seed).shuffle(docs)
        splits.append(SplitPlan(name, docs, int(lengths[docs].sum())))
    return CorpusPlan(tuple(splits), dropped_documents, dropped_tokens)
