"""Reading a checkpoint back into a run. Each rank reads only the files it needs, checks each
against the manifest (size and sha256) before using it, and applies nothing until every rank has
read its share: a corrupt file anywhere lets the whole job fall back to an older checkpoint
together (trainer side: manager.py)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from train_kernel.model import build_model
from train_kernel.model.config import WEIGHTS_FORMAT, model_config_from_json, upgrade_weight_names
from train_kernel.parallel.zero_partition import partition_ranges

from . import layout
from .capture import RunState, describe_layout, layout_of
from .locations import Location
from .manifest import CheckpointError, Manifest, verify_file
from .model_state import check_model_state, load_model_state
from .param_index import StageIndex, derived_index, stage_index
from .reshard import reshard
from .rng import restore_rng

log = logging.getLogger(__name__)

CONTENTS = ("model", "optimizer", "sampler", "scheduler")


def expand_content(content: tuple[str, ...]) -> set[str]:
    return set(CONTENTS) if "all" in content else set(content)


def read_manifest(location: Location) -> Manifest:
    if not location.exists(layout.MANIFEST):
        raise CheckpointError(f"{location.uri}: no {layout.MANIFEST} (not a checkpoint of this layout)")
    return Manifest.parse(location.read_bytes(layout.MANIFEST), f"{location.uri}/{layout.MANIFEST}")


@dataclass
class RankPayload:
    """What this rank read, verified, not yet applied."""

    model: dict[str, torch.Tensor] | None = None
    optimizer: list[dict] | None = None
    sampler: dict | None = None
    scheduler: dict | None = None
    context: dict | None = None
    rng: dict | None = None
    notes: list[str] = field(default_factory=list)


class _Reader:
    def __init__(self, location: Location, manifest: Manifest, scratch: Path) -> None:
        self.location, self.manifest, self.scratch = location, manifest, scratch
        self.verified: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        """The local copy of `name`, fetched and checked once."""
        if name not in self.verified:
            self.verified[name] = self._fetch(name)
        return self.verified[name]

    def _fetch(self, name: str) -> Path:
        entry = self.manifest.entry(name)
        if entry is None:
            raise CheckpointError(f"{self.location.uri}: the manifest lists no {name}")
        path = self.location.fetch(name, self.scratch)
        verify_file(path, entry, self.location.uri)
        return path

    def json(self, name: str) -> dict:
        return json.loads(self.path(name).read_text(encoding="utf-8"))

    def torch(self, name: str) -> dict:
        return torch.load(self.path(name), map_location="cpu", weights_only=True)


def _weights_format(reader: _Reader, location: Location) -> int:
    """The naming version of the checkpoint's weights (model_config.json; 1 when it predates it)."""
    if reader.manifest.entry(layout.MODEL_CONFIG) is None:
        return WEIGHTS_FORMAT
    try:
        _, weights_format = model_config_from_json(
            reader.json(layout.MODEL_CONFIG), f"{location.uri}/{layout.MODEL_CONFIG}"
        )
    except (ValueError, TypeError) as error:
        raise CheckpointError(str(error)) from error
    return weights_format


def read_payload(
    location: Location, manifest: Manifest, content: set[str], run: RunState, scratch: Path
) -> RankPayload:
    parallel = run.parallel
    saved, current = manifest.layout, layout_of(parallel, run.config)
    # The stages' flat vectors are the same when pipeline, chunks and tensor sizes are: the ZeRO
    # slices are then re-cut by position alone (also in checkpoints without an optimizer index).
    same_stages = all(saved.get(key, 1) == current[key] for key in ("pipeline", "num_chunks", "tensor"))
    reader = _Reader(location, manifest, scratch)
    payload = RankPayload()
    if "model" in content:
        if same_stages:
            names = [layout.model_file(parallel.pp_rank)]
        else:  # another pipeline layout: every stage file, keys picked by name when applied
            names = sorted(name for name in manifest.names() if name.startswith("model_tp0_pp"))
        payload.model = {}
        for name in names:
            payload.model.update(load_file(str(reader.path(name))))
        payload.model = upgrade_weight_names(payload.model, _weights_format(reader, location))
        check_model_state(run.model, payload.model, location.uri)
    if "optimizer" in content:
        if same_stages:
            payload.optimizer = _same_stage_slices(reader, saved, run)
        else:
            payload.optimizer = [_resharded_slice(reader, saved, run, location)]
            payload.notes.append(
                f"optimizer state re-cut by parameter name from {describe_layout(saved)} to "
                f"{describe_layout(current)}"
            )
        if same_stages and saved["zero"] != current["zero"]:
            payload.notes.append(
                f"optimizer re-partitioned from ZeRO size {saved['zero']} to {current['zero']}"
            )
    if "sampler" in content:
        payload.sampler = reader.json(layout.SAMPLER)
        before, now = payload.sampler.get("global_micro_num"), run.sampler.global_micro_num
        if before is not None and before != now:
            payload.notes.append(
                f"the global batch changed from {before} to {now} micro-batches: training continues at "
                f"row {payload.sampler['consumed_rows']}, in batches of the new size"
            )
        payload.context = reader.json(layout.CONTEXT)
        rng_name = layout.rng_file(parallel.pp_rank, parallel.dp_rank, getattr(parallel, "tp_rank", 0))
        if manifest.entry(rng_name) is not None:
            payload.rng = reader.torch(rng_name)
        else:
            payload.notes.append(f"no random state saved for {rng_name}: the layout changed")
    if "scheduler" in content:
        payload.scheduler = reader.json(layout.SCHEDULER)
    return payload


