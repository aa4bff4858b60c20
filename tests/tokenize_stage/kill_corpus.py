"""A small raw corpus with every kind of input the stage finishes differently: files cut into
several work units (with --chunk-mb 1), one-unit files (small, .gz, .zst, whole-file text, a
one-row-group parquet), a parquet of several row groups, rejected lines and an empty file, over four
type folders. Built from a seed, so every test that builds it gets the same bytes."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

WORDS = ["pack", "token", "shard", "arrow", "训练", "données", "gradient", "loss", "λ", "checkpoint"]


def _texts(rng: random.Random, count: int, longest: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, longest))) for _ in range(count)]


def _jsonl(texts: list[str]) -> str:
    return "".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in texts)


def build_kill_corpus(raw: Path, seed: int = 13) -> dict[str, int]:
    """Writes the corpus under ``raw``; returns each file's size in bytes."""
    rng = random.Random(seed)
    for folder in ("en", "cn", "code", "wiki"):
        (raw / folder).mkdir(parents=True, exist_ok=True)
    # About 2.3 MiB: three units of 1 MiB, with bad lines in the first and the last.
    big = _texts(rng, 11_000, 60)
    lines = [json.dumps({"content": t}, ensure_ascii=False) for t in big]
    lines[5], lines[-7] = "{not json", json.dumps({"text": "wrong key"})
    (raw / "en" / "big.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (raw / "en" / "small.jsonl").write_text(_jsonl(_texts(rng, 40, 20)) + "[1, 2]\n", encoding="utf-8")
    (raw / "en" / "empty.jsonl").write_bytes(b"")
    (raw / "cn" / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(_texts(rng, 1500, 40)).encode(), mtime=0))
    frames = [zstandard.ZstdCompressor().compress(_jsonl(_texts(rng, 700, 40)).encode()) for _ in range(2)]
    (raw / "cn" / "c.jsonl.zst").write_bytes(b"".join(frames))  # two frames, as `cat` joins them
    # About 1.2 MiB of text lines: two units, or one document with --whole-file.
    (raw / "code" / "lines.txt").write_text("\n".join(_texts(rng, 6000, 60)) + "\n", encoding="utf-8")
    (raw / "code" / "book.txt").write_text("chapter one\n\nchapter two\n", encoding="utf-8")
    pq.write_table(pa.table({"content": _texts(rng, 300, 30)}), raw / "wiki" / "one.parquet")
    pq.write_table(
        pa.table({"content": _texts(rng, 900, 30)}), raw / "wiki" / "many.parquet", row_group_size=250
    )
    return {p.relative_to(raw).as_posix(): p.stat().st_size for p in sorted(raw.rglob("*")) if p.is_file()}
