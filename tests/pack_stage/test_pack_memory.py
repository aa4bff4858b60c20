"""The pack's peak RSS does not grow with the corpus (mapped shard pages included)."""

from __future__ import annotations

import pytest

from bench.bench_pack_synthetic import build_corpus, run_pack


@pytest.mark.process
def test_peak_rss_does_not_grow_with_corpus_size(tmp_path):
    peaks = {}
    for tokens in (4_000_000, 40_000_000):
        build_corpus(tmp_path / f"tokens-{tokens}", tokens, files=8)
        _, peaks[tokens] = run_pack(tmp_path / f"tokens-{tokens}", tmp_path / "out", 1024, 4, [])
    print(peaks)
    assert peaks[40_000_000] <= 1.1 * peaks[4_000_000], peaks
