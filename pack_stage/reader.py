"""Reading packed rows: the public module the trainer imports.

    reader = PackedReader(folder, "train", expect_seq_len=2048, expect_micro_bsz=4, expect_vocab_size=103168)
    batch = reader.batch([0, 1]).to_torch()   # input_ids, labels, type_ids, position_ids, cu_seqlens_flat

The parts are memory-mapped; a batch copies its rows out of the mapping (into arrays that torch may
own and pin), nothing is parsed. Position ids restart at 0 at each segment of ``cu_seqlens``.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pack_stage.schema import PackedDataError, PackManifest, SplitInfo, row_schema

if TYPE_CHECKING:
    import torch

__all__ = ["PackManifest", "PackedBatch", "PackedDataError", "PackedReader", "SplitInfo", "TorchPackedBatch"]

# Hand mapped pages back (MADV_DONTNEED) after this many bytes of rows were read, so that a long
# run's resident set does not grow to the size of the dataset.
RELEASE_EVERY_BYTES = 1 << 30


@dataclass(frozen=True)
class TorchPackedBatch:
    input_ids: torch.Tensor  # (B, L) int32
    labels: torch.Tensor  # (B, L) int32; cross entropy wants .long() on the device
    type_ids: torch.Tensor  # (B, L) int8, -1 on padding
    position_ids: torch.Tensor  # (B, L) int32
    cu_seqlens: list[torch.Tensor]  # one int32 tensor per row, 0 .. L
    cu_seqlens_flat: torch.Tensor  # int32, the batch's rows end to end (row r offset by r * L)


@dataclass(frozen=True)
class PackedBatch:
    input_ids: np.ndarray  # (B, L) int32
    labels: np.ndarray  # (B, L) int32, -100 where there is no next token of the same document
    type_ids: np.ndarray  # (B, L) int8, -1 on padding
    position_ids: np.ndarray  # (B, L) int32
    cu_seqlens: list[np.ndarray]  # one int32 array per row

    def cu_seqlens_flat(self) -> np.ndarray:
        """All rows' boundaries as one sequence of B * L tokens (flash-attn varlen's cu_seqlens)."""
        length = self.input_ids.shape[1]
        pieces = [cu[:-1] + r * length for r, cu in enumerate(self.cu_seqlens)]
        pieces.append(np.array([len(self.cu_seqlens) * length], dtype=np.int32))
        return np.concatenate(pieces).astype(np.int32, copy=False)

    def to_torch(self) -> TorchPackedBatch:
        import torch

        return TorchPackedBatch(
            input_ids=torch.from_numpy(self.input_ids),
            labels=torch.from_numpy(self.labels),
            type_ids=torch.from_numpy(self.type_ids),
            position_ids=torch.from_numpy(self.position_ids),
            cu_seqlens=[torch.from_numpy(cu) for cu in self.cu_seqlens],
            cu_seqlens_flat=torch.from_numpy(self.cu_seqlens_flat()),
        )


@dataclass(frozen=True)
class _Chunk:
    """One record batch of a part, as numpy views on the mapping."""

    input_ids: np.ndarray  # (rows, L)
    labels: np.ndarray
    type_ids: np.ndarray
    cu_offsets: np.ndarray  # (rows + 1,)
    cu_values: np.ndarray


class PackedReader:
    def __init__(
        self,
        folder: str | Path,
        split: str = "train",
        *,
        expect_seq_len: int | None = None,
        expect_micro_bsz: int | None = None,
        expect_vocab_size: int | None = None,
    ) -> None:
        self.manifest = PackManifest.load(folder)
        self.split = split
        self.info = self.manifest.split(split)
        _check_expectations(self.manifest, expect_seq_len, expect_micro_bsz, expect_vocab_size)
        self.packed_length = self.manifest.packed_length
        self._maps: list[mmap.mmap] = []
        self._chunks: list[_Chunk] = []
        starts = [0]
        for part in self.info.parts:
            for chunk in self._open_part(Path(folder) / split / part.name, part.rows):
                self._chunks.append(chunk)
                starts.append(starts[-1] + len(chunk.input_ids))
        self._chunk_starts = np.asarray(starts, dtype=np.int64)
        if starts[-1] != self.info.rows:
            raise PackedDataError(
                f"{self.manifest.path}: split {split!r} should have {self.info.rows} rows, "
                f"its parts hold {starts[-1]}"
            )
        self._bytes_since_release = 0

    def __len__(self) -> int:
        return self.info.rows

    def batch(self, rows: Sequence[int]) -> PackedBatch:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(
                f"rows {rows.tolist()} out of range for {len(self)} rows of split {self.split!r}"
            )
        count, length = len(rows), self.packed_length
        input_ids = np.empty((count, length), dtype=np.int32)
        labels = np.empty((count, length), dtype=np.int32)
        type_ids = np.empty((count, length), dtype=np.int8)
        cu_seqlens = []
        chunk_of = np.searchsorted(self._chunk_starts, rows, side="right") - 1
        local = rows - self._chunk_starts[chunk_of]
        for i, (c, r) in enumerate(zip(chunk_of.tolist(), local.tolist())):
            chunk = self._chunks[c]
            input_ids[i] = chunk.input_ids[r]
            labels[i] = chunk.labels[r]
            type_ids[i] = chunk.type_ids[r]
            cu_seqlens.append(np.array(chunk.cu_values[chunk.cu_offsets[r] : chunk.cu_offsets[r + 1]]))
        batch = PackedBatch(input_ids, labels, type_ids, _position_ids(cu_seqlens, length), cu_seqlens)
        self._bytes_since_release += count * length * 9
        if self._bytes_since_release >= RELEASE_EVERY_BYTES:
            self.release_pages()
        return batch

    def release_pages(self) -> None:
        """Drops the parts' mapped pages from this process's resident set (they stay cached)."""
        for mapping in self._maps:
            mapping.madvise(mmap.MADV_DONTNEED)
        self._bytes_since_release = 0

    def close(self) -> None:
        """Unmaps the parts (batches already returned stay valid: they are copies)."""
        self._chunks = []
        for mapping in self._maps:
            try:
                mapping.close()
            except BufferError:  # an Arrow view is still alive somewhere; it goes with it
                pass
        self._maps = []

    def _open_part(self, path: Path, rows: int) -> list[_Chunk]:
        try:
            with open(path, "rb") as handle:
                mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as error:
            raise PackedDataError(
                f"{path}: cannot map the part named in {self.manifest.path} ({error})"
            ) from error
        self._maps.append(mapping)
        try:
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapping)))
        except pa.ArrowInvalid as error:
            raise PackedDataError(f"{path}: not an Arrow IPC file ({error})") from error
        expected = row_schema(self.packed_length)
        if not reader.schema.equals(expected):
            raise PackedDataError(f"{path}: schema {reader.schema} differs from the manifest's {expected}")
        chunks = []
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            if batch.num_rows:
                chunks.append(_chunk_views(batch, self.packed_length))
        if sum(len(c.input_ids) for c in chunks) != rows:
            raise PackedDataError(
                f"{path}: the manifest {self.manifest.path} says {rows} rows, the part differs"
            )
        return chunks


def _check_expectations(
    manifest: PackManifest, seq_len: int | None, micro_bsz: int | None, vocab_size: int | None
) -> None:
    for field, packed, asked in (
        ("seq_len", manifest.seq_len, seq_len),
        ("micro_bsz", manifest.micro_bsz, micro_bsz),
    ):
        if asked is not None and packed != asked:
            raise PackedDataError(
                f"{field}: the shards in {manifest.folder} were packed with {packed}, the config asks for "
                f"{asked} ({manifest.path}); re-pack with --{field.replace('_', '-')} {asked}"
            )
    # A model vocabulary padded beyond the tokenizer's is fine; a smaller one would index out of it.
    if vocab_size is not None and manifest.tokenizer.vocab_size > vocab_size:
        raise PackedDataError(
            f"vocab_size: the shards in {manifest.folder} were made with a tokenizer of "
            f"{manifest.tokenizer.vocab_size} tokens, the config asks for {vocab_size} ({manifest.path})"
        )


def _chunk_views(batch: pa.RecordBatch, length: int) -> _Chunk:
    def matrix(column: pa.FixedSizeListArray) -> np.ndarray:
        values = column.values.to_numpy(zero_copy_only=True)
        return values.reshape(-1, length)[column.offset : column.offset + len(column)]

    cu = batch.column("cu_seqlens")
    return _Chunk(
        input_ids=matrix(batch.column("input_ids")),
        labels=matrix(batch.column("labels")),
        type_ids=matrix(batch.column("type_ids")),
        cu_offsets=cu.offsets.to_numpy(zero_copy_only=True),
        cu_values=cu.values.to_numpy(zero_copy_only=True),
    )


def _position_ids(cu_seqlens: list[np.ndarray], length: int) -> np.ndarray:
    """Position ids restart at 0 at each segment: position = index - start of its segment."""
    if not cu_seqlens:
        return np.empty((0, length), dtype=np.int32)
    starts = np.concatenate([cu[:-1] + r * length for r, cu in enumerate(cu_seqlens)])
    sizes = np.concatenate([np.diff(cu) for cu in cu_seqlens])
    positions = np.arange(len(cu_seqlens) * length, dtype=np.int32) - np.repeat(starts, sizes)
    return positions.reshape(len(cu_seqlens), length)
