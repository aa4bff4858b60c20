"""The per-step log line of the seed (InternLM's record_current_batch_training_metrics), field for
field, from the step record that also goes to metrics.jsonl."""

from __future__ import annotations

import datetime
import math

# Record keys that are not shown on the line (kept in metrics.jsonl).
_NOT_ON_LINE = {"time", "eta_s", "epoch", "skipped_batches", "data_wait_s"}
_LINE_NAMES = {"tgs": "tgs (tokens/gpu/second)"}
# InternLM's later line puts its windowed throughputs (train_kernel.train.tgs_stats) right after tgs.
_AFTER_TGS = "tgs/"


def format_value(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(value)  # a dict (grad_norm per parameter group) as InternLM prints it: {'0_default': 1.2}


def _line_order(record: dict) -> list[str]:
    keys = [k for k in record if k not in _NOT_ON_LINE]
    if "tgs" not in keys:
        return keys
    windows = [k for k in keys if k.startswith(_AFTER_TGS)]
    rest = [k for k in keys if not k.startswith(_AFTER_TGS)]
    at = rest.index("tgs") + 1
    return rest[:at] + windows + rest[at:]


def format_log_line(record: dict) -> str:
    parts = [f"{_LINE_NAMES.get(k, k)}={format_value(record[k])}" for k in _line_order(record)]
    if "eta_s" in record:
        parts.append(f"eta={datetime.timedelta(seconds=round(record['eta_s']))}")
    return " ".join(parts)
