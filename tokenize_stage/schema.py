"""Public contract of the tokenize stage: the token shard layout and its manifest.

Other services (pack_stage) import only this module. Layout (ARCHITECTURE.md section 2)::

    <out>/manifest.json
    <out>/<type>/<path relative to the type folder>.arrow     one row per document
    <out>/<type>/<path relative to the type folder>.rejects.jsonl   (only when lines were rejected)

Each shard is an Arrow IPC file with the columns ``tokens: list<uint16|uint32>`` (BOS/EOS included)
and ``line: int64`` (the 1-based line of the document in its input; the row for parquet). SFT data
(``--sft``) has ``list<int32>`` tokens where a negative id is a prompt token: the model reads its
absolute value and it is never a target (InternLM's convention).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from tokenize_stage.text_tokenizers import (
    Tokenizer,
    TokenizerError,
    TokenizerIdentity,
    load_tokenizer,
    tokenizer_from_identity,
)

__all__ = [
    "FIXED_TYPE_IDS",
    "FORMAT",
    "MANIFEST_NAME",
    "FileEntry",
    "ManifestError",
    "TokenManifest",
    "Tokenizer",
    "TokenizerError",
    "TokenizerIdentity",
    "open_token_shard",
    "load_tokenizer",
    "token_dtype_for",
    "tokenizer_from_identity",
]

FORMAT = "tokenize_stage/v1"
MANIFEST_NAME = "manifest.json"
# InternLM's own type ids; any other first-level folder name gets the next free id, in name order.
FIXED_TYPE_IDS = {"en": 0, "cn": 1, "code": 2}


class ManifestError(ValueError):
    """A token folder whose manifest is missing, of another format, or inconsistent."""


def token_dtype_for(vocab_size: int, signed: bool = False) -> pa.DataType:
    """uint16 / uint32 by vocabulary size; int32 for SFT data, whose negative ids mark prompt
    tokens (InternLM's convention: the model reads abs(id), and such a position is no target)."""
    if signed:
        return pa.int32()
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


@dataclass(frozen=True)
class FileEntry:
    """One input file and the shard made from it."""

    path: str  # relative to the input folder, e.g. "en/wiki/part-0.jsonl"
    data_type: str
    shard: str  # relative to the output folder
    size: int
    mtime_ns: int
    sha256: str
    documents: int
    tokens: int
    rejected: int
    empty_documents: int
    blank_lines: int

    @classmethod
    def from_json(cls, path: str, data: dict) -> FileEntry:
        return cls(
            path=path,
            data_type=data["type"],
            shard=data["shard"],
            size=data["size"],
            mtime_ns=data["mtime_ns"],
            sha256=data["sha256"],
            documents=data["documents"],
            tokens=data["tokens"],
            rejected=data["rejected"],
            empty_documents=data["empty_documents"],
            blank_lines=data["blank_lines"],
        )

    def to_json(self) -> dict:
        return {
            "type": self.data_type,
            "shard": self.shard,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "sha256": self.sha256,
            "documents": self.documents,
            "tokens": self.tokens,
            "rejected": self.rejected,
            "empty_documents": self.empty_documents,
            "blank_lines": self.blank_lines,
        }


@dataclass(frozen=True)
class TokenManifest:
    """The manifest of a complete token folder. ``files`` is in the canonical document order."""

    folder: Path
    tokenizer: TokenizerIdentity
    token_dtype: str
    types: dict[str, int]
    files: tuple[FileEntry, ...]
    settings: dict

    @property
    def documents(self) -> int:
        return sum(f.documents for f in self.files)

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    @classmethod
    def load(cls, folder: str | Path) -> TokenManifest:
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(
                f"{path} does not exist: {folder} is not a finished tokenize-stage output "
                "(a sharded run needs `tokenize-stage merge` first)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ManifestError(f"{path}: not valid JSON ({error})") from error
        if data.get("format") != FORMAT:
            raise ManifestError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        files = tuple(FileEntry.from_json(p, e) for p, e in sorted(data["files"].items()))
        return cls(
            folder=folder,
            tokenizer=TokenizerIdentity.from_json(data["tokenizer"]),
            token_dtype=data["token_dtype"],
            types=dict(data["types"]),
            files=files,
            settings=dict(data["settings"]),
        )

    def shard_path(self, entry: FileEntry) -> Path:
        return self.folder / entry.shard

    def iter_shards(self) -> Iterator[tuple[FileEntry, pa.Table]]:
        """Memory-mapped shards in document order; files without documents are skipped."""
        for entry in self.files:
            if entry.documents:
                yield entry, open_token_shard(self.shard_path(entry))


def open_token_shard(path: str | Path) -> pa.Table:
    """The shard as a memory-mapped table: no copy, no parse."""
    source = pa.memory_map(str(path), "r")
    return pa.ipc.open_file(source).read_all()
