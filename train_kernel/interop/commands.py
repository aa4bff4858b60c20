"""What `train-kernel export-hf` and `train-kernel import-internlm` do, on checkpoints at storage
URIs (local:/path, boto3:s3://bucket/prefix, or a plain path) as `train-kernel checkpoints` reads them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from train_kernel.checkpoint import layout
from train_kernel.checkpoint.locations import Location, open_location
from train_kernel.checkpoint.manifest import CheckpointError, verify_file
from train_kernel.checkpoint.restore import read_manifest
from train_kernel.model.config import AUTO_DTYPE, ModelConfig
from train_kernel.model.hf_interop import export_hf
from train_kernel.model.state_files import is_model_file, load_model_state, write_model_state

from .fetch import local_folder
from .foreign import read_foreign_model
from .tokenizer_export import identity_from_run_config, identity_of_file, write_tokenizer


def export_checkpoint(
    uri: str, out_dir: Path, tokenizer: Path | None = None, max_position_embeddings: int | None = None
) -> list[str]:
    """A checkpoint of this project (a step folder with manifest.json, or a weights-only folder)
    -> a Hugging Face Llama folder with the tokenizer when known. Files listed in a manifest are
    checked against it (size, sha256) first. Returns lines to print."""
    location = open_location(uri)
    with tempfile.TemporaryDirectory(prefix="export-hf-") as scratch_name:
        scratch = Path(scratch_name)
        folder = _model_folder(location, scratch)
        export_hf(folder, out_dir, max_position_embeddings)
        return [f"exported {uri} -> {out_dir}", _tokenizer(location, out_dir, tokenizer, scratch)]


def _model_folder(location: Location, scratch: Path) -> Path:
    if not location.exists(layout.MANIFEST):
        if not location.exists(layout.MODEL_CONFIG):
            raise FileNotFoundError(
                f"{location.uri}: neither {layout.MANIFEST} nor {layout.MODEL_CONFIG} there: "
                "not a checkpoint folder"
            )
        return local_folder(location, is_model_file, scratch)
    manifest = read_manifest(location)
    names = [name for name in manifest.names() if is_model_file(name)]
    if layout.MODEL_CONFIG not in names:
        raise CheckpointError(f"{location.uri}: the manifest lists no {layout.MODEL_CONFIG}")
    folder = scratch / "model"
    for name in names:
        path = location.fetch(name, folder)
        verify_file(path, manifest.entry(name), location.uri)
    return location.local_path if location.local_path is not None else folder


def _tokenizer(location: Location, out_dir: Path, tokenizer: Path | None, scratch: Path) -> str:
    max_length = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))["max_position_embeddings"]
    if tokenizer is not None:
        return write_tokenizer(identity_of_file(tokenizer), out_dir, max_length)
    if not location.exists(layout.CONFIG):
        return (
            f"tokenizer not copied: {location.uri} has no {layout.CONFIG} naming the data (pass --tokenizer)"
        )
    identity, reason = identity_from_run_config(location.fetch(layout.CONFIG, scratch / "config"))
    if identity is None:
        return f"tokenizer not copied: {reason} (pass --tokenizer)"
    return write_tokenizer(identity, out_dir, max_length)


def import_internlm(uri: str, config: ModelConfig, out_dir: Path) -> ModelConfig:
    """An InternLM checkpoint folder (model_tp*_pp*.pt) -> a weights-only folder of this project
    (model_tp0_pp0.safetensors + model_config.json) that load_ckpt_info / load_model_only_folder
    and export-hf read."""
    if config.dtype == AUTO_DTYPE:
        raise ValueError(
            "model.dtype is 'auto', which a run resolves on its device; name the dtype to write, "
            "e.g. --set model.dtype=torch.bfloat16"
        )
    location = open_location(uri)
    with tempfile.TemporaryDirectory(prefix="import-internlm-") as scratch:
        state = read_foreign_model(location, "internlm", config, Path(scratch))
    write_model_state(config, state, out_dir)
    load_model_state(out_dir)  # checks keys and shapes against the config
    return config
