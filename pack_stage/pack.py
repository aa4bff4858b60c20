"""The pack run: token folder -> plan -> rows, block by block -> parts, documents, manifest."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pack_stage.finished import same_finished_pack
from pack_stage.internlm_folder import (
    convert_internlm_folder,
    discover_bin_files,
    fingerprint,
    is_internlm_folder,
)
from pack_stage.plan import SplitPlan, plan_documents
from pack_stage.rows import RowBuilder
from pack_stage.schema import MANIFEST_NAME, TOKENS_DIR, PackManifest, PartInfo, SplitInfo
from pack_stage.sources import TokenCorpus
from pack_stage.writer import SplitWriter, open_documents, prepare_output, write_json_atomic
from tokenize_stage.schema import ManifestError, TokenizerIdentity, TokenManifest

logger = logging.getLogger(__name__)

# InternLM's DEFAULT_SEED.
DEFAULT_SEED = 1024
# Tokens built per block: large enough that per-block work is noise, small enough that the block's
# buffers (about 20 bytes a token while it is built) stay a few tens of MB whatever the corpus size.
BLOCK_TOKENS = 1 << 21
# Documents per batch of documents.arrow (and per step of the per-type counts).
DOCUMENT_CHUNK = 1 << 16
# Default part size, about 1 GiB on disk (9 bytes a token).
PART_BYTES = 1 << 30


class PackError(ValueError):
    """A pack that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class PackConfig:
    """What `pack-stage run` takes; the CLI help says the same."""

    input: Path  # a finished tokenize-stage folder (with its manifest.json)
    output: Path  # the pack output folder; must be empty unless `overwrite`
    seq_len: int  # tokens per sequence: no segment is longer
    micro_bsz: int  # sequences per packed row: packed_length = micro_bsz * seq_len
    pack_sample_into_one: bool = False  # fixed seq_len segments that cross documents
    min_length: int = 0  # documents with fewer tokens are dropped (empty ones always are)
    valid_fraction: float = 0.0  # share of the kept documents that go to the valid split
    seed: int = DEFAULT_SEED  # seeds the valid split choice and the shuffle
    shuffle: bool = True  # False: the token manifest's document order
    overwrite: bool = False  # replace a previous pack output in `output`
    rows_per_part: int | None = None  # rows per part file; None: parts of about PART_BYTES

    @property
    def packed_length(self) -> int:
        return self.seq_len * self.micro_bsz

    def validate(self) -> None:
        if self.seq_len < 1:
            raise PackError(f"--seq-len must be at least 1 (got {self.seq_len})")
        if self.micro_bsz < 1:
            raise PackError(f"--micro-bsz must be at least 1 (got {self.micro_bsz})")
        if self.packed_length >= 1 << 31:
            raise PackError(f"packed_length {self.packed_length} does not fit int32 cu_seqlens")
        if self.min_length < 0:
            raise PackError(f"--min-length must be 0 or more (got {self.min_length})")
        if not 0 <= self.valid_fraction < 1:
            raise PackError(f"--valid-fraction must be in [0, 1) (got {self.valid_fraction})")
        if not 0 <= self.seed < 1 << 32:
            raise PackError(f"--seed must be in [0, 2**32) (got {self.seed})")
        if self.rows_per_part is not None and self.rows_per_part < 1:
            raise PackError(f"--rows-per-part must be at least 1 (got {self.rows_per_part})")
        if self.input.resolve() == self.output.resolve():
            raise PackError(f"--output {self.output} is the token folder itself; choose another folder")

    def part_rows(self) -> int:
        return self.rows_per_part or max(1, PART_BYTES // (9 * self.packed_length))


def pack(
    config: PackConfig, progress: bool = True, tokenizer: TokenizerIdentity | None = None
) -> PackManifest:
    """Packs ``config.input``: a tokenize-stage folder, or a folder of InternLM's ``*.bin`` /
    ``*.bin.meta`` files, which is first converted into ``<output>/tokens/`` (``tokenizer``, when
    given, is recorded for it; tokenize-stage folders name their own)."""
    config.validate()
    if is_internlm_folder(config.input):
        return _pack_internlm_folder(config, progress, tokenizer)
    return _pack_token_folder(config, progress)


def _pack_internlm_folder(
    config: PackConfig, progress: bool, tokenizer: TokenizerIdentity | None
) -> PackManifest:
    tokens = config.output / TOKENS_DIR
    if not config.overwrite and _same_source(config.input, tokens, tokenizer):
        finished = same_finished_pack(replace(config, input=tokens), _sha256(tokens / MANIFEST_NAME))
        if finished is not None:
            logger.info("%s already holds this pack (same input and settings): nothing to do", config.output)
            return finished
    prepare_output(config.output, config.overwrite)
    logger.info("reading the InternLM data folder %s into the token folder %s", config.input, tokens)
    convert_internlm_folder(config.input, tokens, tokenizer)
    return _pack_token_folder(replace(config, input=tokens), progress, output_ready=True)


def _same_source(folder: Path, tokens: Path, tokenizer: TokenizerIdentity | None) -> bool:
    """Whether ``tokens`` was converted from ``folder`` as it is now (names, sizes, mtimes)."""
    try:
        manifest = TokenManifest.load(tokens)
    except (ManifestError, KeyError, TypeError):
        return False
    same_tokenizer = tokenizer is None or manifest.tokenizer == tokenizer
    return same_tokenizer and manifest.settings.get("source_files") == fingerprint(discover_bin_files(folder))


def _pack_token_folder(config: PackConfig, progress: bool, output_ready: bool = False) -> PackManifest:
    token_manifest = TokenManifest.load(config.input)
    token_manifest_sha256 = _sha256(config.input / MANIFEST_NAME)
    if not config.overwrite and not output_ready:
        finished = same_finished_pack(config, token_manifest_sha256)
        if finished is not None:
            logger.info("%s already holds this pack (same input and settings): nothing to do", config.output)
            return finished
    corpus = TokenCorpus(token_manifest)
    try:
        plan = plan_documents(
            corpus.lengths,
            min_length=config.min_length,
            valid_fraction=config.valid_fraction,
            seed=config.seed,
            shuffle=config.shuffle,
        )
        for split in plan.splits:
            if split.name == "train" and split.documents == 0:
                raise PackError(
                    f"no documents left to pack from {config.input}: {len(corpus)} documents, "
                    f"{plan.dropped_documents} dropped as empty or shorter than --min-length "
                    f"{config.min_length}, {len(corpus) - plan.dropped_documents} sent to valid"
                )
            if split.documents == 0:
                logger.warning("the %s split is empty: raise --valid-fraction", split.name)
        if not output_ready:
            prepare_output(config.output, config.overwrite)
        total_rows = sum(s.rows(config.packed_length) for s in plan.splits)
        bar = tqdm(total=total_rows, unit="row", disable=not progress, dynamic_ncols=True)
        started = time.perf_counter()
        splits = {}
        with bar:
            for split in plan.splits:
                splits[split.name] = _pack_split(config, corpus, token_manifest, split, bar, started)
        tokens = sum(s.tokens for s in splits.values())
        padding = sum(s.padding_tokens for s in splits.values())
        manifest = PackManifest(
            folder=config.output,
            seq_len=config.seq_len,
            micro_bsz=config.micro_bsz,
            packed_length=config.packed_length,
            pack_sample_into_one=config.pack_sample_into_one,
            min_length=config.min_length,
            seed=config.seed,
            shuffle=config.shuffle,
            valid_fraction=config.valid_fraction,
            tokenizer=token_manifest.tokenizer,
            token_manifest_folder=str(config.input.resolve()),
            token_manifest_sha256=token_manifest_sha256,
            types=dict(token_manifest.types),
            input_files=tuple(entry.path for entry in token_manifest.files),
            splits=splits,
            dropped_documents=plan.dropped_documents,
            dropped_tokens=plan.dropped_tokens,
            padding_fraction=padding / (tokens + padding) if tokens + padding else 0.0,
        )
        write_json_atomic(config.output / MANIFEST_NAME, manifest.to_json())
        elapsed = time.perf_counter() - started
        logger.info(
            "packed %d tokens into %d rows in %.1f s (%.1f M tokens/s), padding %.4f%%",
            tokens,
            sum(s.rows for s in splits.values()),
            elapsed,
            tokens / elapsed / 1e6 if elapsed else 0.0,
            100 * manifest.padding_fraction,
        )
        return manifest
    finally:
        corpus.close()


def _pack_split(
    config: PackConfig,
    corpus: TokenCorpus,
    token_manifest: TokenManifest,
    split: SplitPlan,
    bar: tqdm,
    started: float,
) -> SplitInfo:
    folder = config.output / split.name
    rows, parts = _write_rows(config, corpus, split, token_manifest.tokenizer.pad_id, folder, bar, started)
    names = {type_id: name for name, type_id in token_manifest.types.items()}
    tokens_per_type, documents_per_type = _write_documents(corpus, split, folder, max(names, default=-1) + 1)
    return SplitInfo(
        rows=rows,
        documents=split.documents,
        tokens=split.tokens,
        padding_tokens=rows * config.packed_length - split.tokens,
        tokens_per_type={name: int(tokens_per_type[i]) for i, name in sorted(names.items())},
        documents_per_type={name: int(documents_per_type[i]) for i, name in sorted(names.items())},
        parts=parts,
    )


def _write_rows(
    config: PackConfig,
    corpus: TokenCorpus,
    split: SplitPlan,
    pad_id: int,
    folder: Path,
    bar: tqdm,
    started: float,
) -> tuple[int, tuple[PartInfo, ...]]:
    builder = RowBuilder(
        corpus,
        split,
        seq_len=config.seq_len,
        micro_bsz=config.micro_bsz,
        pack_sample_into_one=config.pack_sample_into_one,
        pad_id=pad_id,
    )
    writer = SplitWriter(folder, builder.schema)
    part_rows = config.part_rows()
    block_rows = max(1, min(part_rows, BLOCK_TOKENS // config.packed_length))
    for part_start in range(0, builder.rows, part_rows):
        writer.start_part()
        part_end = min(part_start + part_rows, builder.rows)
        for first in range(part_start, part_end, block_rows):
            block = builder.build(first, min(block_rows, part_end - first))
            writer.write(block.to_record_batch(builder.schema))
            bar.update(block.rows)
            rate = bar.n * config.packed_length / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{rate / 1e6:.1f}M tok/s", refresh=False)
    writer.finish_part()
    return builder.rows, tuple(writer.parts)


def _write_documents(
    corpus: TokenCorpus, split: SplitPlan, folder: Path, type_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Writes documents.arrow; returns tokens and documents per type id."""
    tokens_per_type = np.zeros(type_count, dtype=np.int64)
    documents_per_type = np.zeros(type_count, dtype=np.int64)
    with open_documents(folder) as documents:
        # In chunks, so that these per-document columns never exist for the whole split at once.
        for start in range(0, split.documents, DOCUMENT_CHUNK):
            docs = split.docs[start : start + DOCUMENT_CHUNK]
            files = corpus.doc_file(docs)
            lengths = corpus.doc_lengths(docs)
            documents.write(files, docs - corpus.file_doc_start[files], lengths)
            types = corpus.file_type[files]
            tokens_per_type += np.bincount(types, weights=lengths, minlength=type_count).astype(np.int64)
            documents_per_type += np.bincount(types, minlength=type_count)
    return tokens_per_type, documents_per_type


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
