"""The output folder: refusing or clearing it, writing parts and documents under temporary names,
and the manifest last, so that a killed pack never looks complete."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from pack_stage.durable import durable_replace
from pack_stage.schema import (
    DOCUMENTS_NAME,
    DOCUMENTS_SCHEMA,
    FORMAT,
    MANIFEST_NAME,
    SPLITS,
    TOKENS_DIR,
    PartInfo,
    part_name,
)

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


class OutputError(ValueError):
    """An output folder we must not write into."""


def prepare_output(folder: Path, overwrite: bool) -> None:
    """Makes ``folder`` an empty folder. With ``overwrite`` it first removes a previous pack output,
    but only when every entry in it is one we write; anything else is left alone and refused.
    Without ``overwrite`` it removes only an unfinished pack (ours alone, no manifest)."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} exists and is not a folder")
    entries = sorted(folder.iterdir()) if folder.exists() else []
    if entries:
        foreign = _foreign_entries(folder)
        # A pack killed before its manifest leaves only its own files, none of them usable: the same
        # command run again must finish the job, not ask for --overwrite (a pack may be stopped at
        # any moment and rerun). --overwrite still guards a finished pack.
        unfinished = not foreign and not (folder / MANIFEST_NAME).exists()
        if not overwrite and not unfinished:
            raise OutputError(
                f"output folder {folder} is not empty; pass --overwrite to replace a previous pack output"
            )
        if foreign:
            raise OutputError(
                f"refusing to overwrite {folder}: it holds files a pack does not write "
                f"({', '.join(str(p) for p in foreign[:5])}{', ...' if len(foreign) > 5 else ''})"
            )
        logger.info("removing the %s pack output in %s", "unfinished" if unfinished else "previous", folder)
        # The manifest first: an interrupted removal must not leave a folder that looks complete.
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
        for split in SPLITS:
            shutil.rmtree(folder / split, ignore_errors=True)
        shutil.rmtree(folder / TOKENS_DIR, ignore_errors=True)
        (folder / (MANIFEST_NAME + TMP_SUFFIX)).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)


def _foreign_entries(folder: Path) -> list[Path]:
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("format") != FORMAT:
                return [manifest]
        except (json.JSONDecodeError, AttributeError):
            return [manifest]
    ours = {MANIFEST_NAME, MANIFEST_NAME + TMP_SUFFIX, *SPLITS, TOKENS_DIR}
    folders = {*SPLITS, TOKENS_DIR}
    foreign = [p for p in folder.iterdir() if p.name not in ours or (p.name in folders) != p.is_dir()]
    for split in SPLITS:
        if (folder / split).is_dir():
            foreign += [p for p in (folder / split).iterdir() if not _is_split_file(p)]
    return foreign


def _is_split_file(path: Path) -> bool:
    name = path.name.removesuffix(TMP_SUFFIX)
    is_part = name.startswith("part-") and name.endswith(".arrow") and name[5:-6].isdigit()
    return path.is_file() and (is_part or name == DOCUMENTS_NAME)


class SplitWriter:
    """Writes one split's parts: a part is renamed to its final name once it is closed."""

    def __init__(self, folder: Path, schema: pa.Schema) -> None:
        self.folder = folder
        self.schema = schema
        self.parts: list[PartInfo] = []
        self._sink: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rows = 0
        folder.mkdir(parents=True, exist_ok=True)

    def start_part(self) -> None:
        self.finish_part()
        self._sink = pa.OSFile(str(self._current_path(TMP_SUFFIX)), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self._rows += batch.num_rows

    def finish_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        final = self._current_path()
        durable_replace(self._current_path(TMP_SUFFIX), final)
        self.parts.append(PartInfo(final.name, self._rows, final.stat().st_size))
        self._writer = self._sink = None

    def _current_path(self, suffix: str = "") -> Path:
        return self.folder / (part_name(len(self.parts)) + suffix)


class DocumentsWriter:
    """``documents.arrow``: the split's documents in packing order (see schema.py), batch by batch."""

    def __init__(self, writer: pa.ipc.RecordBatchFileWriter) -> None:
        self._writer = writer

    def write(self, file: np.ndarray, row: np.ndarray, tokens: np.ndarray) -> None:
        columns = [pa.array(file.astype(np.int32)), pa.array(row), pa.array(tokens)]
        self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=DOCUMENTS_SCHEMA))


@contextmanager
def open_documents(folder: Path) -> Iterator[DocumentsWriter]:
    """A DocumentsWriter whose file gets its final name only when the block ends without error."""
    path = folder / DOCUMENTS_NAME
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, DOCUMENTS_SCHEMA) as writer:
        yield DocumentsWriter(writer)
    durable_replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    durable_replace(tmp, path)
