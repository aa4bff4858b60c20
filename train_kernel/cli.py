"""`train-kernel`: click commands only (parse, call, print)."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from pack_stage.reader import PackedDataError
from train_kernel.config import ConfigError, TrainConfig, load_config
from train_kernel.config.launcher import LAUNCHERS, launch_env

# User errors: shown as one message, without a traceback. ConfigError covers the layout and launcher errors.
USER_ERRORS = (ConfigError, PackedDataError, FileNotFoundError, NotADirectoryError, FileExistsError)
# The Hugging Face converters report bad input folders as ValueError / KeyError.
CONVERSION_ERRORS = USER_ERRORS + (ValueError, KeyError)
# Reading checkpoints (also from object stores) adds damaged files and storage errors.
CHECKPOINT_ERRORS = CONVERSION_ERRORS + (RuntimeError, OSError)

config_option = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="InternLM Python config file, e.g. configs/7B_sft.py.",
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value (repeatable): data.total_steps=100, model.dtype=torch.bfloat16, "
    "JOB_NAME=x. "
    "The value is read as a Python literal, else taken as a string.",
)


def _load(config_path: Path, overrides: Sequence[str]) -> TrainConfig:
    try:
        return load_config(config_path, overrides)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error


def _call(
    function: Callable[..., Any], *args: Any, user_errors: tuple[type[BaseException], ...] = USER_ERRORS
) -> Any:
    try:
        return function(*args)
    except user_errors as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise click.ClickException(str(message)) from error


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Train InternLM-family models from InternLM config files."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@config_option
@set_option
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default="local",
    show_default=True,
    help="local: one process; torch: started by torchrun; slurm: started by srun (as InternLM's --launcher).",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Master port [local: free port; slurm: 8888]."
)
@click.option(
    "--profiling",
    is_flag=True,
    help="Torch profiler trace of health.profile_steps and memory per step into <run_dir>/profile/ "
    "(as InternLM's --profiling; sets health.profiling=True).",
)
def run(
    config_path: Path, overrides: tuple[str, ...], launcher: str, port: int | None, profiling: bool
) -> None:
    """Train with the config --config."""
    # A rank that dies in native code (SIGSEGV, SIGABRT from C++, SIGFPE) prints every thread's
    # Python stack first, so a multi-rank job's failure says where it was.
    try:
        faulthandler.enable()
    except (OSError, ValueError, AttributeError):  # stderr without a file descriptor (embedded use)
        pass
    config = _load(config_path, (*overrides, *(["health.profiling=True"] if profiling else [])))
    env = _call(launch_env, launcher, port, os.environ)
    os.environ.update(env)
    from train_kernel.train.trainer import train

    _call(train, config)


@main.command()
@config_option
@set_option
@click.option(
    "--world-size",
    type=click.IntRange(min=1),
    default=None,
    help="Ranks of the job [default: tensor x pipeline x max(zero1, 1)].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--gpus", type=click.IntRange(min=1), default=None, help="Also propose layouts for this many GPUs."
)
@click.option(
    "--gpu-memory-gib", type=click.FloatRange(min=1), default=80.0, show_default=True, help="With --gpus."
)
def plan(
    config_path: Path,
    overrides: tuple[str, ...],
    world_size: int | None,
    as_json: bool,
    gpus: int | None,
    gpu_memory_gib: float,
) -> None:
    """Parameters, parallel layout, ZeRO-1 partition, memory and communication per rank and FLOPs
    per step of --config; with --gpus, the layouts that fit those GPUs, best first."""
    from train_kernel.plan import make_plan, render
    from train_kernel.plan_layouts import propose_layouts, render_proposals

    config = _load(config_path, overrides)
    result = _call(make_plan, config, world_size)
    proposals = None if gpus is None else propose_layouts(config, gpus, int(gpu_memory_gib * 2**30))
    if as_json:
        body = result.to_json()
        if proposals is not None:
            body["proposals"] = [p.to_json() for p in proposals]
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(render(result))
    if proposals is not None:
        click.echo(render_proposals(proposals, gpus, int(gpu_memory_gib * 2**30)))


@main.command("export-hf")
@click.option(
    "--ckpt",
    "ckpt",
    required=True,
    help="Checkpoint folder (one step, or a weights-only folder): local:/path, boto3:s3://bucket/prefix "
    "or a path.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for the Hugging Face model.",
)
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Tokenizer file (tokenizer.json or a SentencePiece model) [default: the one the run's packed "
    "data names].",
)
@click.option(
    "--max-position-embeddings",
    type=click.IntRange(min=1),
    default=None,
    help="Written into config.json [default: model.max_position_embeddings].",
)
def export_hf(ckpt: str, out_dir: Path, tokenizer: Path | None, max_position_embeddings: int | None) -> None:
    """Convert a checkpoint into a Hugging Face model folder (weights, config and tokenizer)."""
    from train_kernel.interop.commands import export_checkpoint

    lines = _call(
        export_checkpoint, ckpt, out_dir, tokenizer, max_position_embeddings, user_errors=CHECKPOINT_ERRORS
    )
    for line in lines:
        click.echo(line)


@main.command("import-hf")
@click.option(
    "--hf", "hf_dir", required=True, type=click.Path(path_type=Path), help="Hugging Face model folder."
)
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Checkpoint folder to write."
)
@click.option(
    "--model-type",
    type=click.Choice(["INTERNLM", "LLAMA2"]),
    default="INTERNLM",
    help="The config's model_type: LLAMA2 keeps a model without attention biases so (model.no_bias); "
    "INTERNLM gives it zero biases.",
)
def import_hf(hf_dir: Path, out_dir: Path, model_type: str) -> None:
    """Convert a Hugging Face Llama / InternLM model folder (safetensors or pytorch_model*.bin,
    grouped-query attention included) into a checkpoint to start from."""
    from train_kernel.model.hf_interop import import_hf as function

    _call(function, hf_dir, out_dir, model_type, user_errors=CONVERSION_ERRORS)
    click.echo(f"imported {hf_dir} -> {out_dir}")


@main.command("import-internlm")
@click.option(
    "--ckpt",
    "ckpt",
    required=True,
    help="InternLM checkpoint folder (model_tp*_pp*.pt): local:/path, boto3:s3://bucket/prefix or a path.",
)
@config_option
@set_option
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Checkpoint folder to write."
)
def import_internlm(ckpt: str, config_path: Path, overrides: tuple[str, ...], out_dir: Path) -> None:
    """Convert an InternLM checkpoint folder (any tensor and pipeline parallel size) into a checkpoint
    to start from (load_ckpt_info=dict(path=OUT, content=("model",))); --config gives the model."""
    from train_kernel.interop.commands import import_internlm as function

    config = _load(config_path, overrides)
    _call(function, ckpt, config.model, out_dir, user_errors=CHECKPOINT_ERRORS)
    click.echo(f"imported {ckpt} -> {out_dir}")


@main.command("checkpoints")
@click.argument("folder")
@click.option(
    "--verify", is_flag=True, help="Also check every file's sha256 against the manifest (reads it all)."
)
def checkpoints(folder: str, verify: bool) -> None:
    """List the checkpoints of a save folder (local:/path, boto3:s3://bucket/prefix or a path):
    step, complete / incomplete / damaged, size, the layout that wrote it, and the one auto_resume
    would take."""
    from train_kernel.checkpoint.inventory import format_inventory, inventory

    entries = _call(inventory, folder, verify)
    click.echo(format_inventory(entries))
    if any(entry.state == "damaged" for entry in entries):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
