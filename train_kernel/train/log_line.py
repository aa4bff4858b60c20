"""The per-step log line of the seed (InternLM's record_current_batch_training_metrics), field for
field, from the step record that also goes to metrics.jsonl."""

from __future__ import annotations

import datetime
import math

# Record keys that are not shown on the line (kept in metrics.jsonl).
_NOT_ON_LINE = {"time", "eta_s", "epoch", "skipped_batches", "data_wait_s"}
_LINE_NAMES = {"tgs": "tgs (tokens/gpu/second)"}


def format_value(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)


def format_log_line(record: dict) -> str:
    parts = [f"{_LINE_NAMES.get(k, k)}={format_value(v)}" for k, v in record.items() if k not in _NOT_ON_LINE]
    if "eta_s" in record:
        parts.append(f"eta={datetime.timedelta(seconds=round(record['eta_s']))}")
    return " ".join(parts)
