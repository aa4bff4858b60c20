"""Tokenize throughput, side by side in one run on the same texts and cores:

- limit: the tokenizer library's own batch encode (Hugging Face `encode_batch_fast`, its Rust
  thread pool on every core), texts already in memory, nothing written;
- stage: `tokenize-stage run` end to end (process start, jsonl parsing, Arrow shards, manifest);
- naive: InternLM's tools/tokenizer.py approach: one process, document by document, JSON lines out.

Targets (issue 2): stage / limit >= 0.85, stage / naive >= 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import OUT, cli, demo_texts, run_measured, save_result, train_bpe_tokenizer, write_corpus

CORPUS_BYTES = int(os.environ.get("BENCH_TOKENIZE_MB", "96")) << 20
REPEATS = 2

NAIVE = r"""
import json, sys
from pathlib import Path
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
out = Path(sys.argv[3])
for path in sorted(Path(sys.argv[2]).rglob("*.jsonl")):
    target = out / path.relative_to(sys.argv[2])
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(path) as source, open(target, "w") as sink:
        for line in source:
            ids = tokenizer.encode(json.loads(line)["content"], add_special_tokens=False).ids
            sink.write(json.dumps({"tokens": [bos, *ids, eos]}) + "\n")
"""


def library_limit(tokenizer_path: Path, raw: Path) -> tuple[float, int]:
    """Seconds for encode_batch_fast over every text of the corpus, and the token count."""
    code = r"""
import json, sys, time
from pathlib import Path
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(l)["content"] for p in sorted(Path(sys.argv[2]).rglob("*.jsonl")) for l in open(p)]
started = time.perf_counter()
tokens = 0
for i in range(0, len(texts), 4096):
    tokens += sum(len(e.ids) + 2
                  for e in tokenizer.encode_batch_fast(texts[i:i + 4096], add_special_tokens=False))
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": tokens}))
"""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tokenizer_path), str(raw)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    data = json.loads(result.stdout)
    return data["seconds"], data["tokens"]


def main() -> dict:
    texts = demo_texts()
    raw = OUT / f"raw-tokenize-{CORPUS_BYTES >> 20}mb"
    corpus_bytes = write_corpus(raw, texts, CORPUS_BYTES)
    tokenizer = train_bpe_tokenizer(OUT / "bpe16k.json", texts[:3000])
    rows = []
    for repeat in range(REPEATS):
        limit_s, tokens = library_limit(tokenizer, raw)
        target = OUT / "tok-bench"
        shutil.rmtree(target, ignore_errors=True)
        stage = run_measured(
            [
                *cli("tokenize_stage.cli"),
                "run",
                "--input",
                str(raw),
                "--output",
                str(target),
                "--tokenizer",
                str(tokenizer),
                "--workers",
                str(os.cpu_count()),
                "--no-progress",
            ],
            sample_rss=False,
        )
        manifest = json.loads((target / "manifest.json").read_text())
        assert manifest["totals"]["tokens"] == tokens, (manifest["totals"]["tokens"], tokens)
        naive_out = OUT / "tok-naive"
        shutil.rmtree(naive_out, ignore_errors=True)
        naive = run_measured(
            [sys.executable, "-c", NAIVE, str(tokenizer), str(raw), str(naive_out)], sample_rss=False
        )
        rows.append({"limit_s": limit_s, "stage_s": stage.seconds, "naive_s": naive.seconds})
        print(
            f"repeat {repeat}: limit {limit_s:.2f} s, stage {stage.seconds:.2f} s, "
            f"naive {naive.seconds:.2f} s",
            flush=True,
        )
    best = {key: min(r[key] for r in rows) for key in rows[0]}
    mb = corpus_bytes / 2**20
    result = {
        "corpus_mib": round(mb, 1),
        "tokens": tokens,
        "tokenizer": "byte-level BPE, 16k vocab (tokenizers)",
        "limit_mb_s": round(mb / best["limit_s"], 2),
        "stage_mb_s": round(mb / best["stage_s"], 2),
        "naive_mb_s": round(mb / best["naive_s"], 2),
        "stage_tokens_per_s": round(tokens / best["stage_s"]),
        "stage_over_limit": round(best["limit_s"] / best["stage_s"], 3),
        "stage_over_naive": round(best["naive_s"] / best["stage_s"], 2),
        "runs": rows,
    }
    save_result("tokenize", result)
    return result


if __name__ == "__main__":
    main()
