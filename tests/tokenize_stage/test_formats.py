"""Every input format reaches the shards intact: each document decodes back to its text, with
BOS/EOS around it, its data type, and the line it came from."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tests.conftest import write_jsonl
from tests.tokenize_stage.helpers import documents, tokenize
from tokenize_stage.schema import TokenManifest
from tokenize_stage.text_tokenizers import ByteTokenizer

BYTES = ByteTokenizer()


def decode(tokens: list[int]) -> str:
    assert tokens[0] == 1 and tokens[-1] == 2, "each document starts with BOS and ends with EOS"
    return BYTES.decode(tokens[1:-1])


def test_jsonl_txt_parquet_and_compressed(tmp_path):
    raw = tmp_path / "raw"
    texts = [f"document {i}: héllo 世界" for i in range(50)]
    write_jsonl(raw / "en" / "a.jsonl", [{"content": t, "id": i} for i, t in enumerate(texts)])
    (raw / "cn").mkdir()
    with gzip.open(raw / "cn" / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"content": t}) + "\n" for t in texts[:10])
    (raw / "cn" / "c.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"content": t}) + "\n" for t in texts[10:20]).encode()
        )
    )
    (raw / "code").mkdir()
    (raw / "code" / "d.txt").write_text("first line\r\nsecond line\n\nthird line", encoding="utf-8")
    (raw / "math").mkdir()
    pq.write_table(pa.table({"content": texts[:30]}), raw / "math" / "e.parquet", row_group_size=7)
    (raw / "README.md").write_text("not data")

    report = tokenize(raw, tmp_path / "tok")
    manifest = TokenManifest.load(tmp_path / "tok")
    assert manifest.types == {"en": 0, "cn": 1, "code": 2, "math": 3}
    assert report.ignored_files == ["README.md"]
    found = {(path, line): decode(tokens) for path, line, tokens in documents(tmp_path / "tok")}
    assert found[("en/a.jsonl", 1)] == texts[0] and found[("en/a.jsonl", 50)] == texts[49]
    assert [found[("cn/b.jsonl.gz", i + 1)] for i in range(10)] == texts[:10]
    assert [found[("cn/c.jsonl.zst", i + 1)] for i in range(10)] == texts[10:20]
    assert found[("code/d.txt", 1)] == "first line" and found[("code/d.txt", 4)] == "third line"
    assert [found[("math/e.parquet", i + 1)] for i in range(30)] == texts[:30]
    entries = {e.path: e for e in manifest.files}
    assert entries["code/d.txt"].blank_lines == 1 and entries["code/d.txt"].documents == 3
    assert manifest.documents == 50 + 10 + 10 + 3 + 30 == report.documents
    assert manifest.tokens == sum(len(t) for _, _, t in documents(tmp_path / "tok"))


def test_whole_file_text_and_custom_key(tmp_path):
    raw = tmp_path / "raw"
    (raw / "en").mkdir(parents=True)
    (raw / "en" / "book.txt").write_text("chapter one\n\nchapter two\n")
    write_jsonl(raw / "en" / "k.jsonl", [{"text": "under another key"}])
    tokenize(raw, tmp_path / "tok", whole_file=True, text_key="text")
    found = {path: decode(tokens) for path, _, tokens in documents(tmp_path / "tok")}
    assert found == {"en/book.txt": "chapter one\n\nchapter two\n", "en/k.jsonl": "under another key"}


def test_large_file_split_into_units_keeps_order_and_lines(tmp_path):
    raw = tmp_path / "raw"
    texts = [("x" * (i % 97)) + f" line {i}" for i in range(20_000)]
    write_jsonl(raw / "en" / "big.jsonl", [{"content": t} for t in texts])
    tokenize(raw, tmp_path / "tok", chunk_bytes=64 << 10, workers=2)
    docs = documents(tmp_path / "tok")
    assert [line for _, line, _ in docs] == list(range(1, 20_001))
    assert [decode(tokens) for _, _, tokens in docs] == texts


def test_without_bos_eos(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "en" / "a.jsonl", [{"content": "abc"}])
    tokenize(raw, tmp_path / "tok", add_bos=False, add_eos=False)
    assert documents(tmp_path / "tok")[0][2] == [ord("a") + 3, ord("b") + 3, ord("c") + 3]


@pytest.mark.parametrize("vocab_size,dtype", [(259, "uint16"), (70_000, "uint32")])
def test_token_dtype_follows_vocab(vocab_size, dtype):
    from tokenize_stage.schema import token_dtype_for

    assert str(token_dtype_for(vocab_size)) == dtype
