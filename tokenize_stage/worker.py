"""Tokenizing one work unit into a part file (runs inside a worker process).

A part is complete when its stats file exists: the Arrow file is renamed into place first, then
the stats JSON, each written under a temporary name and renamed. A killed worker leaves only
temporary files, which the next run ignores and overwrites.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokenize_stage.durable import durable_replace, write_json_atomic
from tokenize_stage.readers import DEFAULT_MAX_LINE_BYTES, Blank, Rejected, UnitReader
from tokenize_stage.schema import token_dtype_for
from tokenize_stage.sft import Conversation, encode_conversations, load_template
from tokenize_stage.sources import WorkUnit
from tokenize_stage.text_tokenizers import Tokenizer, load_tokenizer

# A batch is encoded once it holds this many documents or characters: large enough for the
# tokenizer's batch call to pay off, small enough to keep memory flat.
BATCH_DOCUMENTS = 1024
BATCH_CHARACTERS = 4 << 20
# Rejected lines kept with their reason per unit; the count beyond stays exact.
MAX_REJECT_DETAILS = 10_000
# How often a worker process checks that the stage's process is still there.
PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerConfig:
    tokenizer_path: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos: bool
    add_eos: bool
    text_key: str
    whole_file: bool
    strict: bool
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    sft: bool = False  # chat / instruction jsonl, prompt tokens negated (tokenize_stage.sft)
    chat_template: str = "auto"


@dataclass
class UnitStats:
    documents: int = 0
    tokens: int = 0
    empty_documents: int = 0
    blank_lines: int = 0
    lines: int = 0
    rejected: int = 0
    rejects: list[tuple[int, str]] = field(default_factory=list)  # (local line, reason)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> UnitStats:
        data = dict(data)
        data["rejects"] = [tuple(r) for r in data["rejects"]]
        return cls(**data)


class StrictReject(Exception):
    """First bad line under --strict; the runner turns the local line into file:line."""

    def __init__(self, unit: WorkUnit, local_line: int, reason: str) -> None:
        super().__init__(unit, local_line, reason)  # args, so that it pickles across processes
        self.unit = unit
        self.local_line = local_line
        self.reason = reason


_state: dict = {}


def init_worker(config: WorkerConfig, progress: Queue | None) -> None:
    """Pool initializer: one tokenizer per process, loaded once."""
    # The Rust tokenizer must not start its own thread pool inside each worker: the workers
    # are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _state["config"] = config
    _state["tokenizer"] = load_tokenizer(config.tokenizer_path, config.bos_token, config.eos_token)
    _state["progress"] = progress


def init_pool_worker(config: WorkerConfig, progress: Queue | None, stage_pid: int) -> None:
    """Initializer of a worker process: ``init_worker``, and an exit of its own when the stage's
    process is gone. A pool's workers outlive a stage killed alone (kill -9 of its pid, a
    `timeout -s KILL`): they waited forever for work, each holding its tokenizer, and one
    mid-unit went on writing into the output folder while the stage was run again."""
    init_worker(config, progress)
    threading.Thread(target=_exit_with, args=(stage_pid,), name="exit-with-stage", daemon=True).start()


def _exit_with(stage_pid: int) -> None:
    while os.getppid() == stage_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # the stage is gone: nobody will read this worker's results


def part_paths(parts_dir: Path, unit: WorkUnit) -> tuple[Path, Path]:
    base = parts_dir / unit.file.rel / f"{unit.index:06d}"
    return base.with_suffix(".arrow"), base.with_suffix(".json")


def run_unit(unit: WorkUnit, parts_dir: Path) -> UnitStats:
    """Worker entry point: tokenize ``unit`` into its part files and return its stats."""
    return tokenize_unit(unit, parts_dir, _state["config"], _state["tokenizer"], _state["progress"])


def tokenize_unit(
    unit: WorkUnit, parts_dir: Path, config: WorkerConfig, tokenizer: Tokenizer, progress: Queue | None
) -> UnitStats:
    arrow_path, stats_path = part_paths(parts_dir, unit)
    arrow_path.parent.mkdir(parents=True, exist_ok=True)
    encoder = _BatchEncoder(tokenizer, config)
    stats = UnitStats()
    reader = UnitReader(unit, config.text_key, config.whole_file, config.max_line_bytes, config.sft)
    texts: list[str | Conversation] = []
    lines: list[int] = []
    characters = 0
    reported_bytes = 0
    tmp_arrow = arrow_path.with_name(arrow_path.name + f".tmp-{os.getpid()}")
    with pa.OSFile(str(tmp_arrow), "wb") as sink, pa.ipc.new_file(sink, encoder.schema) as writer:

        def flush() -> None:
            nonlocal characters, reported_bytes
            if texts:
                batch = encoder.encode(texts, lines)
                writer.write_batch(batch)
                stats.documents += len(texts)
                stats.tokens += encoder.last_tokens
                stats.empty_documents += sum(1 for t in texts if isinstance(t, str) and not t)
                if progress is not None:
                    progress.put((reader.bytes_read - reported_bytes, len(texts), encoder.last_tokens))
                    reported_bytes = reader.bytes_read
                texts.clear()
                lines.clear()
                characters = 0

        for line, item in reader:
            if isinstance(item, (str, Conversation)):
                texts.append(item)
                lines.append(line)
                characters += len(item) if isinstance(item, str) else item.characters
                if len(texts) >= BATCH_DOCUMENTS or characters >= BATCH_CHARACTERS:
                    flush()
            elif isinstance(item, Rejected):
                if config.strict:
                    raise StrictReject(unit, line, item.reason)
                stats.rejected += 1
                if len(stats.rejects) < MAX_REJECT_DETAILS:
                    stats.rejects.append((line, item.reason))
            elif isinstance(item, Blank):
                stats.blank_lines += 1
        flush()
    stats.lines = reader.lines
    if progress is not None and reader.bytes_read > reported_bytes:
        progress.put((reader.bytes_read - reported_bytes, 0, 0))
    durable_replace(tmp_arrow, arrow_path)
    write_json_atomic(stats_path, {"unit": [unit.start, unit.end], **stats.to_json()})
    return stats


class _BatchEncoder:
    """Texts -> one Arrow record batch of token lists with BOS/EOS, in the shard's dtype."""

    def __init__(self, tokenizer: Tokenizer, config: WorkerConfig) -> None:
        identity = tokenizer.identity
        self.tokenizer = tokenizer
        self.bos = identity.bos_id if config.add_bos else None
        self.eos = identity.eos_id if config.add_eos else None
        self.token_type = token_dtype_for(identity.vocab_size, config.sft)
        self.numpy_type = self.token_type.to_pandas_dtype()
        self.schema = pa.schema([("tokens", pa.list_(self.token_type)), ("line", pa.int64())])
        self.last_tokens = 0
        self.template = load_template(config.chat_template, config.tokenizer_path) if config.sft else None

    def encode(self, texts: list, lines: list[int]) -> pa.RecordBatch:
        if self.template is not None:
            return self._encode_conversations(texts, lines)
        flat, lengths = self.tokenizer.encode_batch(texts)
        extra = (self.bos is not None) + (self.eos is not None)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths + extra, out=offsets[1:])
        values = np.empty(int(offsets[-1]), dtype=self.numpy_type)
        body = np.ones(len(values), dtype=bool)
        if self.bos is not None:
            values[offsets[:-1]] = self.bos
            body[offsets[:-1]] = False
        if self.eos is not None:
            values[offsets[1:] - 1] = self.eos
            body[offsets[1:] - 1] = False
        values[body] = flat
        self.last_tokens = len(values)
        tokens = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
        return pa.record_batch([tokens, pa.array(lines, type=pa.int64())], schema=self.schema)

    def _encode_conversations(self, conversations: list[Conversation], lines: list[int]) -> pa.RecordBatch:
        """Conversations rendered with the chat template; prompt tokens negated (InternLM's SFT
        convention), BOS and EOS as in encode."""
        values, lengths = encode_conversations(
            conversations, self.template, self.tokenizer.encode_batch, self.bos, self.eos
        )
        offsets = np.zeros(len(conversations) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        self.last_tokens = len(values)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(self.numpy_type)))
        return pa.record_batch([tokens, pa.array(lines, type=pa.int64())], schema=self.schema)
