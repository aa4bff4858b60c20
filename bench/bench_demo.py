"""`make demo` from scratch, timed per phase (prepare, train, export), on this machine's class.

Runs the real `make demo` in a fresh copy of the project's tracked files (sharing this checkout's
.venv), so nothing of an earlier demo is reused. BENCH_DEMO_ISA=avx2 caps oneDNN, ATen and MKL at
AVX2 (ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY / MKL_ENABLE_INSTRUCTIONS): on a CPU with native bf16
this imitates the class without it (bf16 at ~1 GFLOP/s); the result records the probe's rates, so
whether the imitation held is in the figures.

Target (issue 12): the demo prepares and trains in <= 6 minutes on a 2-core machine of either class.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, save_result

AVX2_CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PHASES = re.compile(r"Demo wall time: prepare (\d+) s, train (\d+) s, export (\d+) s")
FINISHED = re.compile(
    r"finished (\d+) steps in (\d+) s: loss ([\d.]+) \(mean of the first \d+ steps\) -> ([\d.]+)"
)
VALID = re.compile(r"validation: step=(\d+) val/loss=([\d.]+)")
CHOICE = re.compile(r"dtype auto -> (\S+) \(([^)]*)\)")


def fresh_copy(target: Path) -> None:
    """The tracked files (mtimes kept, so make sees the .venv as up to date) and a link to .venv."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(
        ["tar", "-cf", str(target / "src.tar"), "--null", "-T", "-"], cwd=ROOT, input=files, check=True
    )
    subprocess.run(["tar", "-xf", "src.tar"], cwd=target, check=True)
    (target / "src.tar").unlink()
    (target / ".venv").symlink_to(ROOT / ".venv")


def probe(env: dict) -> dict:
    """The device probe in a process of its own with the demo's environment (the ISA caps take
    effect when the math libraries start, so this process's own probe would not see them)."""
    code = (
        "import json; from train_kernel.device_speed import device_speed; "
        "print(json.dumps(device_speed().to_json()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def main() -> dict:
    caps = AVX2_CAPS if os.environ.get("BENCH_DEMO_ISA", "").lower() == "avx2" else {}
    env = {**os.environ, **caps}
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    try:
        fresh_copy(work)
        started = time.perf_counter()
        # -o: the copy must never reinstall the shared .venv (an editable install there would point
        # it at the copy, which is deleted afterwards); this checkout's `make install` comes first.
        subprocess.run(["make", "install"], cwd=ROOT, check=True, capture_output=True)
        command = ["make", "-o", ".venv/.installed", "demo"]
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        total = time.perf_counter() - started
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"make demo failed ({result.returncode}):\n{output[-4000:]}")
        log = (work / "runs" / "demo" / "train.log").read_text()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(f"/dev/shm/llm-pretrain-demo-{os.getuid()}", ignore_errors=True)
    prepare, train, export = map(int, PHASES.search(output).groups())
    steps, train_s, loss_first, loss_last = FINISHED.search(log).groups()
    valid = VALID.findall(log)
    choice = CHOICE.search(log)
    figures = {
        "machine": {**probe(env), "isa_caps": caps},
        "dtype": choice.group(1) if choice else None,
        "dtype_reason": choice.group(2) if choice else None,
        "make_demo_s": round(total, 1),
        "phases_s": {"prepare": prepare, "train": train, "export": export},
        "steps": int(steps),
        "train_loop_s": int(train_s),
        "loss_first_10": float(loss_first),
        "loss_last_10": float(loss_last),
        "val_loss_first_last": [float(valid[0][1]), float(valid[-1][1])] if valid else None,
    }
    save_result("demo-avx2" if caps else "demo", figures)
    return figures


if __name__ == "__main__":
    main()
