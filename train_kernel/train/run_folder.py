"""The run folder and the log: ``runs/<JOB_NAME>/`` holds train.log and metrics.jsonl; a resumed
run appends to both. The log format is InternLM's, so existing log parsers keep working."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FORMAT = (
    "%(asctime)s %(levelname)s [%(filename)s, line %(lineno)d, in %(funcName)s] - "
    "pid=%(process)d : %(message)s"
)


def setup_logging(run_dir: Path, rank: int = 0) -> None:
    """Rank 0 logs to the console and to run_dir/train.log; other ranks log warnings only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):  # the CLI's basicConfig handler too: one line per record
        root.removeHandler(handler)
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
