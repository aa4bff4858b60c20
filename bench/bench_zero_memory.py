"""Per-rank optimizer memory of the ZeRO-1 optimizer, zero1 = k for k in 1, 2, 4 (real gloo process
groups of k ranks on this machine).

Optimizer memory = the bytes of the fp32 master slice, its fp32 gradient and the two Adam moments
that a rank holds after one step (counted from the tensors themselves: exact, not sampled).
Target (issue 4): with zero1 = k, <= (1/k + 2%) of the unpartitioned optimizer's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from bench.common import ROOT, save_result

SIZES = [int(k) for k in os.environ.get("BENCH_ZERO_SIZES", "1,2,4").split(",")]

RANK_PROGRAM = r"""
import json, os, torch, torch.distributed as dist
from train_kernel.model import build_model
from train_kernel.model.config import ModelConfig
from train_kernel.optim.hybrid_adamw import AdamSettings
from train_kernel.optim.loss_scaler import DynamicLossScaler
from train_kernel.optim.zero import ZeroOptimizer
world = int(os.environ["WORLD_SIZE"]); rank = int(os.environ["RANK"])
group = None
if world > 1:
    dist.init_process_group("gloo")
    group = dist.new_group(list(range(world)))
config = ModelConfig(num_layers=8, hidden_size=512, num_attention_heads=8, mlp_ratio=8 / 3, vocab_size=32000,
                     dtype="torch.bfloat16")
model = build_model(config, "cpu")
optimizer = ZeroOptimizer(list(model.parameters()), AdamSettings(), DynamicLossScaler(enabled=False), 1.0,
                          data_group=group, data_size=world, zero_group=group, zero_ranks=list(range(world)),
                          zero_rank=rank)
for p in model.parameters():
    p.grad = torch.randn_like(p)
optimizer.step(lr=1e-4, beta2=0.95)
inner = optimizer.inner
tensors = [inner.master, inner.master.grad] + [t for state in inner.optimizer.state.values()
                                               for t in state.values()
                                               if torch.is_tensor(t) and t.numel() > 1]
print(json.dumps({"rank": rank, "optimizer_bytes": sum(t.numel() * t.element_size() for t in tensors),
                  "parameters": sum(p.numel() for p in model.parameters())}))
if world > 1:
    dist.barrier()  # NOTE: no rank tears the group down while another still uses it
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(world: int) -> list[dict]:
    port = _free_port()
    processes = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_PROGRAM], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
            )
        )
    rows = []
    for process in processes:
        output, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"a rank failed ({process.returncode}): {output}")
        rows.append(json.loads(output.strip().splitlines()[-1]))
    return rows


def main() -> dict:
    results = {world: measure(world) for world in SIZES}
    full = max(r["optimizer_bytes"] for r in results[SIZES[0]])
    table = []
    for world, rows in results.items():
        largest = max(r["optimizer_bytes"] for r in rows)
        table.append(
            {
                "zero1": world,
                "max_rank_optimizer_mib": round(largest / 2**20, 2),
                "fraction_of_unpartitioned": round(largest / full, 5),
                "target": round(1 / world + 0.02, 5),
            }
        )
    result = {
        "parameters": results[SIZES[0]][0]["parameters"],
        "unpartitioned_optimizer_mib": round(full / 2**20, 2),
        "runs": table,
    }
    save_result("zero_memory", result)
    return result


if __name__ == "__main__":
    main()
