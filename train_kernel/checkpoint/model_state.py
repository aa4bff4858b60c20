"""A rank's model weights under the full model's key names, for a whole model, one pipeline stage
or the chunks of an interleaved stage alike."""

from __future__ import annotations

import torch
from torch import nn


def _parts(model: nn.Module) -> list[nn.Module]:
    chunks = getattr(model, "chunks", None)
    return list(chunks) if chunks is not None else [model]


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for part in _parts(model):
        state.update(part.state_dict())
    return state


def check_model_state(model: nn.Module, full_state: dict[str, torch.Tensor], source: str) -> None:
    """A missing key or another shape is a CheckpointError naming `source` and the weight."""
    from .manifest import CheckpointError

    for part in _parts(model):
        own = part.state_dict()
        missing = sorted(key for key in own if key not in full_state)
        if missing:
            raise CheckpointError(
                f"{source}: the checkpoint lacks {len(missing)} weights of this model, e.g. {missing[:3]}"
            )
        for key, value in own.items():
            if tuple(full_state[key].shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(full_state[key].shape)}, "
                    f"this model's is {tuple(value.shape)} (a checkpoint of another model config)"
                )


def load_model_state(model: nn.Module, full_state: dict[str, torch.Tensor], source: str) -> None:
    """Copies the entries this rank's model holds out of `full_state` (which may hold more: the
    whole model's weights), after check_model_state."""
    check_model_state(model, full_state, source)
    for part in _parts(model):
        part.load_state_dict({key: full_state[key] for key in part.state_dict()})


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its full-model key name (the name its weight has in the checkpoint)."""
    return {id(param): name for part in _parts(model) for name, param in part.named_parameters()}
