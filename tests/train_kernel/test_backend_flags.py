"""cudnn_deterministic, cudnn_benchmark and model.dtype="torch.tf32" set torch's backend switches
(they used to be accepted and never applied)."""

from __future__ import annotations

import logging

import pytest
import torch

from train_kernel.backend_flags import apply_backend_flags
from train_kernel.config import config_from_text

FLAGS = (
    (torch.backends.cudnn, "deterministic"),
    (torch.backends.cudnn, "benchmark"),
    (torch.backends.cudnn, "allow_tf32"),
    (torch.backends.cuda.matmul, "allow_tf32"),
)


@pytest.fixture(autouse=True)
def restore_flags():
    saved = [getattr(owner, name) for owner, name in FLAGS]
    yield
    for (owner, name), value in zip(FLAGS, saved):
        setattr(owner, name, value)


def test_tf32_and_cudnn_switches_are_set(caplog):
    config = config_from_text(
        "model = dict(dtype='torch.tf32')\ncudnn_deterministic = True\ncudnn_benchmark = True\n"
    )
    with caplog.at_level(logging.INFO, logger="train_kernel.backend_flags"):
        apply_backend_flags(config)
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is True
    assert "cudnn.deterministic=True (cudnn_deterministic)" in caplog.text
    assert "allow_tf32=True (model.dtype torch.tf32)" in caplog.text


def test_float32_gets_exact_matmuls_even_after_a_tf32_run():
    apply_backend_flags(config_from_text("model = dict(dtype='torch.tf32')\n"))
    apply_backend_flags(config_from_text("model = dict(dtype='torch.float32')\n"))
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is False
