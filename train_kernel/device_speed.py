"""What this machine's device computes fast, and the dtype `model.dtype="auto"` picks from it.

The trainer, `train-kernel plan` and the benchmarks all ask here. On CUDA the runtime's capability
report decides (bf16 where the GPU computes it, else fp16 with the loss scaler). On a CPU the
capability flags are only reported: a short matmul probe decides, because flags can mislead (oneDNN
may be capped below the CPU's ISA, e.g. ONEDNN_MAX_CPU_ISA=AVX2, and then bf16 runs emulated at
~1 GFLOP/s on a CPU whose flags say avx512_bf16). bf16 is picked only when it measures at least as
fast as fp32 (one core each; emulated bf16 is ~100x slower, native bf16 4-8x faster, so the rule is
far from noise).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
# Each dtype's canonical config string (InternLM's spelling).
CANONICAL = {torch.float32: "torch.float32", torch.bfloat16: "torch.bfloat16", torch.float16: "torch.float16"}
PROBE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Probe: square matmuls of this size, repeated for at least PROBE_MIN_SECONDS per dtype. 256 is
# large enough to leave the per-call overhead behind on a CPU (~0.1 ms in fp32 at 150 GFLOP/s) and
# small enough that an emulated dtype costs ~30 ms per call at ~1 GFLOP/s.
PROBE_SIZE = 256
PROBE_MIN_SECONDS = 0.002
PROBE_WINDOWS = 3
# An explicit half-precision dtype slower than the fastest one by this factor is "emulated" here.
EMULATED_SLOWDOWN = 1.5
# x86 / Arm flags of /proc/cpuinfo that mean bf16 arithmetic in hardware.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class DeviceSpeed:
    """One device's identity, what its runtime reports, and its measured matmul rates."""

    device: str
    """"cpu" or "cuda:N"."""
    name: str
    """CPU model or GPU name."""
    capability: str
    """What the runtime reports: bf16 flags of the CPU, or the GPU's compute capability."""
    reports_native_bf16: bool
    """The runtime's word (CPU flags, or torch.cuda.is_bf16_supported without emulation)."""
    matmul_gflops: dict[str, float] = field(default_factory=dict)
    """Measured matmul rate per dtype on one core (CPU probe; empty on CUDA, where the report decides)."""
    threads: int = 1
    """Threads of the probe."""

    def rate(self, dtype: torch.dtype) -> float | None:
        return self.matmul_gflops.get(CANONICAL[dtype])

    @property
    def native_bf16(self) -> bool:
        """bf16 is computed natively: on CPU, measured at least as fast as fp32."""
        if self.device != "cpu":
            return self.reports_native_bf16
        bf16, fp32 = self.rate(torch.bfloat16), self.rate(torch.float32)
        return bf16 is not None and fp32 is not None and bf16 >= fp32

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "name": self.name,
            "capability": self.capability,
            "reports_native_bf16": self.reports_native_bf16,
            "native_bf16": self.native_bf16,
            "matmul_gflops": dict(self.matmul_gflops),
            "threads": self.threads,
        }


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run takes on a device: `name` is a key of model.config.DTYPES."""

    requested: str
    name: str
    reason: str
    warning: str | None = None

    def describe(self) -> str:
        return f"{self.requested} -> {self.name} ({self.reason})"

    def log_line(self) -> str:
        return f"dtype {self.describe()}"


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    """The bf16 flags /proc/cpuinfo lists for the first CPU (x86 `flags`, Arm `Features`)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return [flag for flag in BF16_CPU_FLAGS if flag in value.split()]
    return []


