"""Shared pieces of the checkpoint tests: tiny configs with saving on, and the loss trajectory of
a run folder (every record of a step, since a resumed run writes the redone steps again)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.train_kernel.train.tiny_config import tiny_config_text


def config_text(run_dir: Path, *, extra: str = "", **overrides) -> str:
    values = {"save": True, "checkpoint_every": 2, "total_steps": 6}
    values.update(overrides)
    return tiny_config_text(run_dir, **values) + extra


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def losses_by_step(run_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for record in train_records(run_dir):
        out.setdefault(record["step"], []).append(record["loss"])
    return out
