"""`make bench`: every benchmark of the project, side by side in one run; results in bench/out/*.json
(copy the figures into BENCHMARKS.md with the date)."""

from __future__ import annotations

from bench import (
    bench_ckpt_stall,
    bench_demo,
    bench_memory,
    bench_metrics,
    bench_overlap,
    bench_pack_reader,
    bench_pipeline_bubble,
    bench_tokenize,
    bench_train,
    bench_uploader,
    bench_zero_memory,
)


def main() -> None:
    tokenize = bench_tokenize.main()
    bench_pack_reader.main(tokenize_tokens_per_s=tokenize["stage_tokens_per_s"])
    bench_memory.main()
    bench_train.main()
    bench_zero_memory.main()
    bench_pipeline_bubble.main()
    bench_overlap.main()
    bench_metrics.main()
    bench_uploader.main()
    bench_ckpt_stall.main()
    bench_demo.main()


if __name__ == "__main__":
    main()
