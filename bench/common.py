"""Shared pieces of the benchmarks: corpora made from the demo corpus, a tokenizer trained on it,
timing of whole commands, peak RSS of a process tree, and gloo jobs of several rank processes."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def demo_texts() -> list[str]:
    """The demo corpus (stdlib sources and docstrings), built once into bench/out/raw-demo."""
    from tokenize_stage.demo_corpus import build_demo_corpus

    raw = OUT / "raw-demo"
    if not (raw / "code" / "stdlib.jsonl").is_file():
        build_demo_corpus(raw)
    texts: list[str] = []
    for path in sorted(raw.rglob("*.jsonl")):
        texts.extend(json.loads(line)["content"] for line in path.open())
    return texts


def write_corpus(
    folder: Path, texts: list[str], total_bytes: int, files_per_type: int = 4, seed: int = 0
) -> int:
    """A raw corpus of about ``total_bytes`` of jsonl, cycling through ``texts`` in a shuffled
    order, spread over en/ and code/ folders. Returns the bytes written."""
    if folder.is_dir() and (folder / ".complete").is_file():
        return int((folder / ".complete").read_text())
    rng = random.Random(seed)
    order = list(range(len(texts)))
    lines = [json.dumps({"content": texts[i]}) + "\n" for i in order]
    written = 0
    files = [folder / t / f"part-{i:03d}.jsonl" for t in ("en", "code") for i in range(files_per_type)]
    per_file = total_bytes // len(files)
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with open(path, "w") as handle:
            while size < per_file:
                rng.shuffle(order)
                for i in order:
                    handle.write(lines[i])
                    size += len(lines[i])
                    if size >= per_file:
                        break
        written += size
    (folder / ".complete").write_text(str(written))
    return written


def train_bpe_tokenizer(path: Path, texts: list[str], vocab_size: int = 16000) -> Path:
    """A byte-level BPE tokenizer.json, as LLaMA-3-style tokenizers are, trained on the texts."""
    if path.is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


@dataclass
class CommandResult:
    seconds: float
    peak_rss_bytes: int
    stdout: str


def run_measured(
    args: list[str], env: dict | None = None, sample_s: float = 0.02, sample_rss: bool = True
) -> CommandResult:
    """Runs a command, timing it and (unless sample_rss is off: sampling costs CPU that timing
    runs should not lose) sampling the summed RSS of its whole process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(process.pid)
        while not stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                total = 0
                for p in tree:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                return
            time.sleep(sample_s)

    sampler = threading.Thread(target=sample if sample_rss else (lambda: None), daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{stdout}\n{stderr}")
    return CommandResult(seconds, peak, stdout)


def cli(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def drop_file(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path)


def save_result(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    data = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), **data}
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(json.dumps(data, indent=1))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives a rank of a one-node job on this machine."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def run_ranks(
    args: list[str], world_size: int, threads: int = 1, jobs: int = 1, timeout_s: float = 1800
) -> list[str]:
    """Runs `python <args>` as the ranks of `jobs` gloo jobs of `world_size` processes each, all at
    once, as torchrun would start them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), with
    `threads` threads per rank; returns each rank's output (stdout and stderr), raising on a failure."""
    processes = []
    for port in [free_port() for _ in range(jobs)]:
        for rank in range(world_size):
            env = {**os.environ, **rank_env(rank, world_size, port), "OMP_NUM_THREADS": str(threads)}
            env["PYTHONPATH"] = str(ROOT)
            processes.append(
                subprocess.Popen(
                    [sys.executable, *args],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout_s)
        if process.returncode != 0:
            raise RuntimeError(f"{args[:2]} failed ({process.returncode}):\n{output[-6000:]}")
        outputs.append(output)
    return outputs


def result_line(outputs: list[str], tag: str = "RESULT ") -> dict:
    """The JSON a rank printed after `tag` (the first such line of any rank)."""
    line = next(line for out in outputs for line in out.splitlines() if line.startswith(tag))
    return json.loads(line[len(tag) :])
