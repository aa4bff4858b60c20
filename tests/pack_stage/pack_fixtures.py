"""Token folders in tokenize_stage/v1 format, built directly with pyarrow + json (byte tokenizer).

A module of its own (conftest.py holds only the fixtures) so that any test can build one directly."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokenize_stage.text_tokenizers import ByteTokenizer

BYTE_TOKENIZER = ByteTokenizer().identity.to_json()
FIXED_TYPES = {"en": 0, "cn": 1, "code": 2}

# A document: an int (that many random byte tokens), a str (its UTF-8 bytes between BOS and EOS) or
# explicit token ids.
Doc = int | str | Sequence[int]


@dataclass(frozen=True)
class TokenFolder:
    path: Path
    keys: list[str]  # manifest file keys, sorted: the document order
    documents: list[np.ndarray]  # every document (empty ones included) in global order
    doc_file: list[int]  # index into keys of each document
    doc_row: list[int]  # row in its shard
    types: dict[str, int]

    def doc_type(self, doc: int) -> int:
        return self.types[self.keys[self.doc_file[doc]].split("/")[0]]


def _tokens(doc: Doc, rng: np.random.Generator) -> np.ndarray:
    if isinstance(doc, int):
        return rng.integers(3, 259, size=doc).astype(np.int64)
    if isinstance(doc, str):
        return np.concatenate(([1], np.frombuffer(doc.encode(), dtype=np.uint8).astype(np.int64) + 3, [2]))
    return np.asarray(doc, dtype=np.int64)


def write_token_folder(
    folder: Path,
    files: dict[str, list[Doc]],
    *,
    token_dtype: str = "uint16",
    batch_rows: int | None = None,
    seed: int = 0,
) -> TokenFolder:
    """``files`` maps "<type>/<rel path>" to its documents; ``batch_rows`` splits shards into
    several record batches."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(files)
    extra = sorted({k.split("/")[0] for k in keys} - FIXED_TYPES.keys())
    types = {**FIXED_TYPES, **{name: len(FIXED_TYPES) + i for i, name in enumerate(extra)}}
    value_type = pa.uint16() if token_dtype == "uint16" else pa.uint32()
    schema = pa.schema([("tokens", pa.list_(value_type)), ("line", pa.int64())])
    entries, documents, doc_file, doc_row = {}, [], [], []
    for index, key in enumerate(keys):
        docs = [_tokens(d, rng) for d in files[key]]
        shard = key + ".arrow"
        (folder / shard).parent.mkdir(parents=True, exist_ok=True)
        lines = np.arange(1, len(docs) + 1, dtype=np.int64) * 2  # every other line, to see lines != rows
        with pa.OSFile(str(folder / shard), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            step = batch_rows or max(len(docs), 1)
            for start in range(0, len(docs), step):
                chunk = docs[start : start + step]
                writer.write_batch(
                    pa.record_batch(
                        [
                            pa.array([d.tolist() for d in chunk], pa.list_(value_type)),
                            pa.array(lines[start : start + step]),
                        ],
                        schema=schema,
                    )
                )
        entries[key] = {
            "type": key.split("/")[0],
            "shard": shard,
            "size": 1000 + index,
            "mtime_ns": 0,
            "sha256": "0" * 64,
            "documents": len(docs),
            "tokens": int(sum(len(d) for d in docs)),
            "rejected": 0,
            "empty_documents": sum(len(d) == 0 for d in docs),
            "blank_lines": 0,
        }
        documents += docs
        doc_file += [index] * len(docs)
        doc_row += list(range(len(docs)))
    manifest = {
        "format": "tokenize_stage/v1",
        "tokenizer": dict(BYTE_TOKENIZER),
        "token_dtype": token_dtype,
        "types": types,
        "settings": {"fixture": True},
        "files": entries,
        "totals": {
            "files": len(keys),
            "documents": len(documents),
            "tokens": int(sum(len(d) for d in documents)),
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return TokenFolder(folder, keys, documents, doc_file, doc_row, types)


def mixed_corpus() -> dict[str, list[Doc]]:
    """Several types and files, empty documents, a file without documents, documents longer than a
    whole packed row (rows of 32..64 tokens in the tests), and real text."""
    rng = np.random.default_rng(7)
    return {
        "en/a.jsonl": ["hello world", 0, 17, 3, "the quick brown fox", 1, 9, 130]
        + rng.integers(0, 40, 30).tolist(),
        "en/empty.jsonl": [],
        "cn/b.txt": ["你好，世界", 64, 0, 0, 2] + rng.integers(1, 25, 20).tolist(),
        "code/c.jsonl": ["def f(x):\n    return x + 1\n", 200, 5] + rng.integers(0, 70, 15).tolist(),
        "wiki/d.jsonl": rng.integers(0, 30, 12).tolist(),
    }
