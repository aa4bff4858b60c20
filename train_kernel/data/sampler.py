"""The deterministic batch sampler: which packed rows make each step's batch, for every
data-parallel rank, with rampup and skipped batches; its whole state is three integers.

Global batch b is the next ``micro_num * dp_size`` rows of an endless row sequence; data-parallel
rank r takes the r-th slice of ``micro_num`` rows, so a single process given ``micro_num * dp``
micro-batches sees exactly the rows of the whole data-parallel group (the equivalence the
parallel tests rely on). Epoch 0 visits rows in their packed order (pack_stage already shuffled
documents with its seed); every later epoch visits them in a different pseudo-random order, an
affine permutation that costs no memory however many rows there are.

The position (``consumed_rows``) counts rows of the whole job, not of a rank: a checkpoint resumes
on any data-parallel size at the same row, and with the same global batch (micro_num * dp_size)
the same global batches follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from train_kernel.config.sections import BatchRampup

# InternLM's rampup_batch_size "start_bsz bsz_incre incre_every" as the config parses it: one
# implementation of the ramp, for the config (data.micro_num_at) and the sampler alike.
Rampup = BatchRampup


@dataclass(frozen=True)
class SampledBatch:
    index: int  # count of batches drawn before this one (skipped ones included)
    rows: np.ndarray  # this rank's rows, micro_num of them
    skipped: bool  # listed in skip_batches: drawn, discarded, not trained on


class BatchSampler:
    def __init__(
        self,
        num_rows: int,
        micro_num: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        rampup: Rampup | None = None,
        skip_batches: tuple[int, ...] = (),
    ) -> None:
        if num_rows < 1:
            raise ValueError("the training split holds no rows")
        self.num_rows = num_rows
        self.micro_num = micro_num
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.rampup = rampup
        self.skip_batches = frozenset(skip_batches)
        self.consumed_rows = 0  # global, over all data-parallel ranks
        self.batches_drawn = 0
        self.skipped = 0

    def micro_num_at(self, step: int) -> int:
        return self.rampup.micro_num_at(step, self.micro_num) if self.rampup else self.micro_num

    def next_batch(self, step: int) -> SampledBatch:
        micro_num = self.micro_num_at(step)
        global_size = micro_num * self.dp_size
        positions = self.consumed_rows + np.arange(global_size, dtype=np.int64)
        mine = positions[self.dp_rank * micro_num : (self.dp_rank + 1) * micro_num]
        batch = SampledBatch(self.batches_drawn, self._row_at(mine), self.batches_drawn in self.skip_batches)
        self.consumed_rows += global_size
        self.batches_drawn += 1
        self.skipped += batch.skipped
        return batch

    @property
    def epoch(self) -> int:
        return self.consumed_rows // self.num_rows

    def _row_at(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.num_rows)
        rows = offsets.copy()
        for epoch in np.unique(epochs):
            if epoch == 0:
                continue
            a, b = self._affine(int(epoch))
            mask = epochs == epoch
            # Python ints: a * offset can exceed int64 for billions of rows.
            rows[mask] = [(a * int(o) + b) % self.num_rows for o in offsets[mask]]
        return rows

    def _affine(self, epoch: int) -> tuple[int, int]:
        rng = np.random.default_rng([self.seed, epoch])
        n = self.num_rows
        while True:
            a = int(rng.integers(1, max(n, 2)))
            if math.gcd(a, n) == 1:
                return a, int(rng.integers(0, n))

    @property
    def global_micro_num(self) -> int:
        """Micro-batches of rows per global batch (before rampup)."""
        return self.micro_num * self.dp_size

    def state_dict(self) -> dict:
        # global_micro_num is informative (a resume says when the global batch changed).
        return {
            "consumed_rows": self.consumed_rows,
            "batches_drawn": self.batches_drawn,
            "skipped": self.skipped,
            "global_micro_num": self.global_micro_num,
        }

    def load_state_dict(self, state: dict) -> None:
        self.consumed_rows = int(state["consumed_rows"])
        self.batches_drawn = int(state["batches_drawn"])
        self.skipped = int(state["skipped"])
