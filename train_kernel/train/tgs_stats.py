"""Tokens per GPU per second over several windows: the tgs/* fields of InternLM's later log line
(record_current_batch_training_metrics), with its definitions.

Per step, tk = tokens of the global batch / world size and t = the step's seconds:
- tgs/last_tgs_1: tk / t of this step;
- tgs/tgs_all: sum tk / sum t over every step of this start (a token-weighted mean);
- tgs/tgs_avg: the mean of the steps' last_tgs_1 (each step weighs the same);
- tgs/tgs_SMA: sum tk / sum t over the last 50 steps (a moving window);
- tgs/last_tgs_10, tgs/last_tgs_50: sum tk / sum t over the last complete block of 10 / 50 steps,
  updated every 10th / 50th step, 0 before the first block is complete (as InternLM).
All rounded to 2 decimals. They count from the start of this process (a resumed run starts over).
"""

from __future__ import annotations

from collections import deque

SMA_WINDOW = 50
BLOCKS = (10, 50)


class TgsStats:
    def __init__(self) -> None:
        self.steps = 0
        self.sum_tokens = 0.0
        self.sum_seconds = 0.0
        self.sum_step_tgs = 0.0
        self.window: deque[tuple[float, float]] = deque(maxlen=SMA_WINDOW)
        # Per block size: tokens and seconds of the block in progress, and the last complete block's tgs.
        self.block_sums = {size: [0.0, 0.0] for size in BLOCKS}
        self.block_tgs = dict.fromkeys(BLOCKS, 0.0)

    def update(self, tokens_per_gpu: float, seconds: float) -> dict[str, float]:
        """Adds one step and returns its tgs/* fields."""
        seconds = max(seconds, 1e-9)  # a step is never instantaneous; guards the divisions
        self.steps += 1
        self.sum_tokens += tokens_per_gpu
        self.sum_seconds += seconds
        last = round(tokens_per_gpu / seconds, 2)
        self.sum_step_tgs += last
        self.window.append((tokens_per_gpu, seconds))
        for size, sums in self.block_sums.items():
            sums[0] += tokens_per_gpu
            sums[1] += seconds
            if self.steps % size == 0:
                self.block_tgs[size] = round(sums[0] / sums[1], 2)
                sums[0] = sums[1] = 0.0
        window_tokens = sum(tokens for tokens, _ in self.window)
        window_seconds = sum(secs for _, secs in self.window)
        return {
            "tgs/last_tgs_1": last,
            "tgs/tgs_all": round(self.sum_tokens / self.sum_seconds, 2),
            "tgs/tgs_avg": round(self.sum_step_tgs / self.steps, 2),
            "tgs/tgs_SMA": round(window_tokens / window_seconds, 2),
            "tgs/last_tgs_10": self.block_tgs[10],
            "tgs/last_tgs_50": self.block_tgs[50],
        }
