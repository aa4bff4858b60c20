"""InternLM data folders (``*.bin`` + ``*.bin.meta`` from its tools/tokenizer.py) as
``data.train_folder`` / ``data.valid_folder``: packed once with pack-stage's rules into a cache,
reused by every rank and every later run (resume included) while the files and the packing
settings stay the same.

Cache rule: ``<cache root>/<folder name>-<key>/`` where the key is the sha256 of the .bin / .meta
names, sizes and mtimes and of the packing settings (seq_len, micro_bsz, pack_sample_into_one,
min_length, seed). The cache root is ``$PACK_CACHE_DIR`` when set, else ``<run dir>/packed_data``.
Ranks take an exclusive file lock on the entry while packing: the first packs, the others wait
and find it done (on a cache folder every node sees, one rank of the job packs; on node-local
folders one rank per node does, with identical results since packing is deterministic).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pack_stage.internlm_folder import (
    BIN_SUFFIX,
    InternLMDataError,
    discover_bin_files,
    fingerprint,
    is_internlm_folder,
)
from pack_stage.pack import DEFAULT_SEED, PackConfig, pack
from pack_stage.schema import MANIFEST_NAME, PackedDataError

log = logging.getLogger(__name__)

CACHE_ENV = "PACK_CACHE_DIR"
CACHE_DIR_NAME = "packed_data"
# Bump when the conversion or packing of InternLM folders changes what a cache entry holds.
CACHE_VERSION = 1


@dataclass(frozen=True)
class PackSettings:
    seq_len: int
    micro_bsz: int
    pack_sample_into_one: bool = False
    min_length: int = 0
    seed: int = DEFAULT_SEED


def cache_root(run_dir: Path) -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(run_dir) / CACHE_DIR_NAME)


def cache_key(folder: Path, settings: PackSettings) -> str:
    """Content key of a pack of ``folder``: its files' names, sizes and mtimes, and the settings."""
    data = {
        "version": CACHE_VERSION,
        "files": fingerprint(discover_bin_files(folder)),
        "settings": [
            settings.seq_len,
            settings.micro_bsz,
            settings.pack_sample_into_one,
            settings.min_length,
            settings.seed,
        ],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def packed_internlm_folder(folder: str | Path, settings: PackSettings, root: Path, what: str) -> Path:
    """The cache folder holding ``folder`` packed (a pack-stage output whose ``train`` split holds
    every document), packing it first when no rank did yet. ``what`` names the config key in the
    log line."""
    folder = Path(folder).resolve()
    entry = root / f"{folder.name}-{cache_key(folder, settings)}"
    root.mkdir(parents=True, exist_ok=True)
    config = PackConfig(
        input=folder,
        output=entry,
        seq_len=settings.seq_len,
        micro_bsz=settings.micro_bsz,
        pack_sample_into_one=settings.pack_sample_into_one,
        min_length=settings.min_length,
        seed=settings.seed,
    )
    with _exclusive(entry.with_name(entry.name + ".lock"), what):
        existed = (entry / MANIFEST_NAME).is_file()
        started = time.perf_counter()
        manifest = pack(config, progress=False)
    rows = manifest.splits["train"].rows
    if existed:
        log.info(
            "%s %s: InternLM .bin folder; reusing its packed cache %s (%d rows)", what, folder, entry, rows
        )
    else:
        log.info(
            "%s %s: InternLM .bin folder; packed it into the cache %s in %.1f s (%d rows; "
            "seq_len %d, micro_bsz %d, pack_sample_into_one %s, min_length %d); later runs reuse it",
            what,
            folder,
            entry,
            time.perf_counter() - started,
            rows,
            settings.seq_len,
            settings.micro_bsz,
            settings.pack_sample_into_one,
            settings.min_length,
        )
    return entry


@contextmanager
def _exclusive(path: Path, what: str) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another rank is packing it into %s; waiting", what, path.with_suffix(""))
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # ENOLCK: a file system without locks; ranks would pack over each other
            raise PackedDataError(
                f"{path}: no file locks on this file system ({error}); set {CACHE_ENV} to a folder "
                "on one that has them, where the packed cache of InternLM data can be shared"
            ) from error
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def validation_sets(folder: str | Path) -> dict[str, Path]:
    """InternLM's validation sets of a valid_folder (its get_dataset_dict): one per folder that
    directly holds ``*.bin`` files, named by that folder's name (its path under ``folder`` when two
    share a name), in path order."""
    folder = Path(folder).resolve()
    groups: dict[Path, None] = {}
    for file in discover_bin_files(folder):
        groups.setdefault(file.path.parent, None)
    for group in groups:
        nested = [other for other in groups if other != group and group in other.parents]
        if nested:
            raise InternLMDataError(
                f"{group}: holds .bin files and also folders of them ({nested[0]}); InternLM evaluates "
                f"the files directly in {group} as one set: move them into a folder of their own"
            )
    names = [group.name for group in groups]
    sets = {}
    for group, name in zip(groups, names):
        if names.count(name) > 1:
            name = group.relative_to(folder).as_posix() if group != folder else folder.name
        sets[name] = group
    return sets


def is_internlm_data(folder: str | Path | None) -> bool:
    return folder is not None and is_internlm_folder(Path(folder))


__all__ = [
    "BIN_SUFFIX",
    "CACHE_ENV",
    "InternLMDataError",
    "PackSettings",
    "PackedDataError",
    "cache_key",
    "cache_root",
    "is_internlm_data",
    "packed_internlm_folder",
    "validation_sets",
]
