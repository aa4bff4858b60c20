"""Joining the shard manifests of a multi-machine run into the manifest of a single-machine run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tokenize_stage.durable import write_json_atomic
from tokenize_stage.schema import MANIFEST_NAME
from tokenize_stage.shards import PARTS_DIR, STATE_DIR, manifest_totals

_SHARD_NAME = re.compile(r"manifest\.shard-(\d+)-of-(\d+)\.json$")
_SHARED_KEYS = ("format", "tokenizer", "token_dtype", "types", "settings")


class MergeError(RuntimeError):
    pass


def _shard_manifests(output: Path) -> tuple[dict[int, tuple[Path, dict]], set[int]]:
    found: dict[int, tuple[Path, dict]] = {}
    counts = set()
    for path in sorted(output.glob("manifest.shard-*-of-*.json")):
        match = _SHARD_NAME.search(path.name)
        if match is None:
            continue
        index, count = int(match.group(1)), int(match.group(2))
        counts.add(count)
        found[index] = (path, json.loads(path.read_text()))
    return found, counts


def _drop_shard_files(output: Path, shard_manifests: list[Path]) -> None:
    # The merged manifest is already in place: from here on every step may be cut short and redone.
    for path in shard_manifests:
        path.unlink(missing_ok=True)
    shutil.rmtree(output / STATE_DIR, ignore_errors=True)
    shutil.rmtree(output / PARTS_DIR, ignore_errors=True)


def _finish_interrupted_merge(output: Path, target: Path, found: dict[int, tuple[Path, dict]]) -> Path:
    """A merge that was stopped after writing manifest.json: the shard manifests it had not yet
    dropped must be parts of that manifest (else they belong to another run, and nothing is touched)."""
    merged = json.loads(target.read_text())
    for path, data in found.values():
        same_run = all(data.get(key) == merged.get(key) for key in _SHARED_KEYS)
        if not same_run or any(merged["files"].get(rel) != entry for rel, entry in data["files"].items()):
            raise MergeError(
                f"{output} holds manifest.json and {path.name}, which is not part of it: "
                "not the same run; move one of them away"
            )
    _drop_shard_files(output, [path for path, _ in found.values()])
    return target


def merge_shard_manifests(output: Path) -> Path:
    """Checks that every shard of the run finished, with the same tokenizer and settings, and that
    together they cover their assigned inputs; then writes manifest.json and drops the shard files.
    Safe to stop at any moment and run again: a rerun finishes what a stopped one left."""
    output = output.resolve()
    target = output / MANIFEST_NAME
    for stale in output.glob(MANIFEST_NAME + ".tmp-*"):  # a merge killed while writing the manifest
        if stale.name.rsplit(".tmp-", 1)[-1].isdigit():
            stale.unlink()
    found, counts = _shard_manifests(output)
    if target.exists():
        return _finish_interrupted_merge(output, target, found)
    if not found:
        raise MergeError(f"no shard manifests (manifest.shard-I-of-N.json) in {output}")
    if len(counts) != 1:
        raise MergeError(
            f"{output} holds shard manifests of runs with different shard counts: {sorted(counts)}"
        )
    count = counts.pop()
    missing = sorted(set(range(count)) - set(found))
    if missing:
        raise MergeError(
            f"shards {missing} of {count} have not finished (no manifest.shard-...-of-{count:05d}.json): "
            "run them, then merge again"
        )
    first_path, first = found[0]
    files: dict[str, dict] = {}
    for index in range(count):
        path, data = found[index]
        for key in _SHARED_KEYS:
            if data.get(key) != first.get(key):
                raise MergeError(f"{path.name} differs from {first_path.name} in {key!r}: not the same run")
        absent = sorted(set(data["shard"]["assigned"]) - set(data["files"]))
        if absent:
            raise MergeError(f"{path.name} lacks {len(absent)} of its assigned inputs, e.g. {absent[0]}")
        overlap = set(files) & set(data["files"])
        if overlap:
            raise MergeError(f"{path.name} repeats inputs of another shard, e.g. {sorted(overlap)[0]}")
        files.update(data["files"])
    manifest = {key: first[key] for key in _SHARED_KEYS}
    manifest["files"] = {rel: files[rel] for rel in sorted(files)}
    manifest["totals"] = manifest_totals(files.values())
    write_json_atomic(target, manifest)
    _drop_shard_files(output, [path for path, _ in found.values()])
    return target
