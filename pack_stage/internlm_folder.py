"""Folders written by InternLM's tools/tokenizer.py (and tools/alpaca_tokenizer.py) as pack input.

Such a folder holds, under one folder per data type, ``*.bin`` files of JSON lines
``{"tokens": [...]}`` and beside each a ``*.bin.meta``: ``np.save`` of an integer array with one
row ``(byte offset, token count)`` per line (int32 from tokenizer.py, int64 from
alpaca_tokenizer.py). A negative token id is InternLM's SFT convention: a prompt token, read by
the model as ``abs(id)`` and never a target (pack_stage.rows applies it).

``convert_internlm_folder`` checks every line against its .meta (a disagreement is an error naming
the file and the line) and writes a tokenize_stage/v1 token folder from it, so that packing is the
very same code for both kinds of input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from pack_stage.durable import durable_replace
from tokenize_stage.schema import FIXED_TYPE_IDS, FORMAT, MANIFEST_NAME, FileEntry, TokenizerIdentity

logger = logging.getLogger(__name__)

BIN_SUFFIX = ".bin"
META_SUFFIX = ".meta"
# Tokenizer kind recorded for data whose tokenizer is not known (InternLM's .bin files do not say).
UNKNOWN_TOKENIZER = "unknown"
# Lines per record batch of a converted shard.
BATCH_LINES = 4096
# InternLM's get_dataset_type_id: a path component "[z_]*en", "[z_]*cn" or "[z_]*code" names the
# type (a leading "z" or "_" sorts newly added data last).
_TYPE_COMPONENT = re.compile(r"^[z_]*(en|cn|code)$")
_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("line", pa.int64())])


class InternLMDataError(ValueError):
    """An InternLM data folder that cannot be read as it is; the message names the file and line."""


@dataclass(frozen=True)
class BinFile:
    path: Path  # absolute
    rel: str  # relative to the folder, "/"-separated
    data_type: str
    size: int
    mtime_ns: int
    meta_size: int
    meta_mtime_ns: int

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + META_SUFFIX)


def is_internlm_folder(folder: Path) -> bool:
    """A folder without a tokenize-stage or pack-stage manifest that holds ``*.bin`` files."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / MANIFEST_NAME).exists():
        return False
    return next(_walk_bins(folder), None) is not None


