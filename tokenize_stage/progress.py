"""The progress bar: MB/s and ETA from input bytes, documents/s and tokens/s alongside."""

from __future__ import annotations

import queue
import sys
import time

from tqdm import tqdm


class StageProgress:
    def __init__(self, total_bytes: int, enabled: bool = True) -> None:
        self._bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="tokenize",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self._started = time.monotonic()
        self.documents = 0
        self.tokens = 0

    def drain(self, updates: queue.Queue) -> None:
        """Applies every (bytes, documents, tokens) update the workers have sent so far."""
        advanced = 0
        while True:
            try:
                size, documents, tokens = updates.get_nowait()
            except queue.Empty:
                break
            advanced += size
            self.documents += documents
            self.tokens += tokens
        if advanced:
            elapsed = max(time.monotonic() - self._started, 1e-9)
            self._bar.set_postfix_str(
                f"docs/s={self.documents / elapsed:,.0f} tokens/s={self.tokens / elapsed:,.0f}", refresh=False
            )
            self._bar.update(advanced)

    def close(self) -> None:
        self._bar.close()
