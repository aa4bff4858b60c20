"""Hang detection: a rank that makes no step progress for `timeout_s` writes every thread's Python
stack into the run folder, raises the hang alert and exits non-zero at once, long before the
collectives' own timeout, so that torchrun / Slurm restart the job and auto_resume continues it.

Two layers: a Python thread (named thread stacks, the alert, a bounded wait for it to go out), and
faulthandler's C watchdog `grace_s` later, which needs no GIL: it dumps the stacks and exits even
when the stuck main thread holds the interpreter.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 124  # as timeout(1): "ran out of time"
STACKS_FOLDER = "health"


def stacks_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / STACKS_FOLDER / f"stacks-rank{rank}.txt"


def format_all_stacks() -> str:
    """Every thread's current Python stack, each headed by the thread's name and id."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(
            f"Thread {names.get(ident, '?')} (id {ident}):\n{''.join(traceback.format_stack(frame))}"
        )
    return "\n".join(parts)


class HangWatchdog:
    """Call `beat(step)` whenever the rank makes progress; `close()` at the end of training.

    `on_hang(step, seconds, stacks_path)` runs on the watchdog thread after the stacks are written
    (send the alert there); `exit` ends the process (os._exit: the main thread is stuck)."""

    def __init__(
        self,
        timeout_s: float,
        run_dir: str | Path,
        rank: int,
        on_hang: Callable[[int, float, Path], None] | None = None,
        grace_s: float = 30.0,
        exit: Callable[[int], None] = os._exit,
        poll_s: float | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.path = stacks_file(run_dir, rank)
        self.rank = rank
        self.on_hang = on_hang
        self.grace_s = grace_s
        self._exit = exit
        self._poll_s = poll_s if poll_s is not None else min(1.0, timeout_s / 10)
        self._last = time.monotonic()
        self._step = -1
        self._stop = threading.Event()
        self._backstop_file = None
        self.fired = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._arm_backstop()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def _arm_backstop(self) -> None:
        try:
            if self._backstop_file is None:
                self._backstop_file = open(self.path.with_suffix(".faulthandler.txt"), "w")
            faulthandler.dump_traceback_later(
                self.timeout_s + self.grace_s, repeat=False, file=self._backstop_file, exit=True
            )
        except (OSError, ValueError, RuntimeError) as error:  # no usable file descriptor
            log.warning("hang watchdog: no faulthandler backstop (%s)", error)

    def beat(self, step: int) -> None:
        self._last = time.monotonic()
        self._step = step
        if self._backstop_file is not None:
            self._arm_backstop()  # cancels and re-arms: microseconds

    def close(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()
        if self._backstop_file is not None:
            self._backstop_file.close()
            self._backstop_file = None
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            idle = time.monotonic() - self._last
            if idle >= self.timeout_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        self.fired = True
        text = (
            f"rank {self.rank} (pid {os.getpid()}): no step progress for {idle:.0f} s since step "
            f"{self._step} began (health.hang_timeout_s = {self.timeout_s:g})\n\n{format_all_stacks()}"
        )
        try:
            self.path.write_text(text, encoding="utf-8")
        except OSError as error:
            log.error("hang watchdog: cannot write %s: %s", self.path, error)
        log.error(
            "hang: no step progress for %.0f s since step %d began; stacks of every thread in %s; "
            "exiting with %d",
            idle,
            self._step,
            self.path,
            HANG_EXIT_CODE,
        )
        try:
            if self.on_hang is not None:
                self.on_hang(self._step, idle, self.path)
        finally:
            for handler in logging.getLogger().handlers:
                try:
                    handler.flush()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            sys.stdout.flush()
            sys.stderr.flush()
            self._exit(HANG_EXIT_CODE)
