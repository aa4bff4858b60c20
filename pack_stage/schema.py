"""Public contract of the pack stage: the packed shard layout and its manifest.

Layout (ARCHITECTURE.md section 3)::

    <out>/manifest.json                    written last: its presence means the pack is complete
    <out>/<split>/part-NNNNN.arrow         one row per packed row of packed_length tokens
    <out>/<split>/documents.arrow          the split's documents in packing order
    <out>/tokens/                          only for InternLM *.bin input: the token folder made from it

Part columns: ``input_ids``, ``labels`` (fixed_size_list<int32>[packed_length]), ``type_ids``
(fixed_size_list<int8>[packed_length], -1 on padding) and ``cu_seqlens`` (list<int32>, 0 ..
packed_length). ``documents.arrow`` columns: ``file`` (index into ``input_files``), ``row`` (row in
that file's token shard) and ``tokens`` (document length).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from tokenize_stage.schema import TokenizerIdentity

__all__ = [
    "DOCUMENTS_NAME",
    "DOCUMENTS_SCHEMA",
    "FORMAT",
    "IGNORE_INDEX",
    "MANIFEST_NAME",
    "PAD_TYPE_ID",
    "SPLITS",
    "TOKENS_DIR",
    "PackManifest",
    "PackedDataError",
    "PartInfo",
    "SplitInfo",
    "part_name",
    "row_schema",
]

FORMAT = "pack_stage/v1"
MANIFEST_NAME = "manifest.json"
DOCUMENTS_NAME = "documents.arrow"
SPLITS = ("train", "valid")
# A pack made from a folder of InternLM's *.bin files keeps the token folder converted from it here.
TOKENS_DIR = "tokens"
# The label value torch's cross entropy ignores by default (and InternLM uses).
IGNORE_INDEX = -100
PAD_TYPE_ID = -1

DOCUMENTS_SCHEMA = pa.schema([("file", pa.int32()), ("row", pa.int64()), ("tokens", pa.int64())])


class PackedDataError(ValueError):
    """A packed folder that is missing, of another format, or disagrees with what the caller expects."""


def part_name(index: int) -> str:
    return f"part-{index:05d}.arrow"


def row_schema(packed_length: int) -> pa.Schema:
    return pa.schema(
        [
            ("input_ids", pa.list_(pa.int32(), packed_length)),
            ("labels", pa.list_(pa.int32(), packed_length)),
            ("type_ids", pa.list_(pa.int8(), packed_length)),
            ("cu_seqlens", pa.list_(pa.int32())),
        ]
    )


@dataclass(frozen=True)
class PartInfo:
    name: str
    rows: int
    size_bytes: int

    def to_json(self) -> dict:
        return {"name": self.name, "rows": self.rows, "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class SplitInfo:
    """Counts of one split. ``tokens`` are real tokens; padding is counted apart."""

    rows: int
    documents: int
    tokens: int
    padding_tokens: int
    tokens_per_type: Mapping[str, int]
    documents_per_type: Mapping[str, int]
    parts: tuple[PartInfo, ...]

    def to_json(self) -> dict:
        return {
            "rows": self.rows,
            "documents": self.documents,
            "tokens": self.tokens,
            "padding_tokens": self.padding_tokens,
            "tokens_per_type": dict(self.tokens_per_type),
            "documents_per_type": dict(self.documents_per_type),
            "parts": [p.to_json() for p in self.parts],
        }

    @classmethod
    def from_json(cls, data: dict) -> SplitInfo:
        return cls(
            rows=data["rows"],
            documents=data["documents"],
            tokens=data["tokens"],
            padding_tokens=data["padding_tokens"],
            tokens_per_type=dict(data["tokens_per_type"]),
            documents_per_type=dict(data["documents_per_type"]),
            parts=tuple(PartInfo(**p) for p in data["parts"]),
        )


@dataclass(frozen=True)
class PackManifest:
    """The manifest of a complete pack output folder."""

    folder: Path
    seq_len: int
    micro_bsz: int
    packed_length: int
    pack_sample_into_one: bool
    min_length: int
    seed: int
    shuffle: bool
    valid_fraction: float
    tokenizer: TokenizerIdentity
    token_manifest_folder: str
    token_manifest_sha256: str
    types: Mapping[str, int]
    input_files: tuple[str, ...]
    splits: Mapping[str, SplitInfo]
    dropped_documents: int
    dropped_tokens: int
    padding_fraction: float

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_NAME

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise PackedDataError(
                f"{self.path}: no split {name!r} (this pack has {', '.join(self.splits) or 'none'})"
            )
        return self.splits[name]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "seq_len": self.seq_len,
            "micro_bsz": self.micro_bsz,
            "packed_length": self.packed_length,
            "pack_sample_into_one": self.pack_sample_into_one,
            "min_length": self.min_length,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "valid_fraction": self.valid_fraction,
            "tokenizer": self.tokenizer.to_json(),
            "token_manifest": {"folder": self.token_manifest_folder, "sha256": self.token_manifest_sha256},
            "types": dict(self.types),
            "input_files": list(self.input_files),
            "splits": {name: info.to_json() for name, info in self.splits.items()},
            "dropped": {"documents": self.dropped_documents, "tokens": self.dropped_tokens},
            "padding_fraction": self.padding_fraction,
        }

    @classmethod
    def load(cls, folder: str | Path) -> PackManifest:
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise PackedDataError(
                f"{path} does not exist: {folder} is not a finished pack-stage output nor a folder of "
                "InternLM *.bin files (run `pack-stage run --input <token folder> --output "
                f"{folder}` first)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise PackedDataError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise PackedDataError(f"{path}: format {found!r}, expected {FORMAT!r}")
        try:
            return cls(
                folder=folder,
                seq_len=data["seq_len"],
                micro_bsz=data["micro_bsz"],
                packed_length=data["packed_length"],
                pack_sample_into_one=data["pack_sample_into_one"],
                min_length=data["min_length"],
                seed=data["seed"],
                shuffle=data["shuffle"],
                valid_fraction=data["valid_fraction"],
                tokenizer=TokenizerIdentity.from_json(data["tokenizer"]),
                token_manifest_folder=data["token_manifest"]["folder"],
                token_manifest_sha256=data["token_manifest"]["sha256"],
                types=dict(data["types"]),
                input_files=tuple(data["input_files"]),
                splits={name: SplitInfo.from_json(s) for name, s in data["splits"].items()},
                dropped_documents=data["dropped"]["documents"],
                dropped_tokens=data["dropped"]["tokens"],
                padding_fraction=data["padding_fraction"],
            )
        except (KeyError, TypeError) as error:
            raise PackedDataError(f"{path}: missing or malformed field {error}") from error
