"""Fixtures shared by every package's tests: real tokenizer files trained on the spot (no
downloads) and a runner for the project's console scripts as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Packed rows keep documents apart with cu_seqlens.",
    "训练大模型需要大量的文本数据。",
    "Checkpoints are uploaded to S3 while training goes on.",
] * 40


def run_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Runs `python -m <package>.cli ...` as its own process, as a user's shell would."""
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
            handle.write("\n")
    return path


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> Path:
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SAMPLE_TEXTS), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tok"),
        vocab_size=120,
        model_type="bpe",
        pad_id=0,
        unk_id=3,
        bos_id=1,
        eos_id=2,
        character_coverage=1.0,
        minloglevel=2,
    )
    return folder / "tok.model"


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_TEXTS, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return path
