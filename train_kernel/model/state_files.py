"""Model weight files of our checkpoint layout (safetensors only, never pickle).

A folder holds `model_tp0_pp{p}.safetensors` per pipeline stage p (the entries of the modules that
stage owns, under the full model's key names) and `model_config.json` (config.model_config_json:
the ModelConfig and the weights' naming version). A single-process run writes only
`model_tp0_pp0.safetensors`. Folders written before the naming version existed are read under
today's names (config.upgrade_weight_names).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from train_kernel.durable import atomic_write

from .config import ModelConfig, model_config_from_json, model_config_json, upgrade_weight_names

CONFIG_FILE = "model_config.json"
_STAGE_FILE = re.compile(r"^model_tp0_pp(\d+)\.safetensors$")


def is_model_file(name: str) -> bool:
    """A file of a weights-only model folder (what to copy from an object store)."""
    return name == CONFIG_FILE or bool(_STAGE_FILE.match(name))


def stage_file_name(pipeline_stage: int) -> str:
    return f"model_tp0_pp{pipeline_stage}.safetensors"


def save_model_checkpoint(model: nn.Module, folder: str | os.PathLike, pipeline_stage: int = 0) -> Path:
    """Writes this stage's weights (and, from stage 0, the config) into `folder`; returns the
    weights file. `model` is an InternLM (or a stage of one: it carries `.config`)."""
    return write_model_state(model.config, model.state_dict(), folder, pipeline_stage)


def write_model_state(
    config: ModelConfig, state: dict[str, torch.Tensor], folder: str | os.PathLike, pipeline_stage: int = 0
) -> Path:
    """Same as save_model_checkpoint, from a state dict. Each file is written durably under a
    temporary name and renamed (train_kernel.durable), so it is never seen half written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or strided storage; detach to plain contiguous CPU copies.
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    path = folder / stage_file_name(pipeline_stage)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    if pipeline_stage == 0:
        text = json.dumps(model_config_json(config), indent=2, sort_keys=True)
        atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def load_model_state(folder: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Reads the config and merges every stage file into one full state dict (CPU tensors).
    Checks the keys against the model the config describes."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a model checkpoint folder")
    config, weights_format = read_model_config(config_path)
    stage_files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STAGE_FILE.match(p.name)))
    if not stage_files:
        raise FileNotFoundError(f"{folder} holds no model_tp0_pp*.safetensors file")
    state: dict[str, torch.Tensor] = {}
    for _, path in stage_files:
        for key, value in load_file(str(path)).items():
            if key in state:
                raise ValueError(f"{path.name}: key {key} also appears in another stage file")
            state[key] = value
    state = upgrade_weight_names(state, weights_format)
    _check_keys(config, state, folder)
    return config, state


def read_model_config(path: Path) -> tuple[ModelConfig, int]:
    """(config, weights_format) of a model_config.json file; errors name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    return model_config_from_json(data, str(path))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the full model's state dict, computed on the meta device."""
    from .internlm import InternLM  # local: the model module imports nothing from here

    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in InternLM(config).state_dict().items()}


def _check_keys(config: ModelConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = expected_shapes(config)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{folder}: weights do not match {CONFIG_FILE}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{folder}: {key} has shape {tuple(state[key].shape)}, {CONFIG_FILE} implies {shape}"
            )
