"""Validation split across data-parallel ranks (and through a pipeline) gives the record one process
computes on the whole valid split, on real packed shards."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, write_jsonl
from tests.train_kernel.parallel.launch import train_ranks
from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train

pytestmark = pytest.mark.distributed


def _packed(tmp_path):
    texts = [f"doc {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 5) for i in range(160)]
    write_jsonl(tmp_path / "raw" / "en" / "a.jsonl", [{"content": t} for t in texts])
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
        "0.2",
        "--no-progress",
    )
    return str(tmp_path / "packed")


def _valid_records(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "valid"]


COMMON = dict(valid_every=2, total_steps=4)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The packed shards and the one-process run both layouts are compared with."""
    folder = tmp_path_factory.mktemp("single")
    packed = _packed(folder)
    train(config_from_text(tiny_config_text(folder / "single", micro_num=4, train_folder=packed, **COMMON)))
    return packed, _valid_records(folder / "single")


@pytest.mark.parametrize("layout", ["data 2", "pipeline 2"])
def test_validation_over_ranks_equals_one_process(tmp_path, single, layout):
    packed, single_records = single
    common = dict(train_folder=packed, **COMMON)
    if layout == "data 2":
        text = tiny_config_text(tmp_path / "parallel", micro_num=2, **common).replace("zero1=1", "zero1=2")
    else:
        text = tiny_config_text(tmp_path / "parallel", micro_num=4, **common).replace(
            "parallel = dict(zero1=1)", "parallel = dict(zero1=1, pipeline=dict(size=2))"
        )
    (tmp_path / "parallel.py").write_text(text)
    results = train_ranks(tmp_path / "parallel.py", world_size=2)
    for result in results:
        assert result.returncode == 0, result.output[-4000:]
    parallel = _valid_records(tmp_path / "parallel")
    assert [r["step"] for r in parallel] == [r["step"] for r in single_records] == [1, 3]
    for one, two in zip(single_records, parallel, strict=True):
        assert two["val/tokens/en"] == one["val/tokens/en"] > 0
        assert two["val/loss_from_metric"] == pytest.approx(one["val/loss_from_metric"], abs=1e-4)
        assert two["val/acc"] == pytest.approx(one["val/acc"], abs=1e-4)
