"""InternLM Python config files read into validated, typed settings (the public contract of the config).

from train_kernel.config import load_config
config = load_config("configs/7B_sft.py", ["data.total_steps=100"])
config.data.packed_length, config.model.hidden_size, config.parallel.zero1
"""

from train_kernel.config.errors import ConfigError
from train_kernel.config.loader import config_from_text, load_config
from train_kernel.config.sections import (
    AdamConfig,
    BatchRampup,
    Beta2SchedulerConfig,
    CkptConfig,
    DataConfig,
    Fp16ScalerConfig,
    GradScalerConfig,
    HybridZeroOptimizerConfig,
    LoadCkptInfo,
    LossConfig,
    LrSchedulerConfig,
    MetricsConfig,
    ParallelConfig,
    PipelineConfig,
    TensorConfig,
    UploaderConfig,
)
from train_kernel.config.train_config import TrainConfig
from train_kernel.config.typecheck import field_docs
from train_kernel.model.config import ModelConfig

__all__ = [
    "AdamConfig",
    "BatchRampup",
    "Beta2SchedulerConfig",
    "CkptConfig",
    "ConfigError",
    "DataConfig",
    "Fp16ScalerConfig",
    "GradScalerConfig",
    "HybridZeroOptimizerConfig",
    "LoadCkptInfo",
    "LossConfig",
    "LrSchedulerConfig",
    "MetricsConfig",
    "ModelConfig",
    "ParallelConfig",
    "PipelineConfig",
    "TensorConfig",
    "TrainConfig",
    "UploaderConfig",
    "config_from_text",
    "field_docs",
    "load_config",
]
