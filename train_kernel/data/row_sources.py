"""Which rows a run trains and validates on, from the data section of the config.

- no ``train_folder``: InternLM's random tokens (validation only on a ``valid_folder``);
- a pack-stage output folder: its ``train`` split; validation on the ``valid`` split of
  ``valid_folder`` (default: the train folder), recorded as ``val/loss``, ``val/acc``, ...;
- an InternLM folder of ``*.bin`` / ``*.bin.meta``: packed once into a cache (see
  :mod:`train_kernel.data.internlm_folders`); an InternLM ``valid_folder`` is evaluated per folder
  of .bin files, as InternLM does, recorded as ``val/<name>_loss``, ``val/<name>_acc``,
  ``val/<name>_plex``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from train_kernel.config import TrainConfig
from train_kernel.data.batches import PackedRows, RandomRows, RowSource
from train_kernel.data.internlm_folders import (
    PackSettings,
    cache_root,
    is_internlm_data,
    packed_internlm_folder,
    validation_sets,
)

log = logging.getLogger(__name__)

# The name of the one validation set of a pack-stage folder: its records keep the plain val/<field>.
UNNAMED = ""


def pack_settings(config: TrainConfig) -> PackSettings:
    data = config.data
    return PackSettings(data.seq_len, data.micro_bsz, data.pack_sample_into_one, data.min_length)


def train_row_source(config: TrainConfig, dp_size: int, run_dir: Path) -> RowSource:
    data, model = config.data, config.model
    if data.train_folder is None:
        rows = data.total_steps * data.micro_num * dp_size  # one epoch of global batches
        return RandomRows(rows, data.seq_len, data.micro_bsz, model.vocab_size, config.seed)
    folder = data.train_folder
    if is_internlm_data(folder):
        settings = pack_settings(config)
        folder = packed_internlm_folder(folder, settings, cache_root(run_dir), "data.train_folder")
    return PackedRows(folder, "train", data.seq_len, data.micro_bsz, model.vocab_size)


def validation_row_sources(config: TrainConfig, run_dir: Path) -> dict[str, RowSource]:
    """The named validation sets, in order; ``UNNAMED`` for a pack-stage folder's valid split."""
    data, model = config.data, config.model
    valid_folder = data.valid_folder  # the config fills it with train_folder when unset
    if valid_folder is None or data.valid_every <= 0:
        return {}
    if is_internlm_data(valid_folder):
        if data.train_folder and Path(valid_folder).resolve() == Path(data.train_folder).resolve():
            log.warning(
                "no validation: data.valid_folder is not set apart from the InternLM train_folder %s "
                "(InternLM's .bin folders have no valid split; name one with data.valid_folder)",
                data.train_folder,
            )
            return {}
        sources: dict[str, RowSource] = {}
        for name, folder in validation_sets(valid_folder).items():
            packed = packed_internlm_folder(
                folder, pack_settings(config), cache_root(run_dir), f"data.valid_folder set {name!r}"
            )
            sources[name] = PackedRows(packed, "train", data.seq_len, data.micro_bsz, model.vocab_size)
        return sources
    try:
        return {UNNAMED: PackedRows(valid_folder, "valid", data.seq_len, data.micro_bsz, model.vocab_size)}
    except (KeyError, ValueError) as error:
        log.warning("no validation: %s has no usable valid split (%s)", valid_folder, error)
        return {}


def validation_record(name: str, step: int, loss: float, summary: dict[str, float], seconds: float) -> dict:
    """One set's validation record. A named set (InternLM's valid_folder) gets InternLM's keys,
    val/<name>_loss, val/<name>_acc, val/<name>_plex (and val/<name>_seconds); the valid split of a
    pack-stage folder keeps val/loss and every metric field as val/<field>."""
    if name == UNNAMED:
        return {
            "step": step,
            "val/loss": loss,
            **{f"val/{k}": v for k, v in summary.items()},
            "val/seconds": seconds,
        }
    return {
        "step": step,
        f"val/{name}_loss": loss,
        f"val/{name}_acc": summary["acc"],
        f"val/{name}_plex": summary["perplexity"],
        f"val/{name}_seconds": seconds,
    }


def build_row_sources(
    config: TrainConfig, dp_size: int, run_dir: Path
) -> tuple[RowSource, dict[str, RowSource]]:
    """The training rows and the named validation sets (empty: no validation)."""
    return train_row_source(config, dp_size, run_dir), validation_row_sources(config, run_dir)