def _walk_bins(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(BIN_SUFFIX) and not name.startswith("."):
                yield Path(dirpath) / name


def data_type_of(root: Path, rel: str) -> str:
    """InternLM's rule: the one folder on the path named [z_]*en / cn / code gives the type (the
    folder itself counts, as a train_folder of ".../en" does in InternLM); otherwise, where InternLM
    would stop, the first folder under ``root`` (or ``root``'s own name for files directly in it)."""
    folders = [root.name, *rel.split("/")[:-1]]
    found = {m.group(1) for m in map(_TYPE_COMPONENT.match, folders) if m}
    if len(found) > 1:
        raise InternLMDataError(
            f"{root / rel}: the path names several data types ({', '.join(sorted(found))}); "
            "InternLM's rule needs exactly one folder named en, cn or code on the path"
        )
    if found:
        return found.pop()
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else root.name


def type_ids_for(names: list[str]) -> dict[str, int]:
    """InternLM's ids for en / cn / code, then the next ids for other names in name order (the
    same rule as tokenize-stage)."""
    ids = {name: i for name, i in FIXED_TYPE_IDS.items() if name in names}
    extra = sorted(set(names) - set(FIXED_TYPE_IDS))
    ids.update({name: max(FIXED_TYPE_IDS.values()) + 1 + i for i, name in enumerate(extra)})
    return dict(sorted(ids.items(), key=lambda item: item[1]))


def discover_bin_files(root: Path) -> list[BinFile]:
    """Every ``*.bin`` under ``root`` (hidden folders skipped), sorted by relative path; a .bin
    without its .meta is an error."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise InternLMDataError(f"{root} does not exist or is not a folder")
    files = []
    for path in _walk_bins(root):
        rel = path.relative_to(root).as_posix()
        meta = path.with_name(path.name + META_SUFFIX)
        if not meta.is_file():
            raise InternLMDataError(
                f"{path}: no {meta.name} beside it (InternLM's tools/tokenizer.py writes one per .bin)"
            )
        stat, meta_stat = path.stat(), meta.stat()
        files.append(
            BinFile(
                path,
                rel,
                data_type_of(root, rel),
                stat.st_size,
                stat.st_mtime_ns,
                meta_stat.st_size,
                meta_stat.st_mtime_ns,
            )
        )
    if not files:
        raise InternLMDataError(f"{root}: no .bin files (InternLM's <folder>/<type>/*.bin with .bin.meta)")
    return sorted(files, key=lambda f: f.rel)


def fingerprint(files: list[BinFile]) -> list[dict]:
    """What identifies the folder's content cheaply: names, sizes and mtimes of .bin and .meta."""
    return [
        {"rel": f.rel, "size": f.size, "mtime_ns": f.mtime_ns, "meta": [f.meta_size, f.meta_mtime_ns]}
        for f in files
    ]


def read_meta(file: BinFile) -> np.ndarray:
    """The .meta as an int64 array of shape (lines, 2)."""
    try:
        meta = np.load(file.meta_path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InternLMDataError(f"{file.meta_path}: not a numpy .npy array ({error})") from error
    if meta.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if meta.ndim != 2 or meta.shape[1] != 2 or meta.dtype.kind not in "iu":
        raise InternLMDataError(
            f"{file.meta_path}: expected an integer array of (byte offset, token count) rows, "
            f"found shape {meta.shape} dtype {meta.dtype}"
        )
    return meta.astype(np.int64)


def read_checked_lines(file: BinFile) -> Iterator[tuple[int, np.ndarray]]:
    """(1-based line, tokens) of every line of the .bin, each checked against its .meta row."""
    meta = read_meta(file)
    position = 0
    line_number = 0
    with open(file.path, "rb") as handle:
        for line in handle:
            line_number += 1
            where = f"{file.path}:{line_number}"
            if line_number > len(meta):
                raise InternLMDataError(
                    f"{where}: the .bin has more lines than {file.meta_path.name} lists ({len(meta)})"
                )
            offset, count = int(meta[line_number - 1, 0]), int(meta[line_number - 1, 1])
            if offset != position:
                raise InternLMDataError(
                    f"{where}: the line starts at byte {position}, but row {line_number - 1} of "
                    f"{file.meta_path.name} says byte {offset} (.meta and .bin disagree)"
                )
            tokens = _parse_tokens(line, where)
            if len(tokens) != count:
                truncated = "" if line.endswith(b"\n") else " (the last line has no newline: truncated?)"
                raise InternLMDataError(
                    f"{where}: {len(tokens)} tokens, but row {line_number - 1} of {file.meta_path.name} "
                    f"says {count}{truncated}"
                )
            position += len(line)
            yield line_number, tokens
    if line_number < len(meta):
        raise InternLMDataError(
            f"{file.path}:{line_number + 1}: {file.meta_path.name} lists {len(meta)} lines, the .bin ends "
            f"after {line_number} (truncated .bin, or a .meta of another file?)"
        )


def _parse_tokens(line: bytes, where: str) -> np.ndarray:
    if not line.endswith(b"\n"):
        # tools/tokenizer.py ends every line with a newline: without one, the write was cut short.
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise InternLMDataError(f"{where}: truncated line (no newline at the end of the file)") from None
    else:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raise InternLMDataError(f"{where}: not a JSON line ({error})") from None
    tokens = record.get("tokens") if isinstance(record, dict) else None
    if isinstance(tokens, list):
        if not tokens:
            return np.zeros(0, np.int64)
        try:
            array = np.array(tokens)
        except (TypeError, ValueError, OverflowError):
            array = None
        # Floats, bools or ids beyond int64 give another dtype: only JSON integers pass.
        if array is not None and array.dtype.kind == "i" and array.ndim == 1:
            return array.astype(np.int64, copy=False)
    raise InternLMDataError(f'{where}: expected {{"tokens": [integers]}}')


@dataclass(frozen=True)
class ConvertedFolder:
    files: list[BinFile]
    types: dict[str, int]
    documents: int
    tokens: int
    max_abs_id: int
    signed: bool  # some token id is negative: SFT data with masked prompt tokens


def convert_internlm_folder(
    root: Path, output: Path, tokenizer: TokenizerIdentity | None = None
) -> ConvertedFolder:
    """Writes ``output`` as a tokenize_stage/v1 token folder holding the documents of the InternLM
    folder ``root`` (tokens as int32, negative ids kept); the manifest goes last. ``tokenizer`` is
    recorded when known; else the manifest names an unknown tokenizer of max |id| + 1 tokens."""
    root = Path(root).resolve()
    files = discover_bin_files(root)
    types = type_ids_for(sorted({f.data_type for f in files}))
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    entries: dict[str, dict] = {}
    max_abs, signed, documents, tokens = 0, False, 0, 0
    for file in files:
        entry, file_max, file_signed = _convert_file(file, output)
        entries[file.rel] = entry.to_json()
        max_abs, signed = max(max_abs, file_max), signed or file_signed
        documents += entry.documents
        tokens += entry.tokens
    if tokenizer is None:
        tokenizer = TokenizerIdentity(UNKNOWN_TOKENIZER, None, None, max_abs + 1, None, None, 0)
    elif tokenizer.vocab_size <= max_abs:
        raise InternLMDataError(
            f"{root}: token id {max_abs} is beyond the tokenizer's {tokenizer.vocab_size} tokens "
            f"({tokenizer.path}); these files were made with another tokenizer"
        )
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer.to_json(),
        "token_dtype": "int32",
        "types": types,
        "settings": {
            "source": "internlm_bin",
            "source_folder": str(root),
            "source_files": fingerprint(files),
            "signed_tokens": signed,
        },
        "files": entries,
        "totals": {"files": len(files), "documents": documents, "tokens": tokens},
    }
    tmp = output / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    durable_replace(tmp, output / MANIFEST_NAME)
    return ConvertedFolder(files, types, documents, tokens, max_abs, signed)


def _convert_file(file: BinFile, output: Path) -> tuple[FileEntry, int, bool]:
    shard = output / (file.rel + ".arrow")
    shard.parent.mkdir(parents=True, exist_ok=True)
    tmp = shard.with_name(shard.name + ".tmp")
    documents = tokens = empty = max_abs = 0
    signed = False
    digest = hashlib.sha256()
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:
        lines: list[int] = []
        lengths: list[int] = []
        values: list[np.ndarray] = []

        def flush() -> None:
            if not lines:
                return
            offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            flat = np.concatenate(values)
            array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int32)))
            writer.write_batch(pa.record_batch([array, pa.array(lines, pa.int64())], schema=_SCHEMA))
            lines.clear()
            lengths.clear()
            values.clear()

        for line_number, line_tokens in read_checked_lines(file):
            lines.append(line_number)
            lengths.append(len(line_tokens))
            values.append(line_tokens)
            documents += 1
            tokens += len(line_tokens)
            empty += not len(line_tokens)
            if len(line_tokens):
                low, high = int(line_tokens.min()), int(line_tokens.max())
                if high >= 1 << 31 or low <= -(1 << 31):
                    raise InternLMDataError(f"{file.path}:{line_number}: a token id does not fit int32")
                max_abs = max(max_abs, high, -low)
                signed = signed or low < 0
            if len(lines) >= BATCH_LINES:
                flush()
        flush()
    with open(file.path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    durable_replace(tmp, shard)
    entry = FileEntry(
        path=file.rel,
        data_type=file.data_type,
        shard=file.rel + ".arrow",
        size=file.size,
        mtime_ns=file.mtime_ns,
        sha256=digest.hexdigest(),
        documents=documents,
        tokens=tokens,
        rejected=0,
        empty_documents=empty,
        blank_lines=0,
    )
    return entry, max_abs, signed
