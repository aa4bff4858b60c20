"""TrainConfig: a whole InternLM config file as one validated record."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train_kernel.config.errors import ConfigError
from train_kernel.config.health_sections import FaultInjectionConfig, HealthConfig
from train_kernel.config.monitor_sections import GradProfilingConfig, MonitorConfig
from train_kernel.config.rules import check_interleaved, check_model, check_stage_partition, dtype_name
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
from train_kernel.config.typecheck import Section, replace_checked
from train_kernel.model.config import MODEL_TYPES, ModelConfig
from train_kernel.parallel.tensor_rules import check_tensor_parallel

logger = logging.getLogger(__name__)

# Fields of TrainConfig that a config file does not write as lowercase top-level names.
INTERNAL_FIELDS = ("job_name", "constants", "source_path", "source_text")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(message, key=key)


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
    """InternLM's model_type: "INTERNLM" (InternLM v1: fused Wqkv with biases) or "LLAMA2" (InternLM's
    modeling_llama: the same decoder, with the model keys no_bias, adapt_hf, init_type and
    *_init_std). The model section records it (model.model_type) for checkpoints."""
    cudnn_deterministic: bool = False
    """torch.backends.cudnn.deterministic, set at the start of training: reproducible cuDNN kernels,
    sometimes slower."""
    cudnn_benchmark: bool = False
    """torch.backends.cudnn.benchmark, set at the start of training: autotune cuDNN kernels (this
    model runs none: matmuls and attention are not cuDNN's)."""
    run_dir: str | None = None
    """Run folder (log, metrics.jsonl, MLflow run id), relative to the working directory; default
    runs/<JOB_NAME>. A resumed run appends to it."""
    seed: int = 1024
    """Random seed of initialisation, data order and dropout (InternLM's --seed default)."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """`metrics = dict(...)` (ours)."""
    uploader: UploaderConfig = field(default_factory=UploaderConfig)
    """`uploader = dict(...)` (ours)."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """`monitor = dict(alert=..., tensorboard=...)` (InternLM's later configs): alerts are sent (see
    health); there is no TensorBoard writer (a warning says so when the file sets it)."""
    alert_address: str | None = None
    """InternLM's older Feishu alert webhook (now monitor.alert.feishu_alert_address, which takes
    precedence when enabled)."""
    metric_dtype: str | None = None
    """InternLM: "fp32" computes the metrics in fp32, anything else in the model's dtype. Here the
    metrics are always computed in fp32 (another value gets a warning)."""
    grad_profiling: GradProfilingConfig = field(default_factory=GradProfilingConfig)
    """`grad_profiling = dict(...)` (InternLM's per-layer gradient statistics): accepted; not recorded
    yet (a warning names what the file switches on)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """`health = dict(...)` (ours): rollbacks, hang watchdog, profiling (config/health_sections.py)."""
    fault_injection: FaultInjectionConfig = field(default_factory=FaultInjectionConfig)
    """`fault_injection = dict(...)` (ours): faults on purpose for tests and drills; off by default."""
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
            raw["model"] = {**model, "dtype": dtype_name(model["dtype"])}
        if isinstance(model, Mapping) and "model_type" in model:
            # InternLM's place is the top level; the model section takes its copy from there.
            raise ConfigError(
                f"{model['model_type']!r}: write model_type at the top level (model_type = ...), not in "
                "model = dict(...)",
                key="model.model_type",
            )
        return raw

    def derived_fields(self) -> dict[str, Any]:
        """The model section checked, run_dir, and the defaults taken from another section."""
        derived: dict[str, Any] = {}
        model_type = self._model_type()
        if model_type != self.model_type:
            derived["model_type"] = model_type
        model = self.model
        if model.model_type != model_type:
            model = dataclasses.replace(model, model_type=model_type)
        model = check_model(model)
        if model is not self.model:
            derived["model"] = model
        if self.run_dir is None:
            derived["run_dir"] = f"runs/{self.job_name}"
        if self.lr_scheduler.total_steps is None:
            derived["lr_scheduler"] = dataclasses.replace(
                self.lr_scheduler, total_steps=self.data.total_steps
            )
        beta2 = self.beta2_scheduler
        if beta2.init_beta2 is None or beta2.c is None:
            derived["beta2_scheduler"] = dataclasses.replace(
                beta2,
                init_beta2=self.adam.adam_beta2 if beta2.init_beta2 is None else beta2.init_beta2,
                c=self.adam.adam_beta2_c if beta2.c is None else beta2.c,
            )
        ckpt = self.ckpt
        if ckpt.checkpoint_every is None:
            ckpt = dataclasses.replace(ckpt, checkpoint_every=self.data.total_steps)
        if ckpt.oss_snapshot_freq is None:
            ckpt = dataclasses.replace(ckpt, oss_snapshot_freq=0)  # InternLM: no snapshots unless asked
        if ckpt is not self.ckpt:
            derived["ckpt"] = ckpt
        return derived

    def _model_type(self) -> str:
        """The top-level model_type; a TrainConfig built in code may name it in the model section
        only (ModelConfig(model_type=...)), but not two different ones."""
        _require(
            self.model_type in MODEL_TYPES, "model_type", f"{self.model_type!r} is not one of {MODEL_TYPES}"
        )
        default = ModelConfig.model_type
        if self.model_type == default:
            return self.model.model_type
        _require(
            self.model.model_type in (default, self.model_type),
            "model_type",
            f"{self.model_type!r} differs from model.model_type {self.model.model_type!r}",
        )
        return self.model_type

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
        self._check_consistency()

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
        schedule = parallel.pipeline.schedule
        if schedule not in (None, "InternLM"):
            interleaved = schedule.startswith("Interleaved")
            _require(
                interleaved == (model.num_chunks > 1),
                "parallel.pipeline.schedule",
                f"{schedule} needs model.num_chunks {'> 1' if interleaved else '= 1'}, "
                f"got {model.num_chunks}",
            )
            _require(
                self._engine_can_run(),
                "parallel.pipeline.schedule",
                f"PyTorch's {schedule} needs a fixed data.micro_num >= the pipeline size "
                f"{parallel.pipeline.size} (got {self.data.micro_num}"
                f"{', with rampup_batch_size' if self.data.rampup else ''}); use 'InternLM'",
            )
        check_interleaved(parallel.pipeline.size, model.num_chunks, self.data.micro_num)
        check_tensor_parallel(model, parallel, self.data.seq_len)
        if self.data.rampup is not None:
            try:
                for micro_num in self.data.rampup.micro_nums(self.data.micro_num):
                    check_interleaved(parallel.pipeline.size, model.num_chunks, micro_num)
            except ConfigError as error:
                raise ConfigError(
                    f"{self.data.rampup_batch_size!r}: a ramp-up step of {error.message}",
                    key="data.rampup_batch_size",
                ) from None
        check_stage_partition(model.num_layers, parallel.pipeline.size, model.num_chunks)
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

    def _engine_can_run(self) -> bool:
        return self.data.rampup is None and self.data.micro_num >= self.parallel.pipeline.size

    def pipeline_engine_schedule(self) -> str | None:
        """The PyTorch schedule a pipeline step runs (parallel.pipeline.schedule, or the default
        for model.num_chunks), or None for the project's own: "InternLM", or by default when
        micro_num is below the pipeline size or ramps up, which PyTorch's schedules cannot run."""
        schedule = self.parallel.pipeline.schedule
        if schedule == "InternLM" or (schedule is None and not self._engine_can_run()):
            return None
        return schedule or ("Interleaved1F1B" if self.model.num_chunks > 1 else "1F1B")

    def with_model_dtype(self, dtype: str) -> TrainConfig:
        """This config with model.dtype set to a concrete dtype (what "auto" resolved to on the
        run's device), without checking and warning about the rest again."""
        return replace_checked(self, model=dataclasses.replace(self.model, dtype=dtype))

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
