from __future__ import annotations

import hashlib
from pathlib import Path

from tokenize_stage.runner import StageOptions, StageReport, run_stage
from tokenize_stage.schema import TokenManifest


def tokenize(input_dir: Path, output_dir: Path, **overrides) -> StageReport:
    options = StageOptions(input=input_dir, output=output_dir, show_progress=False, **overrides)
    return run_stage(options)


def documents(folder: Path) -> list[tuple[str, int, list[int]]]:
    """(input path, line, tokens) for every document, in manifest order."""
    manifest = TokenManifest.load(folder)
    found = []
    for entry, table in manifest.iter_shards():
        for tokens, line in zip(table.column("tokens").to_pylist(), table.column("line").to_pylist()):
            found.append((entry.path, line, tokens))
    return found


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under the folder, hidden ones included: byte-identical check."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