def measure_matmul_gflops(
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    size: int = PROBE_SIZE,
    min_seconds: float = PROBE_MIN_SECONDS,
    windows: int = PROBE_WINDOWS,
) -> float:
    """GFLOP/s of `size` x `size` matmuls in `dtype` on `device`: the best of `windows` windows of
    calls lasting `min_seconds` each (another process taking the core for a moment spoils one
    window, not the figure). After a warm-up call, two single calls both slower than
    3 x min_seconds are the measurement: the dtype is emulated (~30 ms a call), and more calls would
    only cost as much again."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device).to(dtype)
    b = torch.randn(size, size, generator=generator, device=device).to(dtype)
    flops = 2.0 * size**3

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # One call at the probe's shape first: the math library's one-time set-up (thread pool, and
    # oneDNN building its kernel for a new shape: ~100x a native bf16 call) must not look like an
    # emulated dtype.
    torch.mm(a, b)
    synchronize()
    singles = []
    for _ in range(2):  # two: another process taking the core for one call spoils only one
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize()
        singles.append(time.perf_counter() - started)
    if min(singles) >= 3 * min_seconds:
        return flops / min(singles) / 1e9
    best = flops / min(singles)
    for _ in range(windows):
        calls, started = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            calls += 1
            synchronize()
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                break
        best = max(best, calls * flops / elapsed)
    return best / 1e9


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _cpu_speed() -> DeviceSpeed:
    flags = cpu_bf16_flags()
    # One thread: the dtype decision needs each dtype's rate on a core, and a single thread is
    # immune to what spoils multi-threaded figures on a busy 2-core machine (an OpenMP team
    # waiting for a core that another process holds: 4 GFLOP/s measured instead of ~280).
    with _one_thread():
        rates = {CANONICAL[dtype]: round(measure_matmul_gflops(dtype), 1) for dtype in PROBE_DTYPES}
    return DeviceSpeed(
        device="cpu",
        name=cpu_model_name(),
        capability=" ".join(flags) if flags else "no bf16 flags",
        reports_native_bf16=bool(flags),
        matmul_gflops=rates,
        threads=1,
    )


@functools.lru_cache(maxsize=8)
def _cuda_speed(index: int) -> DeviceSpeed:
    major, minor = torch.cuda.get_device_capability(index)
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation
        native = torch.cuda.is_bf16_supported()
    return DeviceSpeed(
        device=f"cuda:{index}",
        name=torch.cuda.get_device_name(index),
        capability=f"sm_{major}{minor}",
        reports_native_bf16=native,
        threads=torch.get_num_threads(),
    )


def device_speed(device: torch.device | str = "cpu") -> DeviceSpeed:
    """What `device` computes fast (measured once per process)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_speed(device.index if device.index is not None else torch.cuda.current_device())
    if device.type != "cpu":
        raise ValueError(f"no speed model for device type {device.type!r}")
    return _cpu_speed()


def default_device() -> torch.device:
    """The device a run on this machine trains on."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def choose_dtype(
    requested: str, device: torch.device | str = "cpu", speed: DeviceSpeed | None = None
) -> DtypeChoice:
    """The dtype `model.dtype=requested` trains in on `device` (or on the device `speed` describes):
    "auto" picks the fastest the device computes natively; an explicit dtype is honoured, with a
    warning when the device emulates it."""
    from train_kernel.model.config import DTYPES

    speed = speed if speed is not None else device_speed(device)
    if requested == AUTO:
        return _choose_auto(speed)
    dtype = DTYPES[requested]
    warning = _emulation_warning(requested, dtype, speed)
    return DtypeChoice(requested=requested, name=requested, reason="given in the config", warning=warning)


def _choose_auto(speed: DeviceSpeed) -> DtypeChoice:
    if speed.device != "cpu":
        if speed.native_bf16:
            return DtypeChoice(AUTO, "torch.bfloat16", f"{speed.name} ({speed.capability}) computes bf16")
        return DtypeChoice(
            AUTO, "torch.float16", f"{speed.name} ({speed.capability}) has no bf16; fp16 with the loss scaler"
        )
    bf16, fp32 = speed.rate(torch.bfloat16), speed.rate(torch.float32)
    figures = f"bf16 matmul {bf16:.1f} GFLOP/s vs fp32 {fp32:.1f} per core; CPU flags: {speed.capability}"
    return DtypeChoice(AUTO, "torch.bfloat16" if speed.native_bf16 else "torch.float32", figures)


def _emulation_warning(name: str, dtype: torch.dtype, speed: DeviceSpeed) -> str | None:
    if dtype == torch.float32:
        return None
    if speed.device != "cpu":
        if dtype == torch.bfloat16 and not speed.native_bf16:
            return (
                f"model.dtype {name}: {speed.name} ({speed.capability}) emulates bf16 and runs it slowly; "
                f"model.dtype='auto' picks torch.float16 with the loss scaler"
            )
        return None
    rate = speed.rate(dtype)
    best_name, best = max(speed.matmul_gflops.items(), key=lambda item: item[1])
    if rate is None or rate * EMULATED_SLOWDOWN > best:
        return None
    auto = _choose_auto(speed).name
    return (
        f"model.dtype {name}: this CPU emulates it (matmul {rate:.1f} GFLOP/s vs {best_name} {best:.1f}, "
        f"{best / rate:.0f}x slower); model.dtype='auto' picks {auto} here"
    )


__all__ = [
    "AUTO",
    "DeviceSpeed",
    "DtypeChoice",
    "choose_dtype",
    "cpu_bf16_flags",
    "cpu_model_name",
    "default_device",
    "device_speed",
    "measure_matmul_gflops",
]
