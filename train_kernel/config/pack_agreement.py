"""data.min_length and data.pack_sample_into_one against the packed data they describe.

Both are decided when pack_stage packs the data (which documents are dropped, whether a row is one
sequence); the trainer only reads the result. A config that says otherwise than the manifest would be
accepted and then silently not applied, so the disagreement is an error naming the key and the
manifest's value.
"""

from __future__ import annotations

from pathlib import Path

from train_kernel.config.errors import ConfigError
from train_kernel.config.sections import DataConfig

CHECKED_KEYS = ("min_length", "pack_sample_into_one")


def _manifest(folder: str):
    """The pack manifest of `folder`, or None when there is none to compare with (no such folder yet,
    a folder that pack_stage did not write, e.g. InternLM's tokenized folders that the trainer packs
    with the config's own values; a damaged manifest, which the trainer reports when it reads it)."""
    from pack_stage.schema import MANIFEST_NAME, PackedDataError, PackManifest

    if not (Path(folder) / MANIFEST_NAME).is_file():
        return None
    try:
        return PackManifest.load(folder)
    except (PackedDataError, KeyError, TypeError, ValueError, OSError):
        return None


def check_pack_agreement(data: DataConfig) -> None:
    """Raises ConfigError (key data.<name>) when train_folder's or valid_folder's manifest was packed
    with another min_length or pack_sample_into_one than the config says."""
    folders = dict.fromkeys(folder for folder in (data.train_folder, data.valid_folder) if folder)
    for folder in folders:
        manifest = _manifest(folder)
        if manifest is None:
            continue
        for name in CHECKED_KEYS:
            ours, theirs = getattr(data, name), getattr(manifest, name)
            if ours != theirs:
                raise ConfigError(
                    f"{ours!r}, but {manifest.path} was packed with {name}={theirs!r}: set "
                    f"data.{name}={theirs!r} or pack the data again with the config's value",
                    key=f"data.{name}",
                )
