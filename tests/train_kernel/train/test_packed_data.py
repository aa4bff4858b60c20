"""Training on real packed shards (tokenize-stage -> pack-stage -> train-kernel), with validation
on the valid split, and the error a user gets when the shards don't match the config."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, write_jsonl
from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train


def _prepared(tmp_path):
    texts = [
        f"document {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 7) for i in range(120)
    ]
    write_jsonl(tmp_path / "raw" / "en" / "a.jsonl", [{"content": t} for t in texts[:80]])
    write_jsonl(
        tmp_path / "raw" / "code" / "b.jsonl",
        [{"content": "def f(x):\n    return x * 2\n" * (1 + i % 3)} for i in range(40)],
    )
    run_cli(
        "tokenize_stage.cli",
        "run",
        "--input",
        str(tmp_path / "raw"),
        "--output",
        str(tmp_path / "tok"),
        "--no-progress",
    )
    run_cli(
        "pack_stage.cli",
        "run",
        "--input",
        str(tmp_path / "tok"),
        "--output",
        str(tmp_path / "packed"),
        "--seq-len",
        "32",
        "--micro-bsz",
        "2",
        "--valid-fraction",
        "0.1",
        "--no-progress",
    )
    return tmp_path / "packed"


@pytest.mark.process
def test_train_on_packed_shards_with_validation(tmp_path):
    packed = _prepared(tmp_path)
    config = config_from_text(
        tiny_config_text(tmp_path / "run", train_folder=str(packed), valid_every=2, total_steps=4)
    )
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert [r["step"] for r in valid] == [1, 3]
    manifest = json.loads((packed / "manifest.json").read_text())
    valid_tokens = manifest["splits"]["valid"]["tokens"]
    assert valid[0]["val/tokens/en"] + valid[0]["val/tokens/code"] <= valid_tokens
    assert valid[0]["val/tokens/en"] + valid[0]["val/tokens/code"] > 0
    assert valid[1]["val/loss"] < valid[0]["val/loss"] + 1.0
    # Both data types appear in training with their own metrics.
    assert sum(r["tokens/en"] for r in steps) > 0 and sum(r["tokens/code"] for r in steps) > 0


@pytest.mark.process
def test_shards_packed_for_another_seq_len_are_refused(tmp_path):
    packed = _prepared(tmp_path)
    config_file = tmp_path / "cfg.py"
    config_file.write_text(tiny_config_text(tmp_path / "run", train_folder=str(packed), seq_len=64))
    result = run_cli("train_kernel.cli", "run", "--config", str(config_file), check=False)
    assert result.returncode != 0
    assert (
        "seq_len: the shards in" in result.stderr
        and "packed with 32, the config asks for 64" in result.stderr
    )
    assert "Traceback" not in result.stderr
