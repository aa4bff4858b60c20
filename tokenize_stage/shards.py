"""Turning the finished parts of one input file into its shard, its reject list and its entry.

The output folder holds, while a run is under way, two hidden folders: ``.parts/`` (one Arrow
part and one stats file per finished work unit) and ``.state/`` (one record per finished input
file). ``manifest.json`` is written only when every input is finished, so its presence means the
folder is complete; both hidden folders are removed then.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tokenize_stage.durable import durable_replace, write_json_atomic
from tokenize_stage.schema import FileEntry
from tokenize_stage.sources import InputFile, WorkUnit
from tokenize_stage.text_tokenizers import file_sha256
from tokenize_stage.worker import MAX_REJECT_DETAILS, UnitStats, part_paths

PARTS_DIR = ".parts"
STATE_DIR = ".state"


def rejects_rel(file: InputFile) -> str:
    return file.rel + ".rejects.jsonl"


def state_path(output: Path, file: InputFile) -> Path:
    return output / STATE_DIR / (file.rel + ".done.json")


def prepare_parts(output: Path, file: InputFile, chunk_bytes: int) -> None:
    """Drops the parts of a file that changed since they were made (size, mtime or chunking)."""
    folder = output / PARTS_DIR / file.rel
    stamp = folder / "input.json"
    expected = {"size": file.size, "mtime_ns": file.mtime_ns, "chunk_bytes": chunk_bytes}
    if stamp.is_file() and json.loads(stamp.read_text()) == expected:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, expected)


def finished_unit(output: Path, unit: WorkUnit) -> UnitStats | None:
    """The stats of a unit a previous run finished, or None."""
    _, stats_path = part_paths(output / PARTS_DIR, unit)
    if not stats_path.is_file():
        return None
    data = json.loads(stats_path.read_text())
    if data.pop("unit") != [unit.start, unit.end]:
        return None
    return UnitStats.from_json(data)


def finalize_file(output: Path, file: InputFile, units: list[WorkUnit], stats: list[UnitStats]) -> FileEntry:
    """Joins the file's parts in unit order into ``<out>/<rel>.arrow`` (line numbers made global),
    writes its rejects, and records it as done. Safe to repeat after a crash at any point."""
    parts_dir = output / PARTS_DIR
    shard = output / file.shard_rel
    shard.parent.mkdir(parents=True, exist_ok=True)
    line_offsets = [0]
    for unit_stats in stats[:-1]:
        line_offsets.append(line_offsets[-1] + unit_stats.lines)
    part_files = [part_paths(parts_dir, unit)[0] for unit in units]
    if len(part_files) == 1:
        _place_single_part(part_files[0], shard)
    else:
        _concatenate_parts(part_files, line_offsets, shard)
    rejected = sum(s.rejected for s in stats)
    rejects_file = output / rejects_rel(file)
    if rejected:
        _write_rejects(rejects_file, file, stats, line_offsets)
    else:
        rejects_file.unlink(missing_ok=True)
    entry = FileEntry(
        path=file.rel,
        data_type=file.data_type,
        shard=file.shard_rel,
        size=file.size,
        mtime_ns=file.mtime_ns,
        sha256=file_sha256(file.path),
        documents=sum(s.documents for s in stats),
        tokens=sum(s.tokens for s in stats),
        rejected=rejected,
        empty_documents=sum(s.empty_documents for s in stats),
        blank_lines=sum(s.blank_lines for s in stats),
    )
    record = state_path(output, file)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, entry.to_json())
    shutil.rmtree(parts_dir / file.rel, ignore_errors=True)
    return entry


def _place_single_part(part: Path, shard: Path) -> None:
    """The shard of a one-part file is its part, hard-linked under the shard's name. Not moved:
    the part (with its stats) must stay until the file's record is written, or a run stopped in
    between finds stats without their part and cannot finish the file again."""
    if shard.exists() and os.path.samefile(part, shard):
        # Placed by a run stopped before the record. (Renaming another link of the same file onto
        # it would do nothing, by POSIX, and leave the temporary name behind.)
        return
    tmp = shard.with_name(shard.name + f".tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(part, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(part, tmp)
    durable_replace(tmp, shard)


def _concatenate_parts(part_files: list[Path], line_offsets: list[int], shard: Path) -> None:
    tmp = shard.with_name(shard.name + f".tmp-{os.getpid()}")
    writer = None
    with pa.OSFile(str(tmp), "wb") as sink:
        for part, offset in zip(part_files, line_offsets):
            # Plain reads, not a memory map: mapped pages of a whole part would count in this
            # process's resident set; reading batch by batch keeps it at one batch.
            with pa.OSFile(str(part), "rb") as source:
                reader = pa.ipc.open_file(source)
                if writer is None:
                    writer = pa.ipc.new_file(sink, reader.schema)
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    lines = pc.add(batch.column(1), pa.scalar(offset, pa.int64()))
                    writer.write_batch(pa.record_batch([batch.column(0), lines], schema=batch.schema))
        if writer is not None:
            writer.close()
    durable_replace(tmp, shard)


def _write_rejects(path: Path, file: InputFile, stats: list[UnitStats], line_offsets: list[int]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        for unit_stats, offset in zip(stats, line_offsets):
            handle.writelines(
                json.dumps({"file": file.rel, "line": offset + line, "reason": reason}) + "\n"
                for line, reason in unit_stats.rejects
            )
            hidden = unit_stats.rejected - len(unit_stats.rejects)
            if hidden > 0:
                handle.write(
                    json.dumps(
                        {
                            "file": file.rel,
                            "line": None,
                            "reason": f"{hidden} more rejected lines in this part "
                            f"(details are kept for the first {MAX_REJECT_DETAILS})",
                        }
                    )
                    + "\n"
                )
    durable_replace(tmp, path)


def manifest_totals(entries: Iterable[dict]) -> dict:
    """The manifest's "totals" from its per-file entries (JSON form)."""
    entries = list(entries)
    totals = {"files": len(entries)}
    for key in ("documents", "tokens", "rejected", "empty_documents", "blank_lines"):
        totals[key] = sum(e[key] for e in entries)
    totals["input_bytes"] = sum(e["size"] for e in entries)
    return totals


def lines_before_unit(unit: WorkUnit) -> int:
    """Input lines (or parquet rows) that precede the unit: turns a unit-local line into file:line."""
    if unit.start == 0:
        return 0
    if unit.file.fmt == "parquet":
        import pyarrow.parquet as pq

        metadata = pq.ParquetFile(unit.file.path).metadata
        return sum(metadata.row_group(i).num_rows for i in range(unit.start))
    count = 0
    remaining = unit.start - 1
    with open(unit.file.path, "rb") as handle:
        while remaining > 0:
            block = handle.read(min(remaining, 8 << 20))
            count += block.count(b"\n")
            remaining -= len(block)
        # The line holding byte start-1 ends before the unit's first line.
        return count + 1
