"""An independent, plain-Python statement of the packing rules, and readers of the raw output files
(pyarrow only, not pack_stage.reader), to check packs against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa

from tests.pack_stage.pack_fixtures import TokenFolder


@dataclass
class RawSplit:
    input_ids: np.ndarray  # (rows, P)
    labels: np.ndarray
    type_ids: np.ndarray
    cu_seqlens: list[list[int]]
    documents: list[tuple[int, int, int]]  # (file, row, tokens) in packing order


def read_raw_split(out: Path, split: str) -> RawSplit:
    manifest = json.loads((out / "manifest.json").read_text())
    length = manifest["packed_length"]
    tables = []
    for part in manifest["splits"][split]["parts"]:
        with pa.memory_map(str(out / split / part["name"])) as source:
            tables.append(pa.ipc.open_file(source).read_all())

    def matrix(name: str, dtype) -> np.ndarray:
        if not tables:
            return np.empty((0, length), dtype=dtype)
        return np.concatenate(
            [t.column(name).combine_chunks().flatten().to_numpy().reshape(-1, length) for t in tables]
        ).astype(dtype)

    cu = [row for t in tables for row in t.column("cu_seqlens").to_pylist()]
    with pa.memory_map(str(out / split / "documents.arrow")) as source:
        docs = pa.ipc.open_file(source).read_all().to_pylist()
    return RawSplit(
        matrix("input_ids", np.int32),
        matrix("labels", np.int32),
        matrix("type_ids", np.int8),
        cu,
        [(d["file"], d["row"], d["tokens"]) for d in docs],
    )


def expected_rows(
    docs: list[np.ndarray], types: list[int], *, seq_len: int, micro_bsz: int, into_one: bool, pad_id: int = 0
) -> dict:
    """The rules, written out token by token."""
    length = seq_len * micro_bsz
    ids, labels, type_ids, doc_starts = [], [], [], set()
    for tokens, type_id in zip(docs, types):
        doc_starts.add(len(ids))
        ids += tokens.tolist()
        labels += tokens[1:].tolist() + [-100]
        type_ids += [type_id] * len(tokens)
    real = len(ids)
    rows = -(-real // length)
    padding = rows * length - real
    ids += [pad_id] * padding
    labels += [-100] * padding
    type_ids += [-1] * padding
    cu_seqlens = []
    for r in range(rows):
        if into_one:
            cu_seqlens.append(list(range(0, length + 1, seq_len)))
            continue
        begin = r * length
        cuts = [p for p in range(begin, begin + length) if p == begin or p in doc_starts or p == real]
        bounds = []
        for start, end in zip(cuts, cuts[1:] + [begin + length]):
            bounds += [p - begin for p in range(start, end, seq_len)]
        cu_seqlens.append(bounds + [length])
    shape = (rows, length)
    return {
        "input_ids": np.array(ids, dtype=np.int32).reshape(shape),
        "labels": np.array(labels, dtype=np.int32).reshape(shape),
        "type_ids": np.array(type_ids, dtype=np.int8).reshape(shape),
        "cu_seqlens": cu_seqlens,
        "padding": padding,
    }


def check_split(out: Path, folder: TokenFolder, split: str) -> RawSplit:
    """Every rule of the packed format, for one split of a pack of ``folder``."""
    manifest = json.loads((out / "manifest.json").read_text())
    seq_len, micro_bsz = manifest["seq_len"], manifest["micro_bsz"]
    raw = read_raw_split(out, split)
    index = {(f, r): i for i, (f, r) in enumerate(zip(folder.doc_file, folder.doc_row))}
    order = [index[(f, r)] for f, r, _ in raw.documents]
    docs = [folder.documents[i] for i in order]
    assert [len(d) for d in docs] == [n for _, _, n in raw.documents]
    assert all(len(d) >= max(manifest["min_length"], 1) for d in docs)
    expected = expected_rows(
        docs,
        [folder.doc_type(i) for i in order],
        seq_len=seq_len,
        micro_bsz=micro_bsz,
        into_one=manifest["pack_sample_into_one"],
        pad_id=manifest["tokenizer"]["pad_id"],
    )
    np.testing.assert_array_equal(raw.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(raw.labels, expected["labels"])
    np.testing.assert_array_equal(raw.type_ids, expected["type_ids"])
    assert raw.cu_seqlens == expected["cu_seqlens"]
    for cu in raw.cu_seqlens:
        assert cu[0] == 0 and cu[-1] == seq_len * micro_bsz
        assert all(0 < b - a <= seq_len for a, b in pairwise(cu))

    info = manifest["splits"][split]
    assert info["rows"] == len(raw.input_ids) == sum(p["rows"] for p in info["parts"])
    assert info["documents"] == len(docs)
    assert info["tokens"] == sum(len(d) for d in docs)
    assert info["padding_tokens"] == expected["padding"]
    names = {v: k for k, v in folder.types.items()}
    for type_id, name in names.items():
        of_type = [d for i, d in zip(order, docs) if folder.doc_type(i) == type_id]
        assert info["tokens_per_type"][name] == sum(len(d) for d in of_type)
        assert info["documents_per_type"][name] == len(of_type)
    for part in info["parts"]:
        assert (out / split / part["name"]).stat().st_size == part["size_bytes"]
    return raw


def document_order(out: Path, folder: TokenFolder, split: str) -> list[int]:
    """The split's documents as global indices into ``folder.documents``, in packing order."""
    index = {(f, r): i for i, (f, r) in enumerate(zip(folder.doc_file, folder.doc_row))}
    return [index[(f, r)] for f, r, _ in read_raw_split(out, split).documents]
