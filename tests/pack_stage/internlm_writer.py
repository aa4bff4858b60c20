"""Writes data in the format of InternLM's tools/tokenizer.py: per data type folder, ``*.bin`` JSON
lines ``{"tokens": [...]}`` and ``*.bin.meta``, np.save of (byte offset, token count) per line
(int32, as tokenizer.py saves it; alpaca_tokenizer.py saves a list of tuples, int64)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_bin(path: Path, documents: Sequence[Sequence[int]], meta_dtype=np.int32) -> Path:
    """``path`` (a .bin) and its .meta, one line per document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = []
    offset = 0
    with open(path, "wb") as handle:
        for tokens in documents:
            line = (json.dumps({"tokens": [int(t) for t in tokens]}) + "\n").encode()
            handle.write(line)
            meta.append((offset, len(tokens)))
            offset += len(line)
    with open(str(path) + ".meta", "wb") as handle:
        np.save(handle, np.array(meta, dtype=meta_dtype))
    return path


def random_documents(
    count: int, seed: int, vocab: int = 250, low: int = 3, high: int = 60
) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(low, high))).tolist() for _ in range(count)]


def alpaca_sample(prompt: Sequence[int], answer: Sequence[int], bos: int = 1, eos: int = 2) -> list[int]:
    """A row as tools/alpaca_tokenizer.py writes it: BOS, the prompt negated, the answer, EOS."""
    return [bos, *(-t for t in prompt), *answer, eos]
