"""Cutting a split's token stream into packed rows, a block of rows at a time, with numpy over the
whole block: no Python loop over tokens, and over documents only the read of each document piece
(``TokenCorpus.gather``).

The split's documents, concatenated in packing order, form one stream of ``tokens`` tokens, padded at
its end to a whole number of rows. Row ``r`` holds stream positions ``[r * P, (r + 1) * P)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pack_stage.plan import SplitPlan
from pack_stage.schema import IGNORE_INDEX, PAD_TYPE_ID, row_schema
from pack_stage.sources import TokenCorpus


@dataclass(frozen=True)
class RowBlock:
    """Consecutive packed rows, flat: ``input_ids`` etc. hold ``rows * packed_length`` values."""

    rows: int
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    type_ids: np.ndarray  # int8
    cu_offsets: np.ndarray  # int32, rows + 1: row r's boundaries are cu_values[off[r]:off[r + 1]]
    cu_values: np.ndarray  # int32

    def to_record_batch(self, schema: pa.Schema) -> pa.RecordBatch:
        packed_length = len(self.input_ids) // self.rows
        return pa.RecordBatch.from_arrays(
            [
                pa.FixedSizeListArray.from_arrays(pa.array(self.input_ids), packed_length),
                pa.FixedSizeListArray.from_arrays(pa.array(self.labels), packed_length),
                pa.FixedSizeListArray.from_arrays(pa.array(self.type_ids), packed_length),
                pa.ListArray.from_arrays(pa.array(self.cu_offsets), pa.array(self.cu_values)),
            ],
            schema=schema,
        )


class RowBuilder:
    """Builds a split's rows in order, block after block (``build`` must be called with
    consecutive row ranges). The arrays of a returned block are reused by the next ``build``:
    write the block out before building the next one."""

    def __init__(
        self,
        corpus: TokenCorpus,
        plan: SplitPlan,
        *,
        seq_len: int,
        micro_bsz: int,
        pack_sample_into_one: bool,
        pad_id: int,
    ) -> None:
        self.corpus = corpus
        self.plan = plan
        self.seq_len = seq_len
        self.micro_bsz = micro_bsz
        self.packed_length = seq_len * micro_bsz
        self.pack_sample_into_one = pack_sample_into_one
        self.pad_id = pad_id
        self.rows = plan.rows(self.packed_length)
        # Signed token shards carry InternLM's SFT convention (negative id = prompt token).
        self.signed = corpus.dtype is not None and corpus.dtype.kind == "i"
        self.schema = row_schema(self.packed_length)
        # Where the walk through the split stands: the document holding the next block's first
        # token, and that document's stream offset.
        self._next_row = 0
        self._doc = 0
        self._doc_begin = 0
        self._window_hint = 64
        self._buffers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def build(self, first_row: int, rows: int) -> RowBlock:
        if first_row != self._next_row:
            raise ValueError(f"rows must be built in order: expected row {self._next_row}, got {first_row}")
        length = self.packed_length
        tokens = self.plan.tokens
        begin = first_row * length
        end = begin + rows * length
        real_end = min(end, tokens)
        # One token past the block, so that the last label can point into the next row.
        fetch_end = min(end + 1, tokens)
        docs, doc_begin, doc_end = self._documents_until(fetch_end)
        piece_begin = np.maximum(doc_begin, begin)

        buffer, labels, type_ids = self._block_buffers(end - begin)
        self.corpus.gather(
            docs, piece_begin - doc_begin, np.minimum(doc_end, fetch_end) - piece_begin, buffer
        )

        n_real = real_end - begin
        input_ids = buffer[: end - begin]
        input_ids[n_real:] = self.pad_id

        n_shifted = fetch_end - begin - 1  # positions whose next stream token is real
        labels[:n_shifted] = buffer[1 : n_shifted + 1]
        labels[n_shifted:] = IGNORE_INDEX
        if self.signed:
            # InternLM's SFT convention (its packed_collate_fn): a negative id is a prompt token,
            # read as abs(id) and never a target; a label <= 0 is no target.
            labels[labels <= 0] = IGNORE_INDEX
            np.abs(input_ids[:n_real], out=input_ids[:n_real])
        last_tokens = doc_end - 1 - begin
        labels[last_tokens[last_tokens < end - begin]] = IGNORE_INDEX

        real_counts = np.maximum(np.minimum(doc_end, real_end) - piece_begin, 0)
        type_ids[:n_real] = np.repeat(self.corpus.doc_type(docs), real_counts)
        type_ids[n_real:] = PAD_TYPE_ID

        if self.pack_sample_into_one:
            cu_offsets, cu_values = self._fixed_cu_seqlens(rows)
        else:
            cu_offsets, cu_values = self._cu_seqlens(begin, end, real_end, doc_begin[1:])
        self._advance(end, docs, doc_begin)
        return RowBlock(rows, input_ids, labels, type_ids, cu_offsets, cu_values)

    def _documents_until(self, fetch_end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The documents from the walk's current one up to the one holding token ``fetch_end - 1``,
        with their stream offsets ``[begin, end)``: lengths are summed for a window of documents,
        widened until it reaches ``fetch_end``."""
        all_docs = self.plan.docs
        count = self._window_hint
        while True:
            docs = all_docs[self._doc : self._doc + count]
            bounds = np.empty(len(docs) + 1, dtype=np.int64)
            bounds[0] = self._doc_begin
            np.cumsum(self.corpus.doc_lengths(docs), out=bounds[1:])
            bounds[1:] += self._doc_begin
            if bounds[-1] >= fetch_end or self._doc + count >= len(all_docs):
                break
            count *= 2
        last = int(np.searchsorted(bounds, fetch_end, side="left"))
        self._window_hint = max(64, 2 * last)
        return docs[:last], bounds[:last], bounds[1 : last + 1]

    def _advance(self, end: int, docs: np.ndarray, doc_begin: np.ndarray) -> None:
        """Moves the walk to the document holding stream token ``end`` (the next block's first)."""
        holding = int(np.searchsorted(doc_begin, end, side="right")) - 1
        self._doc += holding
        self._doc_begin = int(doc_begin[holding])
        self._next_row = end // self.packed_length

    def _block_buffers(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids (with one slot for the look-ahead token), labels and type_ids, reused from
        block to block: fresh multi-MB arrays each block cost page faults and leave the allocator
        holding freed memory."""
        if self._buffers is None or len(self._buffers[1]) < size:
            self._buffers = (
                np.empty(size + 1, dtype=np.int32),
                np.empty(size, dtype=np.int32),
                np.empty(size, dtype=np.int8),
            )
        buffer, labels, type_ids = self._buffers
        return buffer[: size + 1], labels[:size], type_ids[:size]

    def _fixed_cu_seqlens(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """InternLM's PackedDatasetWithoutCuSeqlen: every row is micro_bsz segments of seq_len."""
        per_row = np.arange(0, self.packed_length + 1, self.seq_len, dtype=np.int32)
        offsets = np.arange(rows + 1, dtype=np.int32) * len(per_row)
        return offsets, np.tile(per_row, rows)

    def _cu_seqlens(
        self, begin: int, end: int, real_end: int, doc_starts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """A boundary at every row start, document start and the padding's start (the pieces), and
        then every seq_len tokens inside a piece, so that no segment is longer than seq_len."""
        length = self.packed_length
        rows = (end - begin) // length
        cuts = [np.arange(begin, end, length, dtype=np.int64), doc_starts[doc_starts < real_end]]
        if real_end < end:
            cuts.append(np.array([real_end], dtype=np.int64))
        piece_starts = np.unique(np.concatenate(cuts))
        piece_lengths = np.diff(piece_starts, append=end)

        segments_per_piece = -(-piece_lengths // self.seq_len)
        total = int(segments_per_piece.sum())
        first_segment = np.cumsum(segments_per_piece) - segments_per_piece
        index_in_piece = np.arange(total) - np.repeat(first_segment, segments_per_piece)
        starts = np.repeat(piece_starts - begin, segments_per_piece) + index_in_piece * self.seq_len

        row = starts // length
        per_row = np.bincount(row, minlength=rows)
        # Each row's list is its segment starts followed by packed_length.
        values = np.empty(total + rows, dtype=np.int32)
        values[np.arange(total) + row] = starts - row * length
        values[np.cumsum(per_row) + np.arange(rows)] = length
        offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(per_row + 1, out=offsets[1:])
        return offsets, values
