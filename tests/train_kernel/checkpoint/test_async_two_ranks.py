"""Async checkpoints of a two-rank job (data 2, ZeRO over both): on one node both ranks write into
the spool and rank 0 hands one job to its private uploader; on two nodes (SLURMD_NODENAME differs)
each node's first rank runs its own uploader, the second node's job ends with a part marker listing
its files, and rank 0's job (manifest of every file, then the step marker) goes last. Either way
no rank waits for an upload, the checkpoint is complete, and it resumes to the same losses."""

from __future__ import annotations

import json

import pytest

from tests.train_kernel.checkpoint.helpers import config_text, train_records
from tests.train_kernel.parallel.launch import RankResult, free_port
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train

pytestmark = [pytest.mark.distributed, pytest.mark.server]

STEPS = 4


def _run_two_ranks(config_file, node_names):
    import os
    import subprocess
    import sys

    port = free_port()
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "SLURMD_NODENAME": node_names[rank],
        }
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "train_kernel.cli",
                    "run",
                    "--launcher",
                    "torch",
                    "--config",
                    str(config_file),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    for rank, process in enumerate(processes):
        output, _ = process.communicate(timeout=120)
        results.append(RankResult(rank, process.returncode, output))
    return results


@pytest.mark.parametrize("nodes", [("node-a", "node-a"), ("node-a", "node-b")], ids=["one-node", "two-nodes"])
def test_async_checkpoint_of_two_ranks_is_complete_and_resumes(tmp_path, nodes):
    run_dir = tmp_path / "run"
    extra = f"\nckpt['async_upload'] = True\nckpt['async_upload_tmp_folder'] = {str(tmp_path / 'spool')!r}\n"
    text = config_text(run_dir, micro_num=2, total_steps=STEPS, checkpoint_every=2, extra=extra)
    config_file = tmp_path / "two.py"
    config_file.write_text(text.replace("parallel = dict(zero1=1)", "parallel = dict(zero1=2)"))
    results = _run_two_ranks(config_file, nodes)
    for result in results:
        assert result.returncode == 0, result.output[-3000:]
    # Both ranks saved asynchronously (nobody uploaded in the training loop)...
    assert "(async): training waited" in results[0].output
    # ...and on two nodes each node's first rank ran an uploader of its own (one journal each).
    journals = sorted(p.name for p in (tmp_path / "spool").glob(".ckpt-uploader-journal*"))
    if len(set(nodes)) == 2:
        assert journals == [".ckpt-uploader-journal-node-a.jsonl", ".ckpt-uploader-journal-node-b.jsonl"]
    else:
        assert journals == [".ckpt-uploader-journal.jsonl"]
    folder = run_dir / "ckpt" / "2"
    manifest = json.loads((folder / "manifest.json").read_text())
    names = {entry["name"] for entry in manifest["files"]}
    assert {"optimizer_tp0_pp0_zo0.pt", "optimizer_tp0_pp0_zo1.pt", "rng_tp0_pp0_dp1.pt"} <= names
    for entry in manifest["files"]:
        assert (folder / entry["name"]).stat().st_size == entry["size"], entry["name"]
    assert (folder / "2.step").exists()
    parts = sorted(p.name for p in folder.glob("*.part.step"))
    assert parts == ([] if len(set(nodes)) == 1 else ["node1-2.part.step"])
    # One process resumes the two-rank checkpoint (micro_num doubled: the same global batch).
    resumed = tmp_path / "resumed"
    train(
        config_from_text(
            config_text(
                resumed,
                micro_num=4,
                total_steps=STEPS,
                extra=f"\nckpt['load_ckpt_folder'] = 'local:{folder}'\n",
            )
        )
    )
    want = {r["step"]: r["loss"] for r in train_records(run_dir)}
    for record in train_records(resumed):
        assert record["loss"] == pytest.approx(want[record["step"]], rel=1e-5)
