"""`pack-stage inspect`: a pack's summary and one packed row decoded back to text, segment by segment,
so that a user sees exactly what the model will see."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from pack_stage.reader import PackedReader
from pack_stage.schema import DOCUMENTS_NAME, IGNORE_INDEX, PackedDataError, PackManifest
from tokenize_stage.schema import (
    ManifestError,
    Tokenizer,
    TokenManifest,
    open_token_shard,
    tokenizer_from_identity,
)

logger = logging.getLogger(__name__)

MASK = "⟨-100⟩"
BAR = "│ "


def summary(manifest: PackManifest) -> str:
    tok = manifest.tokenizer
    lines = [
        (
            f"pack {manifest.folder}: seq_len {manifest.seq_len}, micro_bsz {manifest.micro_bsz}, "
            f"packed_length {manifest.packed_length}, pack_sample_into_one {manifest.pack_sample_into_one}"
        ),
        (
            f"tokenizer: {tok.kind}{' ' + tok.path if tok.path else ''} (vocab {tok.vocab_size}, "
            f"pad {tok.pad_id}, bos {tok.bos_id}, eos {tok.eos_id})"
        ),
        (
            f"source: {manifest.token_manifest_folder} ({len(manifest.input_files)} input files); "
            f"seed {manifest.seed}, shuffle {manifest.shuffle}, valid_fraction {manifest.valid_fraction}"
        ),
    ]
    for name, split in manifest.splits.items():
        lines.append(
            f"{name}: {split.rows} rows, {split.documents} documents, {split.tokens} tokens, "
            f"{split.padding_tokens} padding tokens, {len(split.parts)} parts"
        )
        for type_name, tokens in split.tokens_per_type.items():
            lines.append(f"  {type_name}: {split.documents_per_type[type_name]} documents, {tokens} tokens")
    lines.append(
        f"padding fraction {manifest.padding_fraction:.6f}; dropped {manifest.dropped_documents} documents "
        f"({manifest.dropped_tokens} tokens) as empty or shorter than min_length {manifest.min_length}"
    )
    return "\n".join(lines)


def render_row(folder: Path, split: str, row: int) -> str:
    reader = PackedReader(folder, split)
    manifest = reader.manifest
    if not 0 <= row < len(reader):
        raise PackedDataError(f"row {row} out of range: split {split!r} has {len(reader)} rows")
    batch = reader.batch([row])
    tokens, labels, type_ids = batch.input_ids[0], batch.labels[0], batch.type_ids[0]
    cu = batch.cu_seqlens[0]
    tokenizer = tokenizer_from_identity(manifest.tokenizer)
    sources = _DocumentSources(manifest, folder / split / DOCUMENTS_NAME)
    type_names = {type_id: name for name, type_id in manifest.types.items()}
    length = manifest.packed_length
    row_begin = row * length

    out = [
        (
            f"row {row} of {split} ({len(reader)} rows): stream tokens [{row_begin}, {row_begin + length}), "
            f"{len(cu) - 1} segments"
        ),
        (
            f"legend: ── segment boundary; {MASK} after a token whose label is masked (no next token of "
            "its document); document numbers are positions in the split's packing order"
        ),
    ]
    for index, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        out.append(f"── segment {index}: tokens [{start}, {end}) length {end - start} ──")
        for piece_start, piece_end, doc in sources.pieces(row_begin + start, row_begin + end):
            if doc is None:
                pad = tokenizer.token_piece(manifest.tokenizer.pad_id)
                out.append(f"{BAR}padding: {piece_end - piece_start} x {pad} (labels -100, type_ids -1)")
                continue
            local = slice(piece_start - row_begin, piece_end - row_begin)
            type_name = type_names.get(int(type_ids[local.start]), "?")
            out.append(BAR + sources.describe(doc, piece_start, piece_end, type_name))
            text = _render_text(tokens[local], labels[local], tokenizer)
            out.extend(BAR + "  " + line for line in text.split("\n"))
    return "\n".join(out)


class _DocumentSources:
    """Which document each stream position belongs to, and where that document came from."""

    def __init__(self, manifest: PackManifest, documents_path: Path) -> None:
        with pa.memory_map(str(documents_path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
        self.file = table.column("file").to_numpy()
        self.row = table.column("row").to_numpy()
        self.cum = np.concatenate(([0], np.cumsum(table.column("tokens").to_numpy())))
        self.manifest = manifest
        try:
            self.token_manifest: TokenManifest | None = TokenManifest.load(manifest.token_manifest_folder)
        except ManifestError as error:
            logger.warning("source lines unavailable: %s", error)
            self.token_manifest = None
        self._lines: dict[int, pa.ChunkedArray] = {}

    def pieces(self, begin: int, end: int) -> list[tuple[int, int, int | None]]:
        """(start, end, document or None for padding) of the stream range [begin, end)."""
        result = []
        doc = int(np.searchsorted(self.cum, begin, side="right")) - 1
        position = begin
        while position < end:
            if doc >= len(self.file):
                result.append((position, end, None))
                break
            stop = min(end, int(self.cum[doc + 1]))
            result.append((position, stop, doc))
            position = stop
            doc += 1
        return result

    def describe(self, doc: int, begin: int, end: int, type_name: str) -> str:
        file = int(self.file[doc])
        path = self.manifest.input_files[file]
        line = self._line(file, int(self.row[doc]))
        first, total = int(self.cum[doc]), int(self.cum[doc + 1] - self.cum[doc])
        notes = []
        if begin > first:
            notes.append("continued from the previous segment/row")
        if end < first + total:
            notes.append("continues in the next segment/row")
        return (
            f"document #{doc}: {path}:{line} (type {type_name}), its tokens [{begin - first}, {end - first}) "
            f"of {total}" + (f"; {', '.join(notes)}" if notes else "")
        )

    def _line(self, file: int, row: int) -> str:
        if self.token_manifest is None:
            return "?"
        try:
            if file not in self._lines:
                entry = self.token_manifest.files[file]
                self._lines[file] = open_token_shard(self.token_manifest.shard_path(entry)).column("line")
            return str(self._lines[file][row].as_py())
        except (OSError, IndexError, KeyError, pa.ArrowException) as error:
            logger.warning("line of %s row %d unavailable: %s", self.manifest.input_files[file], row, error)
            return "?"


def _render_text(tokens: np.ndarray, labels: np.ndarray, tokenizer: Tokenizer) -> str:
    """Decoded text; special tokens spelled out, and MASK after every token whose label is -100."""
    identity = tokenizer.identity
    special = np.array([t for t in (identity.bos_id, identity.eos_id, identity.pad_id) if t is not None])
    is_special = np.isin(tokens, special)
    marks = np.flatnonzero(is_special | (labels == IGNORE_INDEX)).tolist()
    parts, start = [], 0
    for i in marks:
        if is_special[i]:
            parts.append(tokenizer.decode(tokens[start:i].tolist()))
            parts.append(tokenizer.token_piece(int(tokens[i])))
        else:
            parts.append(tokenizer.decode(tokens[start : i + 1].tolist()))
        if labels[i] == IGNORE_INDEX:
            parts.append(MASK)
        start = i + 1
    parts.append(tokenizer.decode(tokens[start:].tolist()))
    return "".join(parts)
