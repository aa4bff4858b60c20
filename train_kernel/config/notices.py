"""Keys of InternLM configs that are accepted but not (or not yet) applied here, and keys that InternLM's
rules make unused (load_ckpt_folder under load_ckpt_info, load_ckpt_info under auto_resume): each one
the file writes gets a warning naming it, so that no key is accepted and silently ignored.

The notices look at what the file wrote (`given`, the top-level names as the file bound them), not at
defaults: a default that is not applied is documented, a value the user wrote is warned about.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from train_kernel.config.train_config import TrainConfig

_MISSING = object()
WARNING = logging.WARNING


def _given(given: Mapping[str, Any], *path: str) -> Any:
    """The value the file wrote at the dotted `path`, or _MISSING."""
    value: Any = given
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _monitor(config: TrainConfig, given: Mapping[str, Any]) -> list[str]:
    out = []
    alert = config.monitor.alert  # sent by train_kernel.health.alerts
    if alert.enable_feishu_alert and not alert.feishu_alert_address:
        out.append(
            "monitor.alert.enable_feishu_alert=True: no feishu_alert_address, so no webhook messages"
            + (" (the older alert_address is used)" if config.alert_address else "")
        )
    if alert.feishu_alert_address and not alert.enable_feishu_alert:
        out.append(
            "monitor.alert.feishu_alert_address: not used, enable_feishu_alert is False (InternLM's rule)"
        )
    if _given(given, "monitor", "tensorboard") is not _MISSING:
        out.append(
            "monitor.tensorboard: there is no TensorBoard writer here; the metrics go to "
            f"{config.run_dir}/metrics.jsonl (and to MLflow with metrics.mlflow_tracking_uri)"
        )
    if config.alert_address and alert.enable_feishu_alert and alert.feishu_alert_address:
        out.append(f"alert_address={config.alert_address!r}: not used, monitor.alert.feishu_alert_address is")
    return out


def _profiling(config: TrainConfig) -> list[str]:
    out = []
    if config.metric_dtype is not None and config.metric_dtype != "fp32":
        out.append(
            f"metric_dtype={config.metric_dtype!r}: the metrics (acc, perplexity, loss/<type>) are always "
            "computed in fp32 here, as InternLM does with metric_dtype='fp32'"
        )
    if config.grad_profiling.enabled:
        out.append(
            f"grad_profiling: {', '.join(config.grad_profiling.enabled)} not recorded yet (per-layer "
            "gradient statistics are a later version's); the log line has the global grad_norm"
        )
    return out


def _data(config: TrainConfig, given: Mapping[str, Any]) -> list[str]:
    out = []
    data = config.data
    if _given(given, "data", "num_worker") is not _MISSING and data.num_worker > 0:
        out.append(
            f"data.num_worker={data.num_worker}: no DataLoader workers here; the packed rows are "
            "memory-mapped and read in the training process"
        )
    if _given(given, "data", "fixed_random_dataset_seqlen") is False and data.train_folder is not None:
        out.append(
            "data.fixed_random_dataset_seqlen=False: no effect, the data comes from data.train_folder "
            "(it only shapes the random data)"
        )
    return out


def _parallel(config: TrainConfig, given: Mapping[str, Any]) -> list[str]:
    out = []
    if config.parallel.tensor.size == 1:  # with tensor > 1 these shape the split (tensor_parallel.py)
        later = "they shape the split with parallel.tensor > 1"
        if config.parallel.sequence_parallel:
            out.append(f"parallel.sequence_parallel=True: no effect with parallel.tensor=1; {later}")
        for name in ("embed_split_hidden", "parallel_output"):
            value = _given(given, "model", name)
            if value is not _MISSING:
                out.append(f"model.{name}={value!r}: no effect with parallel.tensor=1; {later}")
    if (
        _given(given, "parallel", "pipeline", "interleaved_overlap") is not _MISSING
        and config.model.num_chunks == 1
    ):
        out.append(
            f"parallel.pipeline.interleaved_overlap={config.parallel.pipeline.interleaved_overlap}: no "
            "effect with model.num_chunks=1 (it concerns the interleaved schedule; with num_chunks > 1 "
            "its sends always overlap the computation)"
        )
    return out


def _ckpt(config: TrainConfig, given: Mapping[str, Any]) -> list[str]:
    out = []
    ckpt = config.ckpt
    legacy = [
        name for name in ("load_ckpt_folder", "load_model_only_folder") if getattr(ckpt, name) is not None
    ]
    loads = (["load_ckpt_info"] if ckpt.load_ckpt_info is not None else []) + legacy
    if ckpt.auto_resume and loads:
        source = "given" if _given(given, "ckpt", "auto_resume") is not _MISSING else "InternLM's default"
        out.append(
            f"ckpt.{', ckpt.'.join(loads)}: not used, ckpt.auto_resume is True ({source}): a start resumes "
            "from the latest checkpoint in ckpt.save_ckpt_folder, or from scratch when there is none "
            "(InternLM's rule); set ckpt.auto_resume=False to start from "
            f"ckpt.{loads[0]}"
        )
    elif ckpt.load_ckpt_info is not None and legacy:
        out.append(
            f"ckpt.{', ckpt.'.join(legacy)}: not used, ckpt.load_ckpt_info is given and takes precedence "
            "(InternLM's rule)"
        )
    if (
        ckpt.load_ckpt_info is not None
        and not ckpt.auto_resume
        and _given(given, "ckpt", "load_optimizer") is False
    ):
        out.append(
            "ckpt.load_optimizer=False: not used, ckpt.load_ckpt_info.content says what is loaded "
            f"({', '.join(ckpt.load_ckpt_info.content)})"
        )
    return out


def config_notices(config: TrainConfig, given: Mapping[str, Any]) -> list[str]:
    """One message per key of the file that is accepted but has no effect here (each names its key)."""
    return [
        *_monitor(config, given),
        *_profiling(config),
        *_data(config, given),
        *_parallel(config, given),
        *_ckpt(config, given),
    ]


def log_notices(config: TrainConfig, given: Mapping[str, Any], source: str, logger: logging.Logger) -> None:
    for message in config_notices(config, given):
        logger.warning("%s: %s", source, message)
