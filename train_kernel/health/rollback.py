"""The rollback record of a run folder: every rollback's reason and the batches it skips.

`<run_dir>/health/rollbacks.json` lists the rollbacks of the run (across restarts): the step where
it was decided, the checkpoint reloaded and the window of sampler batches `[first, end)` that led
from that checkpoint to the trouble. A (re)started trainer skips every recorded window, so a
resumed run never trains on them again, and counts the rollbacks against `health.max_rollbacks`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from train_kernel.durable import atomic_write_bytes

RECORD = "health/rollbacks.json"


class RollbackLimitError(RuntimeError):
    """The run needed more rollbacks than health.max_rollbacks allows (or had no checkpoint)."""


def limit_error(done: int, limit: int, reason: str, step: int, path: Path) -> RollbackLimitError:
    return RollbackLimitError(
        f"step {step}: {reason}; a rollback would be needed but this run already rolled back {done} "
        f"time(s) (health.max_rollbacks = {limit}; see {path}). Look at the data and learning rate "
        "around those steps, then raise health.max_rollbacks or remove that file to go on"
    )


@dataclass(frozen=True)
class Rollback:
    number: int  # 1-based, over the whole run folder
    reason: str
    at_step: int  # batch_count when it was decided
    to_step: int  # batch_count of the checkpoint reloaded
    checkpoint: str
    first_batch: int  # sampler batches [first_batch, end_batch) skipped from now on
    end_batch: int
    time: float

    def describe(self) -> str:
        return (
            f"rollback {self.number} at step {self.at_step}: {self.reason}; reloaded {self.checkpoint} "
            f"(step {self.to_step}); sampler batches {self.first_batch}..{self.end_batch - 1} skipped"
        )


class RollbackRecord:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RECORD
        self.rollbacks: list[Rollback] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.rollbacks = [Rollback(**item) for item in data["rollbacks"]]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{self.path}: not a rollback record ({error}); fix or move it") from error

    def skipped_batches(self) -> frozenset[int]:
        """Every sampler batch index a rollback of this run skips."""
        return frozenset(i for r in self.rollbacks for i in range(r.first_batch, r.end_batch))

    def check_allowed(self, max_rollbacks: int, reason: str, step: int) -> None:
        if len(self.rollbacks) >= max_rollbacks:
            raise limit_error(len(self.rollbacks), max_rollbacks, reason, step, self.path)

    def add(
        self, reason: str, at_step: int, to_step: int, checkpoint: str, first_batch: int, end_batch: int
    ) -> Rollback:
        """Records one rollback durably (before training goes on past it)."""
        rollback = Rollback(
            len(self.rollbacks) + 1, reason, at_step, to_step, checkpoint, first_batch, end_batch, time.time()
        )
        self.rollbacks.append(rollback)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"rollbacks": [asdict(r) for r in self.rollbacks]}, indent=1)
        atomic_write_bytes(self.path, text.encode("utf-8"))
        return rollback
