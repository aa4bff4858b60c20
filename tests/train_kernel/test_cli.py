"""`train-kernel` as a user runs it: plan, run, export-hf / import-hf; user errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from train_kernel.cli import main
from train_kernel.config import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SEED_CONFIG = ROOT / "configs" / "7B_sft.py"


def invoke(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def assert_clean_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a crash
    for word in words:
        assert word in result.output, result.output


def test_plan_json_for_the_seed_on_8_ranks():
    result = invoke("plan", "--config", SEED_CONFIG, "--world-size", 8, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["parameters"] == 7321948160
    sizes = plan["zero_partition_elements"]
    assert len(sizes) == 8 and max(sizes) / (sum(sizes) / len(sizes)) <= 1.01
    memory = plan["memory_per_rank_bytes"]
    assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(memory)
    assert (
        memory["total"]
        == memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["activations"]
    )
    assert plan["flops_per_step"] > 5e15


def test_plan_text_with_overrides():
    result = invoke("plan", "--config", SEED_CONFIG, "--set", "parallel.zero1=4", "--set", "JOB_NAME=other")
    assert result.exit_code == 0, result.output
    assert "7,321,948,160" in result.output and "JOB_NAME other" in result.output
    assert "ZeRO-1 groups of 4 (1 per data-parallel group)" in result.output
    assert "max/mean 1.0000" in result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ("--set", "data.sq_len=3"),
            ("7B_sft.py: override 'data.sq_len=3': data.sq_len: unknown key; did you mean seq_len?",),
        ),
        (("--world-size", 12), ("7B_sft.py: parallel.zero1: 8 does not divide the data-parallel size 12",)),
        (("--set", "model.dtype=torch.int8"), ("7B_sft.py: model.dtype: 'torch.int8' is not supported",)),
    ],
)
def test_plan_errors_name_file_and_key(args, words):
    assert_clean_error(invoke("plan", "--config", SEED_CONFIG, *args), *words)


def test_missing_config_file(tmp_path):
    assert_clean_error(invoke("plan", "--config", tmp_path / "none.py"), "none.py: no such config file")


@pytest.fixture
def fake_module(monkeypatch):
    """fake_module(name, **functions): a module in sys.modules for the lazily imported commands."""

    def install(name: str, **functions) -> types.ModuleType:
        module = types.ModuleType(name)
        for attribute, function in functions.items():
            setattr(module, attribute, function)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    monkeypatch.setattr(os, "environ", dict(os.environ))  # `run` exports RANK, WORLD_SIZE, ... into it
    return install


def test_run_loads_the_config_and_calls_the_trainer(fake_module):
    received: list[TrainConfig] = []
    fake_module("train_kernel.train.trainer", train=received.append)
    result = invoke("run", "--config", SEED_CONFIG, "--set", "data.total_steps=10", "--port", 29511)
    assert result.exit_code == 0, result.output
    (config,) = received
    assert config.data.total_steps == 10 and config.lr_scheduler.total_steps == 10
    assert config.source_text == SEED_CONFIG.read_text(encoding="utf-8")
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("0", "1", "29511")


def test_run_reports_trainer_config_errors_cleanly(fake_module):
    def train(config):
        raise ConfigError("needs 8 ranks, got 1", key="parallel.zero1", source=str(config.source_path))

    fake_module("train_kernel.train.trainer", train=train)
    assert_clean_error(invoke("run", "--config", SEED_CONFIG), "7B_sft.py: parallel.zero1: needs 8 ranks")


def test_run_with_torch_launcher_outside_torchrun(fake_module):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    fake_module("train_kernel.train.trainer", train=lambda config: None)
    assert_clean_error(
        invoke("run", "--config", SEED_CONFIG, "--launcher", "torch"), "start the run with torchrun"
    )


def test_export_and_import_hf_round_trip(tmp_path):
    from tests.train_kernel.model.helpers import small_model
    from train_kernel.model import load_model_state, save_model_checkpoint

    model = small_model()
    save_model_checkpoint(model, tmp_path / "ck")
    result = invoke("export-hf", "--ckpt", f"local:{tmp_path / 'ck'}", "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    assert "tokenizer not copied" in result.output  # a weights-only folder names no data
    result = invoke("import-hf", "--hf", tmp_path / "hf", "--out", tmp_path / "ck2")
    assert result.exit_code == 0, result.output
    _, state = load_model_state(tmp_path / "ck2")
    assert all(state[key].equal(value) for key, value in model.state_dict().items())


def test_converter_input_errors_are_clean(tmp_path):
    assert_clean_error(
        invoke("export-hf", "--ckpt", tmp_path, "--out", tmp_path / "o"), "not a checkpoint folder"
    )
    assert_clean_error(
        invoke("import-internlm", "--ckpt", tmp_path, "--config", SEED_CONFIG, "--out", tmp_path / "o"),
        "no model_tp*_pp*.pt file",
    )


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train_kernel.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.process
def test_as_a_process_json_on_stdout_and_errors_without_traceback(tmp_path):
    ok = _cli("plan", "--config", "configs/7B_sft.py", "--world-size", 8, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["parameters"] == 7321948160

    bad = tmp_path / "bad.py"
    bad.write_text("data = dict(sq_len=2048)\n", encoding="utf-8")
    failed = _cli("plan", "--config", bad)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert f"Error: {bad}: data.sq_len: unknown key; did you mean seq_len?" in failed.stderr
