"""The packing rules: every row of every split checked against a plain-Python statement of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pack_stage.pack as pack_module
from pack_stage.pack import PackConfig, pack
from tests.pack_stage.pack_checks import check_split, document_order, read_raw_split


def run_pack(folder, out: Path, seq_len: int = 8, micro_bsz: int = 4, **kwargs):
    return pack(PackConfig(folder.path, out, seq_len, micro_bsz, **kwargs), progress=False)


def kept_documents(folder, min_length: int = 0) -> list[int]:
    return [i for i, d in enumerate(folder.documents) if len(d) >= max(min_length, 1)]


@pytest.mark.parametrize(
    "seq_len, micro_bsz, into_one, shuffle, min_length, valid_fraction, rows_per_part, block_rows",
    [
        (8, 4, False, True, 0, 0.0, None, None),
        (8, 4, True, True, 0, 0.0, None, None),
        (8, 4, False, False, 0, 0.0, 3, 2),
        (8, 4, True, False, 4, 0.2, 5, 1),
        (5, 3, False, True, 3, 0.3, 4, 3),
        (16, 2, False, True, 0, 0.1, None, 1),
        (1, 3, False, True, 0, 0.0, 7, 2),
        (64, 1, True, True, 10, 0.5, 2, 1),
    ],
)
def test_rows_follow_the_rules(
    token_folder,
    tmp_path,
    monkeypatch,
    seq_len,
    micro_bsz,
    into_one,
    shuffle,
    min_length,
    valid_fraction,
    rows_per_part,
    block_rows,
):
    if block_rows:  # small blocks: labels and documents must continue across block boundaries too
        monkeypatch.setattr(pack_module, "BLOCK_TOKENS", block_rows * seq_len * micro_bsz)
    out = tmp_path / "out"
    manifest = run_pack(
        token_folder,
        out,
        seq_len,
        micro_bsz,
        pack_sample_into_one=into_one,
        shuffle=shuffle,
        min_length=min_length,
        valid_fraction=valid_fraction,
        rows_per_part=rows_per_part,
    )
    seen = []
    for split in manifest.splits:
        check_split(out, token_folder, split)
        seen += document_order(out, token_folder, split)
    kept = kept_documents(token_folder, min_length)
    assert sorted(seen) == kept
    dropped = [d for d in token_folder.documents if len(d) < max(min_length, 1)]
    assert manifest.dropped_documents == len(dropped)
    assert manifest.dropped_tokens == sum(len(d) for d in dropped)
    if rows_per_part:
        for info in manifest.splits.values():
            assert [p.rows for p in info.parts[:-1]] == [rows_per_part] * (len(info.parts) - 1)
            assert len(info.parts) == -(-info.rows // rows_per_part)


def test_no_shuffle_keeps_the_manifest_order(token_folder, tmp_path):
    run_pack(token_folder, tmp_path / "out", shuffle=False)
    assert document_order(tmp_path / "out", token_folder, "train") == kept_documents(token_folder)


def test_shuffle_is_internlm_randomstate(make_token_folder, tmp_path):
    """Without drops or valid split, the order is np.random.RandomState(seed).shuffle(arange(N))."""
    folder = make_token_folder({"en/a.jsonl": list(range(1, 40)), "code/b.jsonl": list(range(5, 25))})
    run_pack(folder, tmp_path / "out", seed=7)
    expected = np.arange(len(folder.documents))
    np.random.RandomState(7).shuffle(expected)
    assert document_order(tmp_path / "out", folder, "train") == expected.tolist()


def test_document_longer_than_a_row_continues_with_its_labels(make_token_folder, tmp_path):
    folder = make_token_folder({"en/long.jsonl": [3, 5 * 32 + 7, 4], "en/x.jsonl": [0, 6]})
    out = tmp_path / "out"
    run_pack(folder, out, seq_len=8, micro_bsz=4, shuffle=False)
    raw = check_split(out, folder, "train")
    long_doc = folder.documents[1]
    stream = raw.input_ids.reshape(-1)
    np.testing.assert_array_equal(stream[3 : 3 + len(long_doc)], long_doc)
    for row in range(len(raw.input_ids) - 1):  # the last label of a row is the next row's first token
        if row * 32 + 31 < 3 + len(long_doc) - 1:
            assert raw.labels[row, -1] == raw.input_ids[row + 1, 0]
    assert raw.cu_seqlens[1] == [0, 8, 16, 24, 32]  # segments of seq_len inside the long document


def test_empty_documents_and_files_are_dropped(make_token_folder, tmp_path):
    folder = make_token_folder({"en/a.jsonl": [0, 0, 5, 0], "en/b.jsonl": [], "cn/c.txt": [0, 2]})
    manifest = run_pack(folder, tmp_path / "out")
    assert manifest.dropped_documents == 4 and manifest.dropped_tokens == 0
    assert manifest.splits["train"].documents == 2
    assert manifest.input_files == ("cn/c.txt", "en/a.jsonl", "en/b.jsonl")
    check_split(tmp_path / "out", folder, "train")


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_valid_split_takes_exactly_round_fraction(token_folder, tmp_path, fraction):
    manifest = run_pack(token_folder, tmp_path / "out", valid_fraction=fraction, min_length=2)
    kept = kept_documents(token_folder, 2)
    train = document_order(tmp_path / "out", token_folder, "train")
    valid = document_order(tmp_path / "out", token_folder, "valid")
    assert len(valid) == round(fraction * len(kept)) == manifest.splits["valid"].documents
    assert sorted(train + valid) == kept
    check_split(tmp_path / "out", token_folder, "valid")


def test_same_seed_gives_identical_bytes_other_seed_another_order(token_folder, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_pack(token_folder, tmp_path / name, seed=seed, valid_fraction=0.2, rows_per_part=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert document_order(tmp_path / "a", token_folder, "train") != document_order(
        tmp_path / "c", token_folder, "train"
    )
    assert document_order(tmp_path / "a", token_folder, "valid") != document_order(
        tmp_path / "c", token_folder, "valid"
    )


def test_uint32_tokens_and_several_record_batches_per_shard(make_token_folder, tmp_path):
    folder = make_token_folder(token_dtype="uint32", batch_rows=3)
    manifest = run_pack(folder, tmp_path / "out", seq_len=6, micro_bsz=2, valid_fraction=0.2)
    for split in manifest.splits:
        check_split(tmp_path / "out", folder, split)


def test_padding_only_at_the_end_of_each_split(token_folder, tmp_path):
    manifest = run_pack(token_folder, tmp_path / "out", valid_fraction=0.3)
    total = 0
    for split, info in manifest.splits.items():
        raw = read_raw_split(tmp_path / "out", split)
        padding = raw.type_ids == -1
        assert not padding[:-1].any()
        assert padding.sum() == info.padding_tokens < 32
        assert (raw.input_ids[padding] == 0).all() and (raw.labels[padding] == -100).all()
        total += info.rows * 32
    assert manifest.padding_fraction == pytest.approx(
        sum(i.padding_tokens for i in manifest.splits.values()) / total
    )


@pytest.mark.parametrize("block_rows", [None, 1, 3])
def test_many_short_documents(make_token_folder, tmp_path, monkeypatch, block_rows):
    rng = np.random.default_rng(3)
    folder = make_token_folder({"en/a.jsonl": rng.integers(0, 4, 1500).tolist(), "cn/b.jsonl": [90, 1, 2]})
    if block_rows:
        monkeypatch.setattr(pack_module, "BLOCK_TOKENS", block_rows * 32)
    run_pack(folder, tmp_path / "out", seq_len=4, micro_bsz=8, valid_fraction=0.1)
    for split in ("train", "valid"):
        check_split(tmp_path / "out", folder, split)
