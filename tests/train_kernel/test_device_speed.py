"""model.dtype="auto": the dtype each device computes fastest, explicit dtypes honoured with a warning
when emulated, and the probe's answer when oneDNN is capped below the CPU's bf16 instructions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config import ConfigError, config_from_text
from train_kernel.device_speed import DeviceSpeed, choose_dtype, device_speed, measure_matmul_gflops
from train_kernel.plan import make_plan

# An AVX2-only CPU (AMD Zen 3 class), figures as measured there with one thread.
EMULATING_CPU = DeviceSpeed(
    device="cpu",
    name="AMD EPYC 7B13",
    capability="no bf16 flags",
    reports_native_bf16=False,
    matmul_gflops={"torch.float32": 45.0, "torch.bfloat16": 1.2, "torch.float16": 1.0},
)
# A CPU with AMX: bf16 several times fp32; fp16 converted to fp32.
NATIVE_CPU = DeviceSpeed(
    device="cpu",
    name="Intel Xeon (Sapphire Rapids)",
    capability="avx512_bf16 amx_bf16",
    reports_native_bf16=True,
    matmul_gflops={"torch.float32": 150.0, "torch.bfloat16": 1000.0, "torch.float16": 150.0},
)
# Flags say bf16, but oneDNN was capped at AVX2 and emulates it: the measurement decides.
CAPPED_CPU = DeviceSpeed(
    device="cpu",
    name="Intel Xeon (capped)",
    capability="avx512_bf16 amx_bf16",
    reports_native_bf16=True,
    matmul_gflops={"torch.float32": 95.0, "torch.bfloat16": 1.0, "torch.float16": 0.9},
)


def gpu(bf16: bool) -> DeviceSpeed:
    return DeviceSpeed(
        device="cuda:0", name="GPU", capability="sm_90" if bf16 else "sm_70", reports_native_bf16=bf16
    )


@pytest.mark.parametrize(
    ("speed", "expected"),
    [
        (EMULATING_CPU, "torch.float32"),
        (NATIVE_CPU, "torch.bfloat16"),
        (CAPPED_CPU, "torch.float32"),
        (gpu(bf16=True), "torch.bfloat16"),
        (gpu(bf16=False), "torch.float16"),
    ],
)
def test_auto_picks_the_fastest_native_dtype(speed, expected):
    choice = choose_dtype("auto", speed=speed)
    assert choice.name == expected and choice.requested == "auto" and choice.warning is None
    if speed.device == "cpu":  # the figures behind the choice are in the log line
        assert (
            f"bf16 matmul {speed.rate(torch.bfloat16):.1f} GFLOP/s vs fp32 {speed.rate(torch.float32):.1f}"
            in (choice.log_line())
        )


@pytest.mark.parametrize(
    ("speed", "dtype", "slowdown", "auto"),
    [
        (EMULATING_CPU, "torch.bfloat16", "38x slower", "torch.float32"),
        (EMULATING_CPU, "torch.float16", "45x slower", "torch.float32"),
        (NATIVE_CPU, "torch.float16", "7x slower", "torch.bfloat16"),
        (CAPPED_CPU, "torch.half", "106x slower", "torch.float32"),
    ],
)
def test_explicit_emulated_dtype_is_honoured_with_a_warning(speed, dtype, slowdown, auto):
    choice = choose_dtype(dtype, speed=speed)
    assert choice.name == dtype
    assert slowdown in choice.warning and "model.dtype='auto'" in choice.warning and auto in choice.warning


@pytest.mark.parametrize(
    ("speed", "dtype"),
    [
        (EMULATING_CPU, "torch.float32"),
        (NATIVE_CPU, "torch.bfloat16"),
        (NATIVE_CPU, "torch.float32"),
        (gpu(bf16=True), "torch.float16"),
        (gpu(bf16=True), "torch.bfloat16"),
    ],
)
def test_native_dtypes_give_no_warning(speed, dtype):
    assert choose_dtype(dtype, speed=speed).warning is None


def test_bf16_on_a_gpu_without_it_warns():
    warning = choose_dtype("torch.bfloat16", speed=gpu(bf16=False)).warning
    assert "emulates bf16" in warning and "torch.float16" in warning


def test_this_cpu_measured_and_decided_consistently():
    speed = device_speed("cpu")
    assert set(speed.matmul_gflops) == {"torch.float32", "torch.bfloat16", "torch.float16"}
    assert all(rate > 0 for rate in speed.matmul_gflops.values())
    assert device_speed("cpu") is speed  # probed once per process
    expected = (
        "torch.bfloat16" if speed.rate(torch.bfloat16) >= speed.rate(torch.float32) else "torch.float32"
    )
    assert choose_dtype("auto").name == expected


@pytest.fixture
def one_thread():
    """As the probe runs: on one thread (two threads on a busy 2-core machine stall for ms per call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _slow_matmul(monkeypatch, slow_calls):
    """torch.mm taking 30 ms on the calls numbered in `slow_calls` (all when None); returns the call log."""
    import time

    real, calls = torch.mm, []

    def mm(a, b, **kwargs):
        calls.append(len(calls))
        if slow_calls is None or len(calls) - 1 in slow_calls:
            time.sleep(0.03)
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", mm)
    return calls


def test_a_slow_first_call_or_one_preempted_call_is_not_taken_for_emulation(monkeypatch, one_thread):
    # oneDNN builds its kernel on a shape's first call (~100x a native bf16 call); another process
    # may take the core for one call. Neither may make a native dtype look emulated.
    _slow_matmul(monkeypatch, slow_calls={0, 1})
    emulated_figure = 2 * 128**3 / 0.03 / 1e9  # what a 30 ms call gives: 0.14 GFLOP/s
    assert measure_matmul_gflops(torch.float32, size=128, min_seconds=0.002) > 3 * emulated_figure


def test_an_emulated_dtype_costs_three_calls(monkeypatch, one_thread):
    calls = _slow_matmul(monkeypatch, slow_calls=None)
    rate = measure_matmul_gflops(torch.float32, size=128, min_seconds=0.002)
    assert len(calls) == 3 and rate < 2 * 128**3 / 0.03 / 1e9 * 1.01


def test_probe_is_short(one_thread):
    import time

    started = time.perf_counter()
    rate = measure_matmul_gflops(torch.float32, size=128, min_seconds=0.002)
    assert rate > 0.1 and time.perf_counter() - started < 1.0


@pytest.mark.parametrize("bad", ["bf16", "torch.int8", "Auto"])
def test_unknown_dtype_is_a_config_error_listing_the_choices(tmp_path, bad):
    with pytest.raises(ConfigError) as raised:
        config_from_text(tiny_config_text(tmp_path, dtype=bad))
    message = str(raised.value)
    assert "model.dtype" in message and repr(bad) in message
    assert "auto" in message and "torch.bfloat16" in message and "torch.float32" in message


def test_plan_shows_the_dtype_of_this_machine(tmp_path):
    plan = make_plan(config_from_text(tiny_config_text(tmp_path, dtype="auto")))
    assert plan.dtype.requested == "auto"
    assert plan.dtype.name == choose_dtype("auto").name
    assert plan.config.model.dtype == plan.dtype.name  # memory figures use the resolved dtype
    assert plan.to_json()["dtype"]["on_this_machine"] == plan.dtype.name


@pytest.mark.process
def test_auto_takes_fp32_where_onednn_emulates_bf16(tmp_path):
    """oneDNN capped at AVX2 computes bf16 at ~1 GFLOP/s even where the CPU's flags list
    avx512_bf16: the probe sees it and `auto` takes fp32 (on an AVX2-only CPU it does anyway)."""
    config = tmp_path / "tiny.py"
    config.write_text(tiny_config_text(tmp_path, dtype="auto"))
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run(
        [sys.executable, "-m", "train_kernel.cli", "plan", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    dtype = json.loads(result.stdout)["dtype"]
    assert dtype["on_this_machine"] == "torch.float32", dtype
    assert "bf16 matmul" in dtype["reason"]


def test_a_run_records_the_dtype_auto_took(tmp_path, caplog):
    from train_kernel.model import load_model_state
    from train_kernel.train.trainer import train

    caplog.set_level("INFO")
    config = config_from_text(
        tiny_config_text(tmp_path, dtype="auto", total_steps=2, save=True, checkpoint_every=2)
    )
    train(config)
    expected = choose_dtype("auto").name
    assert f"dtype auto -> {expected} (" in (tmp_path / "train.log").read_text()
    params = next(
        r
        for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "params"
    )
    assert params["params"]["model.dtype"] == expected
    saved_config, state = load_model_state(tmp_path / "ckpt" / "2")
    assert saved_config.dtype == expected and state["head.weight"].dtype == saved_config.torch_dtype


def test_an_explicit_emulated_dtype_warns_once_in_the_run_log(tmp_path):
    from train_kernel.train.trainer import train

    expected = choose_dtype("torch.float16").warning  # fp16 is emulated on every CPU class we know
    train(config_from_text(tiny_config_text(tmp_path, dtype="torch.float16", total_steps=2)))
    log = (tmp_path / "train.log").read_text()
    assert "dtype torch.float16 -> torch.float16 (given in the config)" in log
    if expected is None:
        assert "emulates it" not in log
    else:
        assert log.count("this CPU emulates it") == 1 and "model.dtype='auto' picks" in log
