"""InternLM's stop file (`ckpt.stop_file_path`): an operator writes a step number into it to make
a running job save a checkpoint there, without a restart:

    N         save a checkpoint after step N, then exit (InternLM's positive number)
    -N        save a checkpoint after step N and go on (InternLM's negative number)
    stop N    same as N;  save N  same as -N

Rank 0 reads it once per step (one stat when unchanged); the trainer shares the order with every
rank in the step's all-reduce, so all ranks save and stop at the same step."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SAVE, STOP = "save", "stop"


def parse_order(text: str) -> tuple[int, str] | None:
    words = text.split()
    if not words:
        return None
    try:
        if len(words) == 1:
            step = int(words[0])
            return (step, STOP) if step > 0 else (-step, SAVE) if step < 0 else None
        if len(words) == 2 and words[0] in (SAVE, STOP):
            return int(words[1]), words[0]
    except ValueError:
        pass
    raise ValueError(f"expected 'N', '-N', 'save N' or 'stop N', got {text.strip()!r}")


class StopFile:
    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._seen: tuple[float, int] | None = None
        self._order: tuple[int, str] | None = None
        self._stat_error: str | None = None

    def _read_if_changed(self, key: tuple[float, int]) -> None:
        if key == self._seen:
            return
        self._seen = key
        try:
            self._order = parse_order(self.path.read_text(encoding="utf-8", errors="replace"))
            if self._order:
                log.info("stop file %s: %s at step %d", self.path, self._order[1], self._order[0])
        except (ValueError, OSError) as error:
            log.warning("stop file %s ignored: %s", self.path, error)
            self._order = None

    def order_at(self, step: int) -> str | None:
        """SAVE, STOP or None for the step just finished."""
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._order = None
            self._stat_error = None
            return None
        except OSError as error:
            # NFS's ESTALE, EIO, a folder replaced by a file, a link loop: the file cannot be looked
            # at now, which must not stop a job of weeks. The last order read stays in force, and
            # the warning comes once per kind of error, not every step.
            reason = f"{type(error).__name__}: {error.strerror or error}"
            if reason != self._stat_error:
                log.warning(
                    "stop file %s cannot be read (%s); training goes on, checking again each step",
                    self.path,
                    reason,
                )
                self._stat_error = reason
        else:
            if self._stat_error is not None:
                log.info("stop file %s readable again", self.path)
                self._stat_error = None
            self._read_if_changed((stat.st_mtime, stat.st_size))
        if self._order and self._order[0] == step:
            return self._order[1]
        return None
