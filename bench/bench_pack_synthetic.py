"""Pack throughput, peak RSS and reader latency on synthetic byte-tokenizer shards (not a test).

    python -m bench.bench_pack_synthetic --tokens 200e6 --work /tmp/pack-bench

Builds ``<work>/tokens-<N>`` once (documents of 300..3000 tokens, 40 files, 3 types), then runs
``python -m pack_stage.cli run`` in a child process and reports its wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Late on purpose: the sys.path insert above lets the file run as a plain script, not only with -m.
from tokenize_stage.text_tokenizers import ByteTokenizer  # noqa: E402


def build_corpus(folder: Path, tokens: int, files: int = 40, seed: int = 0) -> None:
    if (folder / "manifest.json").is_file():
        return
    rng = np.random.default_rng(seed)
    schema = pa.schema([("tokens", pa.list_(pa.uint16())), ("line", pa.int64())])
    entries = {}
    per_file = tokens // files
    for index in range(files):
        data_type = ("en", "cn", "code")[index % 3]
        key = f"{data_type}/part-{index:03d}.jsonl"
        lengths = rng.integers(300, 3001, size=per_file // 1650 + 1)
        lengths = lengths[np.cumsum(lengths) <= per_file]
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        values = rng.integers(3, 259, size=int(offsets[-1]), dtype=np.uint16)
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        (folder / data_type).mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(folder / (key + ".arrow")), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(
                pa.record_batch(
                    [column, pa.array(np.arange(1, len(lengths) + 1, dtype=np.int64))], schema=schema
                )
            )
        entries[key] = {
            "type": data_type,
            "shard": key + ".arrow",
            "size": 0,
            "mtime_ns": 0,
            "sha256": "0" * 64,
            "documents": len(lengths),
            "tokens": int(offsets[-1]),
            "rejected": 0,
            "empty_documents": 0,
            "blank_lines": 0,
        }
    manifest = {
        "format": "tokenize_stage/v1",
        "tokenizer": ByteTokenizer().identity.to_json(),
        "token_dtype": "uint16",
        "types": {"en": 0, "cn": 1, "code": 2},
        "settings": {},
        "files": entries,
        "totals": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


# Runs the CLI and then prints the process's VmHWM. Not ru_maxrss from wait4: that also counts the
# parent's peak, which the child inherits until exec.
PEAK_PROBE = """
import runpy, sys
sys.argv = ["pack-stage", *sys.argv[1:]]
try:
    runpy.run_module("pack_stage.cli", run_name="__main__")
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print("PEAK_KB", hwm.split()[1], file=sys.stderr)
"""


def run_pack(
    tokens_dir: Path, out: Path, seq_len: int, micro_bsz: int, extra: list[str]
) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `pack-stage run` in a fresh child process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-c",
        PEAK_PROBE,
        "run",
        "--input",
        str(tokens_dir),
        "--output",
        str(out),
        "--seq-len",
        str(seq_len),
        "--micro-bsz",
        str(micro_bsz),
        "--no-progress",
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command, check=False, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"pack failed with exit code {done.returncode}:\n{done.stderr}")
    for line in done.stderr.splitlines():
        if "packed" in line:
            print(line.split(": ", 1)[-1])
    peak_kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_KB"))
    return elapsed, peak_kb / 1024


def reader_latency(out: Path, rows: int, repeats: int = 2000) -> float:
    from pack_stage.reader import PackedReader

    reader = PackedReader(out)
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, len(reader), size=rows).tolist() for _ in range(repeats)]
    for pick in picks[:50]:  # warm the page cache
        reader.batch(pick).to_torch()
    started = time.perf_counter()
    for pick in picks:
        reader.batch(pick).to_torch()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=200e6)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pack-bench"))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-bsz", type=int, default=4)
    parser.add_argument("--extra", nargs="*", default=[])
    parser.add_argument("--keep", action="store_true", help="Keep the packed output.")
    args = parser.parse_args()
    tokens = int(args.tokens)
    tokens_dir = args.work / f"tokens-{tokens}"
    build_corpus(tokens_dir, tokens)
    out = args.work / "packed"
    elapsed, peak = run_pack(tokens_dir, out, args.seq_len, args.micro_bsz, args.extra)
    real = json.loads((out / "manifest.json").read_text())["splits"]["train"]["tokens"]
    print(
        f"pack: {real / 1e6:.1f} M tokens in {elapsed:.2f} s = {real / elapsed / 1e6:.1f} M tokens/s "
        f"(process start included), peak RSS {peak:.0f} MiB"
    )
    latency = reader_latency(out, rows=4)
    print(
        f"reader: batch of 4 rows x {args.seq_len * args.micro_bsz} tokens + to_torch: {latency * 1e6:.0f} us"
    )
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
