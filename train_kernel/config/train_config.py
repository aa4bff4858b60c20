"""TrainConfig: a whole InternLM config file as one validated record."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train_kernel.config.errors import ConfigError
from train_kernel.config.sections import (
    AdamConfig,
    Beta2SchedulerConfig,
    CkptConfig,
    DataConfig,
    GradScalerConfig,
    HybridZeroOptimizerConfig,
    LossConfig,
    LrSchedulerConfig,
    MetricsConfig,
    ParallelConfig,
    UploaderConfig,
)
from train_kernel.config.typecheck import Section, check_fields, set_field
from train_kernel.model.config import DTYPE_CHOICES, ModelConfig

logger = logging.getLogger(__name__)

MODEL_TYPES = ("INTERNLM",)
NORM_TYPES = ("rmsnorm", "layernorm")
# Fields of TrainConfig that a config file does not write as lowercase top-level names.
INTERNAL_FIELDS = ("job_name", "constants", "source_path", "source_text")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(message, key=key)


def _dtype_name(value: Any) -> Any:
    """`dtype=torch.bfloat16` (a torch.dtype, with `import torch` in the file) -> "torch.bfloat16"."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return value
    return str(value) if isinstance(value, torch.dtype) else value


def check_model(model: ModelConfig) -> ModelConfig:
    """Types and ranges of the model section (ModelConfig is a plain record; its checks live here)."""
    model = (
        dataclasses.replace(model, dtype=_dtype_name(model.dtype))
        if not isinstance(model.dtype, str)
        else model
    )
    check_fields(model)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "num_chunks"):
        _require(getattr(model, name) >= 1, name, f"must be >= 1, got {getattr(model, name)}")
    _require(
        model.hidden_size % model.num_attention_heads == 0,
        "num_attention_heads",
        f"{model.num_attention_heads} heads do not divide hidden_size {model.hidden_size}",
    )
    _require(
        model.head_dim % 2 == 0,
        "num_attention_heads",
        f"head dim hidden_size / num_attention_heads = {model.head_dim} must be even (rotary embedding)",
    )
    _require(model.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {model.mlp_ratio}")
    _require(
        model.dtype in DTYPE_CHOICES,
        "dtype",
        f"{model.dtype!r} is not supported; use one of: " + ", ".join(DTYPE_CHOICES),
    )
    if not isinstance(model.checkpoint, bool):
        _require(
            0 <= model.checkpoint <= 1,
            "checkpoint",
            f"must be True/False or a fraction of layers in [0, 1], got {model.checkpoint}",
        )
    _require(model.norm_type in NORM_TYPES, "norm_type", f"{model.norm_type!r} is not one of {NORM_TYPES}")
    _require(
        model.layer_norm_epsilon > 0, "layer_norm_epsilon", f"must be > 0, got {model.layer_norm_epsilon}"
    )
    _require(model.embed_grad_scale > 0, "embed_grad_scale", f"must be > 0, got {model.embed_grad_scale}")
    for name in ("drop_rate", "attn_drop_rate"):
        _require(0 <= getattr(model, name) < 1, name, f"must be in [0, 1), got {getattr(model, name)}")
    _require(model.rotary_base > 0, "rotary_base", f"must be > 0, got {model.rotary_base}")
    _require(
        model.num_layers % model.num_chunks == 0,
        "num_chunks",
        f"{model.num_chunks} chunks do not divide num_layers {model.num_layers}",
    )
    return model


@dataclass(frozen=True)
class TrainConfig(Section):
    """Everything a training run reads from its config file, validated, with defaults filled in.

    Lowercase top-level names of the file are the fields below; UPPERCASE names are kept in `constants`.
    """

    job_name: str = "train"
    """JOB_NAME of the file (default: the file's stem): names the run folder and the MLflow run."""
    data: DataConfig = field(default_factory=DataConfig)
    """`data = dict(...)`."""
    grad_scaler: GradScalerConfig = field(default_factory=GradScalerConfig)
    """`grad_scaler = dict(...)`."""
    hybrid_zero_optimizer: HybridZeroOptimizerConfig = field(default_factory=HybridZeroOptimizerConfig)
    """`hybrid_zero_optimizer = dict(...)`."""
    loss: LossConfig = field(default_factory=LossConfig)
    """`loss = dict(...)`."""
    adam: AdamConfig = field(default_factory=AdamConfig)
    """`adam = dict(...)`."""
    lr_scheduler: LrSchedulerConfig = field(default_factory=LrSchedulerConfig)
    """`lr_scheduler = dict(...)`."""
    beta2_scheduler: Beta2SchedulerConfig = field(default_factory=Beta2SchedulerConfig)
    """`beta2_scheduler = dict(...)`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """`model = dict(...)`."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """`parallel = dict(...)`."""
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    """`ckpt = dict(...)`."""
    model_type: str = "INTERNLM"
    """InternLM's model_type; only "INTERNLM" is supported."""
    cudnn_deterministic: bool = False
    """torch.backends.cudnn.deterministic: reproducible kernels, sometimes slower."""
    cudnn_benchmark: bool = False
    """torch.backends.cudnn.benchmark: autotune convolution kernels (no effect on this model)."""
    run_dir: str | None = None
    """Run folder (log, metrics.jsonl, MLflow run id), relative to the working directory; default
    runs/<JOB_NAME>. A resumed run appends to it."""
    seed: int = 1024
    """Random seed of initialisation, data order and dropout (InternLM's --seed default)."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """`metrics = dict(...)` (ours)."""
    uploader: UploaderConfig = field(default_factory=UploaderConfig)
    """`uploader = dict(...)` (ours)."""
    constants: dict[str, Any] = field(default_factory=dict)
    """The UPPERCASE top-level names of the file (SEQ_LEN, HIDDEN_SIZE, ...), as the file computed them."""
    source_path: Path | None = None
    """The config file (None for a config built in code)."""
    source_text: str = ""
    """The config file's text, saved into checkpoints."""

    @classmethod
    def prepare_raw(cls, raw: dict[str, Any]) -> dict[str, Any]:
        model = raw.get("model")
        if isinstance(model, Mapping) and "dtype" in model:
            raw["model"] = {**model, "dtype": _dtype_name(model["dtype"])}
        return raw

    def check(self) -> None:
        _require(self.job_name.strip() != "", "JOB_NAME", "must not be empty")
        _require(
            "/" not in self.job_name,
            "JOB_NAME",
            f"{self.job_name!r}: must not contain '/' (it names a folder)",
        )
        _require(
            self.model_type in MODEL_TYPES, "model_type", f"{self.model_type!r} is not one of {MODEL_TYPES}"
        )
        try:
            set_field(self, "model", check_model(self.model))
        except ConfigError as error:
            raise error.within("model") from None
        if self.run_dir is None:
            set_field(self, "run_dir", f"runs/{self.job_name}")
        self._fill_cross_section_defaults()
        self._check_consistency()

    def _fill_cross_section_defaults(self) -> None:
        if self.lr_scheduler.total_steps is None:
            set_field(
                self,
                "lr_scheduler",
                dataclasses.replace(self.lr_scheduler, total_steps=self.data.total_steps),
            )
        beta2 = self.beta2_scheduler
        if beta2.init_beta2 is None or beta2.c is None:
            set_field(
                self,
                "beta2_scheduler",
                dataclasses.replace(
                    beta2,
                    init_beta2=self.adam.adam_beta2 if beta2.init_beta2 is None else beta2.init_beta2,
                    c=self.adam.adam_beta2_c if beta2.c is None else beta2.c,
                ),
            )
        ckpt = self.ckpt
        if ckpt.checkpoint_every is None:
            ckpt = dataclasses.replace(ckpt, checkpoint_every=self.data.total_steps)
        if ckpt.oss_snapshot_freq is None:
            ckpt = dataclasses.replace(ckpt, oss_snapshot_freq=ckpt.checkpoint_every // 2)
        if ckpt is not self.ckpt:
            set_field(self, "ckpt", ckpt)

    def _check_consistency(self) -> None:
        where = f"{self.source_path}: " if self.source_path else ""
        model, parallel = self.model, self.parallel
        if model.num_chunks > 1:
            _require(
                parallel.pipeline.interleaved_overlap,
                "parallel.pipeline.interleaved_overlap",
                f"must be True when model.num_chunks = {model.num_chunks} > 1 "
                "(InternLM's interleaved schedule)",
            )
        stages = parallel.pipeline.size * model.num_chunks
        _require(
            model.num_layers >= stages,
            "parallel.pipeline.size",
            f"{parallel.pipeline.size} stages x {model.num_chunks} chunks is more than "
            f"num_layers {model.num_layers}",
        )
        if self.lr_scheduler.total_steps != self.data.total_steps:
            logger.warning(
                "%slr_scheduler.total_steps = %d differs from data.total_steps = %d: the learning rate "
                "schedule will not end with the run (InternLM allows this)",
                where,
                self.lr_scheduler.total_steps,
                self.data.total_steps,
            )
        if self.adam.lr < self.lr_scheduler.eta_min:
            logger.warning(
                "%sadam.lr = %g is below lr_scheduler.eta_min = %g: the cosine schedule will raise the lr",
                where,
                self.adam.lr,
                self.lr_scheduler.eta_min,
            )

    def with_model_dtype(self, dtype: str) -> TrainConfig:
        """This config with model.dtype set to a concrete dtype (what "auto" resolved to on the
        run's device), without checking and warning about the rest again."""
        resolved = copy.copy(self)
        set_field(resolved, "model", dataclasses.replace(self.model, dtype=dtype))
        return resolved

    def to_json(self) -> dict[str, Any]:
        """The settings as one flat JSON-able dict with dotted keys ("data.seq_len": 2048, ...), for
        metrics params. Derived fields and the file text are left out."""
        flat: dict[str, Any] = {"job_name": self.job_name}
        for item in dataclasses.fields(self):
            if item.name in INTERNAL_FIELDS:
                continue
            _flatten(item.name, getattr(self, item.name), flat)
        flat["source_path"] = str(self.source_path) if self.source_path is not None else None
        return flat


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            if item.init:
                _flatten(f"{prefix}.{item.name}", getattr(value, item.name), out)
    elif isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}", inner, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = [_json_value(inner) for inner in value]
    else:
        out[prefix] = _json_value(value)


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(inner) for inner in value]
    return str(value)
