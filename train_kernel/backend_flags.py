"""The process-wide torch backend switches a config asks for, set once at the start of training:
cudnn_deterministic, cudnn_benchmark (torch.backends.cudnn) and model.dtype="torch.tf32"
(TensorFloat-32 matmuls and convolutions on Ampere and newer GPUs), as InternLM's launch does."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from train_kernel.config import TrainConfig

log = logging.getLogger(__name__)

TF32_DTYPE = "torch.tf32"


@dataclass(frozen=True)
class BackendFlags:
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    allow_tf32: bool

    @classmethod
    def of(cls, config: TrainConfig) -> BackendFlags:
        return cls(
            cudnn_deterministic=config.cudnn_deterministic,
            cudnn_benchmark=config.cudnn_benchmark,
            allow_tf32=config.model.dtype == TF32_DTYPE,
        )


def apply_backend_flags(config: TrainConfig) -> BackendFlags:
    """Sets the flags of `config` in torch.backends and logs them. Call it before model.dtype is
    resolved to a torch dtype: "torch.tf32" becomes float32 then, and only the name says TF32.

    allow_tf32 is set both ways (a float32 run gets exact fp32 matmuls even if an earlier run in the
    process allowed TF32)."""
    flags = BackendFlags.of(config)
    torch.backends.cudnn.deterministic = flags.cudnn_deterministic
    torch.backends.cudnn.benchmark = flags.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = flags.allow_tf32
    torch.backends.cudnn.allow_tf32 = flags.allow_tf32
    log.info(
        "torch backends: cudnn.deterministic=%s (cudnn_deterministic), cudnn.benchmark=%s "
        "(cudnn_benchmark), cuda.matmul.allow_tf32=cudnn.allow_tf32=%s (model.dtype %s)",
        flags.cudnn_deterministic,
        flags.cudnn_benchmark,
        flags.allow_tf32,
        config.model.dtype,
    )
    return flags