def _same_stage_slices(reader: _Reader, saved: dict, run: RunState) -> list[dict]:
    """The saved ZeRO slices of this rank's stage that overlap its own slice."""
    numel = run.optimizer.inner.numel
    start, end = run.optimizer.partition
    wanted = [
        z
        for z, (lo, hi) in enumerate(partition_ranges(numel, int(saved["zero"])))
        if lo < end and hi > start or (lo == hi == start == end and z == 0)
    ] or [0]
    tp = getattr(run.parallel, "tp_rank", 0)
    return [reader.torch(layout.optimizer_file(run.parallel.pp_rank, z, tp)) for z in wanted]


def _resharded_slice(reader: _Reader, saved: dict, run: RunState, location: Location) -> dict:
    """This rank's slice of its stage's flat optimizer vector, from a checkpoint of another
    pipeline / chunk / tensor layout: re-cut parameter by parameter (reshard.py)."""
    # Keyed by (stage, tensor rank): every tensor rank's flat vector of every stage.
    old_indexes = {
        (stage, tp): _old_index(reader, saved, stage, run, tp)
        for stage in range(int(saved["pipeline"]))
        for tp in range(int(saved.get("tensor", 1)))
    }
    optimizer = run.optimizer
    new_index = stage_index(run.model, optimizer.params, optimizer.ranges)
    return reshard(
        old_indexes,
        lambda key, zero: reader.torch(layout.optimizer_file(key[0], zero, key[1])),
        new_index,
        optimizer.partition,
        location.uri,
    )


def _old_index(reader: _Reader, saved: dict, stage: int, run: RunState, tp: int = 0) -> StageIndex:
    name = layout.optimizer_index_file(stage, tp)
    if reader.manifest.entry(name) is not None:
        return StageIndex.from_json(reader.json(name), f"{reader.location.uri}/{name}")
    # A checkpoint from before the index: the stage's order follows from its weight file's keys.
    if _weights_format(reader, reader.location) != WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{reader.location.uri}: its optimizer state predates both the optimizer index and today's "
            "weight names, so it resumes only on its own pipeline layout; "
            "load it with content=('model', 'sampler', 'scheduler') or load_optimizer=False"
        )
    with safe_open(str(reader.path(layout.model_file(stage))), framework="pt") as weights:
        stage_names = set(weights.keys())
    full_order = [
        (key, tuple(param.shape)) for key, param in build_model(run.config.model, "meta").named_parameters()
    ]
    numel = sum(math.prod(shape) for key, shape in full_order if key in stage_names)
    return derived_index(full_order, stage_names, partition_ranges(numel, int(saved["zero"])))


def apply_payload(payload: RankPayload, run: RunState, source: str) -> None:
    if payload.model is not None:
        load_model_state(run.model, payload.model, source)
        if payload.optimizer is None:
            run.optimizer.reset_master_from_model()
    if payload.optimizer is not None:
        run.optimizer.import_state(payload.optimizer)
    counters = run.counters
    if payload.sampler is not None:
        run.sampler.load_state_dict(payload.sampler)
        context = payload.context or {}
        counters.batch_count = int(context.get("batch_count", 0))
        counters.inf_nan_skip_batches = int(context.get("inf_nan_skip_batches", 0))
        counters.num_consumed_tokens = int(context.get("num_consumed_tokens", 0))
    if payload.rng is not None:
        restore_rng(payload.rng)
    if payload.scheduler is not None:
        counters.step_count = int(payload.scheduler["step_count"])
