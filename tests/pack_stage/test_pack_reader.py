"""PackedReader: what the trainer gets from a pack, and what it refuses."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import torch

import pack_stage.pack as pack_module
from pack_stage.pack import PackConfig, pack
from pack_stage.reader import PackedReader
from pack_stage.schema import PackedDataError, PackManifest
from tests.pack_stage.pack_checks import read_raw_split


@pytest.fixture
def packed(token_folder, tmp_path, monkeypatch):
    # Small blocks and parts: the reader must find rows across record batches and part files.
    monkeypatch.setattr(pack_module, "BLOCK_TOKENS", 2 * 32)
    out = tmp_path / "out"
    pack(PackConfig(token_folder.path, out, 8, 4, valid_fraction=0.2, rows_per_part=5), progress=False)
    return out


def reference_positions(cu_seqlens: list[int], length: int) -> list[int]:
    positions = []
    for start, end in pairwise(cu_seqlens):
        positions += list(range(end - start))
    assert len(positions) == length
    return positions


def test_batch_matches_the_stored_rows(packed):
    for split in ("train", "valid"):
        reader = PackedReader(packed, split)
        raw = read_raw_split(packed, split)
        assert len(reader) == len(raw.input_ids) == reader.manifest.splits[split].rows
        rows = list(range(len(reader)))[::-1]  # any order, across parts
        batch = reader.batch(rows)
        assert batch.input_ids.shape == batch.labels.shape == batch.type_ids.shape == (len(rows), 32)
        assert batch.position_ids.shape == (len(rows), 32)
        assert (batch.input_ids.dtype, batch.labels.dtype) == (np.int32, np.int32)
        assert (batch.type_ids.dtype, batch.position_ids.dtype) == (np.int8, np.int32)
        np.testing.assert_array_equal(batch.input_ids, raw.input_ids[rows])
        np.testing.assert_array_equal(batch.labels, raw.labels[rows])
        np.testing.assert_array_equal(batch.type_ids, raw.type_ids[rows])
        for i, row in enumerate(rows):
            assert batch.cu_seqlens[i].dtype == np.int32
            assert batch.cu_seqlens[i].tolist() == raw.cu_seqlens[row]
            assert batch.position_ids[i].tolist() == reference_positions(raw.cu_seqlens[row], 32)


def test_manifest_is_a_frozen_dataclass(packed):
    manifest = PackedReader(packed).manifest
    assert isinstance(manifest, PackManifest)
    assert (manifest.seq_len, manifest.micro_bsz, manifest.packed_length) == (8, 4, 32)
    assert manifest.tokenizer.vocab_size == 259 and manifest.tokenizer.pad_id == 0
    with pytest.raises(AttributeError):
        manifest.seq_len = 16


def test_to_torch_and_cu_seqlens_flat(packed):
    reader = PackedReader(packed)
    batch = reader.batch([2, 0, 1])
    tensors = batch.to_torch()
    assert tensors.input_ids.dtype == torch.int32 and tensors.input_ids.shape == (3, 32)
    assert tensors.labels.dtype == torch.int32 and tensors.type_ids.dtype == torch.int8
    assert tensors.position_ids.dtype == torch.int32
    assert torch.equal(tensors.input_ids, torch.from_numpy(batch.input_ids))
    assert [c.tolist() for c in tensors.cu_seqlens] == [c.tolist() for c in batch.cu_seqlens]
    flat = tensors.cu_seqlens_flat
    assert flat.dtype == torch.int32
    expected = []
    for r, cu in enumerate(batch.cu_seqlens):
        expected += [int(b) + r * 32 for b in cu[:-1]]
    assert flat.tolist() == expected + [3 * 32]
    # Positions restart at every boundary of the flat sequence.
    positions = tensors.position_ids.reshape(-1)
    assert positions[flat[:-1].long()].eq(0).all()


def test_pack_sample_into_one_rows_have_fixed_segments(token_folder, tmp_path):
    out = tmp_path / "out"
    pack(PackConfig(token_folder.path, out, 8, 4, pack_sample_into_one=True), progress=False)
    batch = PackedReader(out).batch([0, 1])
    assert all(cu.tolist() == [0, 8, 16, 24, 32] for cu in batch.cu_seqlens)
    np.testing.assert_array_equal(batch.position_ids, np.tile(np.arange(8, dtype=np.int32), (2, 4)))


@pytest.mark.parametrize(
    "kwargs, field, packed_value, asked",
    [
        ({"expect_seq_len": 16}, "seq_len", 8, 16),
        ({"expect_micro_bsz": 2}, "micro_bsz", 4, 2),
        ({"expect_vocab_size": 100}, "vocab_size", 259, 100),
    ],
)
def test_mismatched_expectations_name_field_values_and_manifest(packed, kwargs, field, packed_value, asked):
    with pytest.raises(PackedDataError) as error:
        PackedReader(packed, **kwargs)
    message = str(error.value)
    assert message.startswith(f"{field}: ")
    assert str(packed_value) in message and str(asked) in message
    assert str(packed / "manifest.json") in message


def test_matching_expectations_are_accepted(packed):
    # A model vocabulary padded beyond the tokenizer's is fine.
    reader = PackedReader(packed, expect_seq_len=8, expect_micro_bsz=4, expect_vocab_size=259)
    assert len(PackedReader(packed, expect_vocab_size=512)) == len(reader)


def test_missing_or_foreign_manifest_and_split(packed, tmp_path):
    with pytest.raises(PackedDataError, match="does not exist.*not a finished pack-stage output"):
        PackedReader(tmp_path / "nowhere")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "tokenize_stage/v1"}))
    with pytest.raises(PackedDataError, match="format 'tokenize_stage/v1', expected 'pack_stage/v1'"):
        PackedReader(other)
    with pytest.raises(PackedDataError, match="no split 'test'.*train, valid"):
        PackedReader(packed, "test")
    with pytest.raises(IndexError):
        PackedReader(packed).batch([10_000])


def test_a_missing_part_is_named(packed):
    (packed / "train" / "part-00001.arrow").unlink()
    with pytest.raises(PackedDataError, match="part-00001.arrow"):
        PackedReader(packed)
