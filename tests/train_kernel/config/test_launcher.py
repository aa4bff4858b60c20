"""`--launcher local|torch|slurm` turned into torch's env:// variables."""

from __future__ import annotations

import pytest

from train_kernel.config.launcher import LaunchError, first_slurm_host, launch_env


def test_local_is_one_process_on_a_free_or_given_port():
    env = launch_env("local", None, {})
    assert {key: env[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }
    assert 0 < int(env["MASTER_PORT"]) < 65536
    assert launch_env("local", 29555, {})["MASTER_PORT"] == "29555"


def test_torch_takes_torchrun_variables():
    environ = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    assert launch_env("torch", 1234, environ) == environ  # torchrun's port stays
    with pytest.raises(LaunchError, match="lacks RANK, WORLD_SIZE.*torchrun"):
        launch_env("torch", None, {})


def test_slurm_variables_and_master_host():
    environ = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu-[07,09-10]",
    }
    env = launch_env("slurm", None, environ)
    assert env["RANK"] == "9" and env["WORLD_SIZE"] == "16" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_PORT"] == "8888"
    assert env["MASTER_ADDR"] == "gpu-07"
    with pytest.raises(LaunchError, match="srun"):
        launch_env("slurm", None, {})


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("SH-IDC1-10-140-1-110", "SH-IDC1-10-140-1-110"), ("node[003-004,8]", "node003"), ("a1,b2", "a1")],
)
def test_first_slurm_host(nodelist, first, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert first_slurm_host(nodelist) == first
