"""Pack throughput and reader latency.

- pack: `pack-stage run` end to end (process start included) on a byte-tokenized corpus, in tokens/s;
  compared with the tokenize stage's tokens/s from bench_tokenize (same run of bench.run_all);
- reader: a batch of 4 rows x 4096 tokens as torch tensors (PackedReader.batch + to_torch), warm.

Targets (issue 2): pack >= 20 M tokens/s and >= 10x tokenize; reader <= 1 ms.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time

import numpy as np

from bench.common import OUT, cli, demo_texts, run_measured, save_result, write_corpus

CORPUS_BYTES = int(os.environ.get("BENCH_PACK_MB", "256")) << 20


def main(tokenize_tokens_per_s: float | None = None) -> dict:
    raw = OUT / f"raw-pack-{CORPUS_BYTES >> 20}mb"
    write_corpus(raw, demo_texts(), CORPUS_BYTES, seed=1)
    tokenized = OUT / f"tok-pack-{CORPUS_BYTES >> 20}mb"
    if not (tokenized / "manifest.json").is_file():
        run_measured(
            [
                *cli("tokenize_stage.cli"),
                "run",
                "--input",
                str(raw),
                "--output",
                str(tokenized),
                "--no-progress",
            ]
        )
    tokens = json.loads((tokenized / "manifest.json").read_text())["totals"]["tokens"]
    packed = OUT / "packed-bench"
    runs = []
    for _ in range(2):
        shutil.rmtree(packed, ignore_errors=True)
        result = run_measured(
            [
                *cli("pack_stage.cli"),
                "run",
                "--input",
                str(tokenized),
                "--output",
                str(packed),
                "--seq-len",
                "2048",
                "--micro-bsz",
                "2",
                "--valid-fraction",
                "0.001",
                "--no-progress",
            ],
            sample_rss=False,
        )
        runs.append(result.seconds)
    pack_tokens_per_s = tokens / min(runs)

    from pack_stage.reader import PackedReader

    reader = PackedReader(packed, "train")
    rng = np.random.default_rng(0)
    for _ in range(50):  # warm the page cache and the code paths
        reader.batch(rng.integers(0, len(reader), 4)).to_torch()
    samples = []
    for _ in range(2000):
        rows = rng.integers(0, len(reader), 4)
        started = time.perf_counter()
        reader.batch(rows).to_torch()
        samples.append(time.perf_counter() - started)
    result = {
        "corpus_tokens": tokens,
        "pack_seconds": [round(s, 2) for s in runs],
        "pack_tokens_per_s": round(pack_tokens_per_s),
        "reader_batch_4x4096_ms_median": round(statistics.median(samples) * 1e3, 4),
        "reader_batch_4x4096_ms_p99": round(float(np.percentile(samples, 99)) * 1e3, 4),
    }
    if tokenize_tokens_per_s:
        result["tokenize_tokens_per_s"] = round(tokenize_tokens_per_s)
        result["pack_over_tokenize"] = round(pack_tokens_per_s / tokenize_tokens_per_s, 1)
    save_result("pack_reader", result)
    return result


if __name__ == "__main__":
    main()
