"""File names of a checkpoint folder (docs/ARCHITECTURE.md, section 4).

model_tp0_pp{p}.safetensors   weights of pipeline stage p (full-model key names)
model_config.json             the model's settings
optimizer_tp0_pp{p}_zo{z}.pt  ZeRO rank z's slice of stage p's optimizer (tensors only)
optimizer_index_tp0_pp{p}.json  which parameter (full-model name, shape) each element of stage p's
                              flat optimizer vector belongs to, and each ZeRO file's slice: lets
                              any other layout re-cut the optimizer state (absent before it existed)
rng_tp0_pp{p}_dp{d}.pt        random generator states of one rank
sampler.json                  the data sampler's position
scheduler.json                the lr / beta2 schedules' position
context.json                  step counters and the layout that wrote the checkpoint
config.py                     the config text of the run
manifest.json                 every file above with size and sha256
<step>.step                   the marker: written last, only when all of the above is durable
"""

from __future__ import annotations

import re

FORMAT = "llm-pretrain-ckpt/1"
MANIFEST = "manifest.json"
SAMPLER = "sampler.json"
SCHEDULER = "scheduler.json"
CONTEXT = "context.json"
CONFIG = "config.py"
MODEL_CONFIG = "model_config.json"
SNAPSHOT_SLOTS = ("0", "1")

_MARKER = re.compile(r"^(\d+)\.step$")


def model_file(pipeline_stage: int) -> str:
    return f"model_tp0_pp{pipeline_stage}.safetensors"


# Tensor parallelism: the weights stay whole (model_tp0_pp{p}, gathered from the tensor ranks);
# the optimizer files, its index and the RNG states are per tensor rank t (tp{t}).


def optimizer_file(pipeline_stage: int, zero_rank: int, tensor_rank: int = 0) -> str:
    return f"optimizer_tp{tensor_rank}_pp{pipeline_stage}_zo{zero_rank}.pt"


def optimizer_index_file(pipeline_stage: int, tensor_rank: int = 0) -> str:
    return f"optimizer_index_tp{tensor_rank}_pp{pipeline_stage}.json"


def rng_file(pipeline_stage: int, data_rank: int, tensor_rank: int = 0) -> str:
    return f"rng_tp{tensor_rank}_pp{pipeline_stage}_dp{data_rank}.pt"


def marker_name(step: int) -> str:
    return f"{step}.step"


def part_marker_name(node: int, step: int) -> str:
    """What a node's upload job writes last on a multi-node async save (its files, verified); the
    checkpoint is complete only with `marker_name(step)`, written after every node's part."""
    return f"node{node}-{step}.part.step"


def marker_step(name: str) -> int | None:
    """`120.step` -> 120; anything else -> None."""
    match = _MARKER.match(name)
    return int(match.group(1)) if match else None
