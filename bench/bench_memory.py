"""Peak RSS (the whole process tree, sampled every 20 ms) of tokenize + pack at 100 MB and at 1 GB of
raw input, byte-level tokenizer, 2 workers. Target (issue 2): the 1 GB peak <= 1.2x the 100 MB peak."""

from __future__ import annotations

import os
import shutil

from bench.common import OUT, cli, demo_texts, run_measured, save_result, write_corpus

SIZES_MB = [int(x) for x in os.environ.get("BENCH_MEMORY_MB", "100,1000").split(",")]


def measure(size_mb: int, texts: list[str]) -> dict:
    raw = OUT / f"raw-mem-{size_mb}mb"
    write_corpus(raw, texts, size_mb << 20, seed=2)
    tokenized, packed = OUT / "mem-tok", OUT / "mem-packed"
    shutil.rmtree(tokenized, ignore_errors=True)
    shutil.rmtree(packed, ignore_errors=True)
    tokenize = run_measured(
        [
            *cli("tokenize_stage.cli"),
            "run",
            "--input",
            str(raw),
            "--output",
            str(tokenized),
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    pack = run_measured(
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
            "--no-progress",
        ]
    )
    shutil.rmtree(tokenized, ignore_errors=True)
    shutil.rmtree(packed, ignore_errors=True)
    return {
        "input_mb": size_mb,
        "tokenize_peak_rss_mib": round(tokenize.peak_rss_bytes / 2**20, 1),
        "pack_peak_rss_mib": round(pack.peak_rss_bytes / 2**20, 1),
        "peak_rss_mib": round(max(tokenize.peak_rss_bytes, pack.peak_rss_bytes) / 2**20, 1),
        "tokenize_s": round(tokenize.seconds, 1),
        "pack_s": round(pack.seconds, 1),
    }


def main() -> dict:
    texts = demo_texts()
    rows = [measure(size, texts) for size in SIZES_MB]
    result = {
        "runs": rows,
        "peak_ratio_largest_over_smallest": round(rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3),
    }
    save_result("memory", result)
    return result


if __name__ == "__main__":
    main()
