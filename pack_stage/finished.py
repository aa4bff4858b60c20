"""Recognising a finished pack that this very run would write again, so that running the same
command once more (after a kill that came between the manifest and the process's exit, say) is a
success with nothing to do rather than a refusal that asks for --overwrite."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pack_stage.schema import (
    DOCUMENTS_NAME,
    MANIFEST_NAME,
    TOKENS_DIR,
    PackedDataError,
    PackManifest,
    part_name,
)

if TYPE_CHECKING:
    from pack_stage.pack import PackConfig


def same_finished_pack(config: PackConfig, token_manifest_sha256: str) -> PackManifest | None:
    """The manifest of ``config.output`` when it holds a whole pack of the same token folder (by the
    sha256 of its manifest) and settings, parts cut as this run would cut them, and nothing else;
    otherwise None. The pack is deterministic, so such a folder is byte for byte what the run
    would write."""
    folder = config.output
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = PackManifest.load(folder)
    except PackedDataError:
        return None
    settings = (
        manifest.seq_len,
        manifest.micro_bsz,
        manifest.pack_sample_into_one,
        manifest.min_length,
        manifest.seed,
        manifest.shuffle,
        manifest.valid_fraction,
        manifest.token_manifest_folder,
        manifest.token_manifest_sha256,
    )
    wanted = (
        config.seq_len,
        config.micro_bsz,
        config.pack_sample_into_one,
        config.min_length,
        config.seed,
        config.shuffle,
        config.valid_fraction,
        str(config.input.resolve()),
        token_manifest_sha256,
    )
    splits = ["train", "valid"] if config.valid_fraction > 0 else ["train"]
    if settings != wanted or sorted(manifest.splits) != sorted(splits):
        return None
    expected = {Path(MANIFEST_NAME), *(Path(split) for split in splits)}
    per_part = config.part_rows()
    for name, split in manifest.splits.items():
        cut = [min(per_part, split.rows - start) for start in range(0, split.rows, per_part)]
        if [(p.name, p.rows) for p in split.parts] != [(part_name(i), rows) for i, rows in enumerate(cut)]:
            return None
        for part in split.parts:
            path = folder / name / part.name
            if not path.is_file() or path.stat().st_size != part.size_bytes:
                return None
        expected |= {Path(name) / p.name for p in split.parts} | {Path(name) / DOCUMENTS_NAME}
    # The token folder converted from InternLM *.bin input is checked by its manifest's sha256 above.
    found = {path.relative_to(folder) for path in folder.rglob("*")}
    found = {path for path in found if path.parts[0] != TOKENS_DIR}
    return manifest if found == expected else None
