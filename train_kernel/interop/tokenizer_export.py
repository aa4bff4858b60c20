"""The tokenizer of an exported Hugging Face folder, so that `AutoTokenizer.from_pretrained(folder)`
works on it: a tokenizers JSON file becomes tokenizer.json (PreTrainedTokenizerFast), a
SentencePiece model becomes tokenizer.model (LlamaTokenizer); tokenizer_config.json names the
special tokens, and config.json gets their ids.

Which tokenizer: the one given, else the one the run's packed data was made with (pack-stage's
manifest.json records its path and sha256), found through the checkpoint's config.py ->
data.train_folder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tokenize_stage.text_tokenizers import TokenizerIdentity, file_sha256, load_tokenizer

log = logging.getLogger(__name__)


def identity_from_run_config(config_file: Path) -> tuple[TokenizerIdentity | None, str]:
    """(the tokenizer the run's training data names, or None with the reason)."""
    from pack_stage.schema import PackManifest
    from train_kernel.config import load_config

    try:
        config = load_config(config_file)
    except Exception as error:  # any failure only means: not known from here
        return None, f"the checkpoint's config.py does not load here ({error})"
    folder = config.data.train_folder
    if not folder:
        return None, "the run's config has no data.train_folder"
    try:
        manifest = PackManifest.load(folder)
    except Exception as error:
        return None, f"{folder} has no readable pack manifest ({error})"
    return manifest.tokenizer, f"from {manifest.path}"


def write_tokenizer(identity: TokenizerIdentity, out_dir: Path, max_length: int) -> str:
    """Copies the tokenizer into out_dir; returns what was done (or why not) as one line."""
    if identity.kind == "byte" or identity.path is None:
        return "tokenizer not copied: the byte-level tokenizer has no Hugging Face counterpart"
    source = Path(identity.path)
    if not source.is_file():
        return f"tokenizer not copied: {source} does not exist here (pass --tokenizer)"
    if identity.sha256 and file_sha256(source) != identity.sha256:
        return f"tokenizer not copied: {source} changed since the data was made (sha256 differs)"
    tokens = _special_tokens(identity, source)
    settings: dict = {"model_max_length": max_length, **tokens}
    if identity.kind == "hf":
        shutil.copyfile(source, out_dir / "tokenizer.json")
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        shutil.copyfile(source, out_dir / "tokenizer.model")
        # The data were tokenized without BOS/EOS added; the tokenizer adds none either.
        settings.update(
            tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False, legacy=False
        )
    (out_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    _set_token_ids(out_dir / "config.json", identity)
    return f"tokenizer {source} copied"


def identity_of_file(path: Path) -> TokenizerIdentity:
    return load_tokenizer(path).identity


def _special_tokens(identity: TokenizerIdentity, source: Path) -> dict[str, str]:
    tokenizer = load_tokenizer(source)
    named = {"bos_token": identity.bos_id, "eos_token": identity.eos_id, "pad_token": identity.pad_id}
    return {name: tokenizer.token_piece(token_id) for name, token_id in named.items() if token_id is not None}


def _set_token_ids(config_path: Path, identity: TokenizerIdentity) -> None:
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(bos_token_id=identity.bos_id, eos_token_id=identity.eos_id, pad_token_id=identity.pad_id)
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
