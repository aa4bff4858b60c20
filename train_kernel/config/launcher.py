"""How a run learns its rank: InternLM's launchers (slurm, torch) and a single local process, all
turned into torch's env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) so
that the trainer initialises process groups one way.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Mapping

from train_kernel.config.errors import ConfigError

LAUNCHERS = ("local", "torch", "slurm")
DEFAULT_PORT = 8888  # InternLM's --port default
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(ConfigError):
    """The launcher's environment is missing something the run needs."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "node-[3,5-7],gpu9" -> "node-3" (zero padding kept)."""
    if shutil.which("scontrol"):
        try:
            result = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            hosts = result.stdout.split()
            if hosts:
                return hosts[0]
        except (subprocess.SubprocessError, OSError):
            pass
    match = re.match(r"^([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if match is None or not match.group(1) and not match.group(2):
        raise LaunchError(f"cannot read the Slurm node list {nodelist!r}", key="SLURM_JOB_NODELIST")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges, maxsplit=1)[0]


def _need(environ: Mapping[str, str], names: tuple[str, ...], launcher: str) -> dict[str, str]:
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise LaunchError(
            f"--launcher {launcher}: the environment lacks {', '.join(missing)} "
            f"({'start the run with torchrun' if launcher == 'torch' else 'start the run with srun'})"
        )
    return {name: environ[name] for name in names}


def launch_env(launcher: str, port: int | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The env:// variables for this process.

    local: one process (rank 0 of 1) on 127.0.0.1, port `port`, else $MASTER_PORT, else a free one.
    torch: torchrun already set them all; `port` only fills a missing MASTER_PORT.
    slurm: rank/world/local rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, master = the first
           host of the job's node list, port `port` or 8888 (InternLM's default).
    """
    if launcher == "local":
        return {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port if port is not None else environ.get("MASTER_PORT") or _free_port()),
        }
    if launcher == "torch":
        if not environ.get("MASTER_PORT") and port is not None:
            environ = {**environ, "MASTER_PORT": str(port)}
        return _need(environ, ENV_KEYS, launcher)
    if launcher == "slurm":
        found = _need(environ, ("SLURM_PROCID", "SLURM_LOCALID"), launcher)
        world = environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not world or not nodelist:
            raise LaunchError(
                "--launcher slurm: the environment lacks SLURM_NTASKS or SLURM_JOB_NODELIST (use srun)"
            )
        return {
            "RANK": found["SLURM_PROCID"],
            "WORLD_SIZE": world,
            "LOCAL_RANK": found["SLURM_LOCALID"],
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_slurm_host(nodelist),
            "MASTER_PORT": str(port if port is not None else environ.get("MASTER_PORT") or DEFAULT_PORT),
        }
    raise LaunchError(f"unknown launcher {launcher!r}; use one of {', '.join(LAUNCHERS)}")
