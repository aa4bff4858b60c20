"""Finding the input files, their data types, and cutting them into work units.

A work unit is a piece of one input file that a worker tokenizes on its own: a byte range of an
uncompressed line-oriented file (so one 10 GB jsonl keeps every worker busy), a parquet row group,
or a whole file where it cannot be split (compressed streams, whole-file text). Unit boundaries
depend only on the file and ``chunk_bytes``, never on the worker count: that is what keeps the
output byte-identical however many workers run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokenize_stage.schema import FIXED_TYPE_IDS

DEFAULT_CHUNK_BYTES = 32 << 20
_COMPRESSIONS = (".gz", ".zst", ".zstd")
_FORMATS = (".jsonl", ".txt", ".parquet")


class InputError(ValueError):
    """An input folder or file that cannot be used as given."""


@dataclass(frozen=True)
class InputFile:
    path: Path  # absolute
    rel: str  # relative to the input folder, "/"-separated; the manifest key
    data_type: str
    fmt: str  # "jsonl" | "txt" | "parquet"
    compression: str | None  # ".gz" | ".zst" | None
    size: int
    mtime_ns: int

    @property
    def shard_rel(self) -> str:
        return self.rel + ".arrow"


@dataclass(frozen=True)
class WorkUnit:
    file: InputFile
    index: int
    start: int  # byte offset (line files) or row group index (parquet)
    end: int  # exclusive byte offset, or row group index + 1


def classify(name: str) -> tuple[str, str | None] | None:
    """('jsonl', '.gz') for 'x.jsonl.gz'; None for files the stage does not read."""
    compression = None
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            compression = ".zst" if suffix == ".zstd" else suffix
            name = name[: -len(suffix)]
            break
    for fmt in _FORMATS:
        if name.endswith(fmt):
            if fmt == ".parquet" and compression:
                return None  # parquet compresses internally
            return fmt[1:], compression
    return None


def discover_inputs(root: Path) -> tuple[list[InputFile], list[str], dict[str, str]]:
    """All inputs under the type folders of ``root`` sorted by relative path, the relative paths
    of files skipped for their extension, and the files that cannot even be looked at (a dangling
    link, say) with the reason."""
    root = root.resolve()
    if not root.is_dir():
        raise InputError(f"input folder {root} does not exist or is not a folder")
    files: list[InputFile] = []
    skipped: list[str] = []
    broken: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            kind = classify(name)
            if "/" not in rel:
                skipped.append(rel)  # a file at the top level has no data type folder
                continue
            if kind is None:
                skipped.append(rel)
                continue
            try:
                stat = path.stat()
            except OSError as error:
                broken[rel] = f"{type(error).__name__}: {error}"
                continue
            files.append(
                InputFile(path, rel, rel.split("/", 1)[0], kind[0], kind[1], stat.st_size, stat.st_mtime_ns)
            )
    files.sort(key=lambda f: f.rel)
    return files, skipped, broken


def type_ids_for(data_types: list[str]) -> dict[str, int]:
    """InternLM's fixed ids for en/cn/code, then the next ids for other names in name order."""
    ids = {name: i for name, i in FIXED_TYPE_IDS.items() if name in data_types}
    next_id = max(FIXED_TYPE_IDS.values()) + 1
    for name in sorted(set(data_types) - set(FIXED_TYPE_IDS)):
        ids[name] = next_id
        next_id += 1
    return dict(sorted(ids.items(), key=lambda item: item[1]))


def plan_units(file: InputFile, chunk_bytes: int, whole_file_txt: bool) -> list[WorkUnit]:
    if file.fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            groups = pq.ParquetFile(file.path).num_row_groups
        except Exception as error:  # pyarrow raises several types for a broken footer
            raise InputError(f"{file.path}: not a readable parquet file ({error})") from error
        return [WorkUnit(file, i, i, i + 1) for i in range(max(groups, 1))]
    splittable = file.compression is None and not (file.fmt == "txt" and whole_file_txt)
    if not splittable or file.size <= chunk_bytes:
        return [WorkUnit(file, 0, 0, file.size)]
    bounds = list(range(0, file.size, chunk_bytes)) + [file.size]
    return [WorkUnit(file, i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def assign_to_shard(files: list[InputFile], num_shards: int, shard_index: int) -> list[InputFile]:
    """Deterministic, size-balanced split of the inputs over machines: largest files first, each to
    the least-loaded shard (lowest index on ties). Every machine computes the same assignment."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise InputError(f"--shard-index {shard_index} is outside 0..{num_shards - 1}")
    loads = [0] * num_shards
    mine: list[InputFile] = []
    for file in sorted(files, key=lambda f: (-f.size, f.rel)):
        target = min(range(num_shards), key=lambda s: (loads[s], s))
        loads[target] += max(file.size, 1)
        if target == shard_index:
            mine.append(file)
    return sorted(mine, key=lambda f: f.rel)
