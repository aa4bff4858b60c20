"""Reading documents out of one work unit, streaming: memory stays bounded by one line (or one
parquet row group), whatever the size of the file.

Each reader yields ``(line, text)`` for a document and ``(line, Rejected(reason))`` for an input
line that is not one; ``line`` is 1-based and local to the unit (the caller adds the lines of the
units before it). Blank lines are not documents: they are counted, not rejected.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import orjson

from tokenize_stage.sft import Conversation, parse_conversation
from tokenize_stage.sources import WorkUnit


@dataclass(frozen=True)
class Rejected:
    reason: str


class Blank:
    """A blank line: skipped and counted."""


BLANK = Blank()
Item = tuple[int, str | Conversation | Rejected | Blank]


_ZSTD_CHUNK_BYTES = 1 << 17


class ZstdFrames(io.RawIOBase):
    """A .zst file decompressed frame after frame (concatenated frames, as `zstd` and `cat` make
    them). A file that ends inside a frame raises EOFError, as gzip does for a truncated .gz:
    zstandard's stream_reader returns what it has, so a cut download was silently shortened. Input
    goes in 128 KiB at a time, which bounds what one call decompresses."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._raw.read(_ZSTD_CHUNK_BYTES)
            if not chunk:
                if self._in_frame:
                    raise EOFError("compressed file ended before the end of a zstd frame (truncated?)")
                return 0
            self._pending = memoryview(self._decompress(chunk))
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def _decompress(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self._in_frame = True
            out.append(self._frame.decompress(chunk))
            if not self._frame.eof:
                break
            chunk = self._frame.unused_data  # the next frame's first bytes, if any
            self._frame = self._decompressor.decompressobj()
            self._in_frame = False
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


# A longer line is rejected (file:line) and read through in pieces, never held whole: one line must
# not decide a worker's memory, and units starting inside it must not each read it again.
DEFAULT_MAX_LINE_BYTES = 256 << 20
_SKIP_PIECE_BYTES = 1 << 20


def _rest_of_line(handle: BinaryIO, head: bytes) -> int:
    """Reads through the line that `head` began, in pieces; returns the whole line's length."""
    total, piece = len(head), head
    while piece and not piece.endswith(b"\n"):
        piece = handle.readline(_SKIP_PIECE_BYTES)
        total += len(piece)
    return total


def bounded_lines(handle: BinaryIO, max_bytes: int) -> Iterator[bytes | int]:
    """The handle's lines, each at most `max_bytes` long; a longer one is read through and
    yields its length (an int) instead of its bytes."""
    while True:
        line = handle.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes:
            yield line
        else:
            yield _rest_of_line(handle, line)


@dataclass
class UnitReader:
    """Iterates a unit; afterwards ``lines`` holds how many input lines (or rows) it covered and
    ``bytes_read`` how many input bytes it consumed (for the progress bar)."""

    unit: WorkUnit
    text_key: str
    whole_file: bool
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    sft: bool = False  # each jsonl line is a conversation (tokenize_stage.sft), yielded as one
    lines: int = 0
    bytes_read: int = 0

    def __iter__(self) -> Iterator[Item]:
        file = self.unit.file
        if self.sft and file.fmt != "jsonl":
            raise ValueError(f"--sft reads .jsonl files only (one conversation per line), not .{file.fmt}")
        if file.fmt == "parquet":
            return self._parquet()
        if file.fmt == "txt" and self.whole_file:
            return self._whole_file()
        return self._lines()

    def _open(self) -> BinaryIO:
        file = self.unit.file
        raw = open(file.path, "rb")
        if file.compression == ".gz":
            return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
        if file.compression == ".zst":
            return io.BufferedReader(ZstdFrames(raw), buffer_size=_ZSTD_CHUNK_BYTES)
        return raw

    def _raw_lines(self) -> Iterator[bytes | int]:
        """The lines that *start* inside the unit's byte range (a line belongs to one unit only);
        an int stands for a line longer than max_line_bytes (its length)."""
        unit = self.unit
        with self._open() as handle:
            if unit.file.compression is not None:
                yield from bounded_lines(handle, self.max_line_bytes)
                return
            position = unit.start
            if unit.start > 0:
                handle.seek(unit.start - 1)
                # Finish the line the previous unit owns, in pieces: it may be a giant one.
                position += _rest_of_line(handle, handle.readline(_SKIP_PIECE_BYTES)) - 1
            for line in bounded_lines(handle, self.max_line_bytes):
                if position >= unit.end:
                    return
                position += line if isinstance(line, int) else len(line)
                yield line

    def _lines(self) -> Iterator[Item]:
        is_jsonl = self.unit.file.fmt == "jsonl"
        for line in self._raw_lines():
            self.lines += 1
            if isinstance(line, int):
                self.bytes_read += line
                yield (
                    self.lines,
                    Rejected(
                        f"line of {line:,} bytes is longer than the limit of "
                        f"{self.max_line_bytes:,} (--max-line-mb)"
                    ),
                )
                continue
            self.bytes_read += len(line)
            if is_jsonl:
                yield self.lines, self._parse_json(line)
            else:
                yield self.lines, _decode_text_line(line)
        if self.unit.file.compression is None:
            self.bytes_read = self.unit.end - self.unit.start

    def _parse_json(self, line: bytes) -> str | Conversation | Rejected | Blank:
        if not line.strip():
            return BLANK
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as utf8_error:
                return Rejected(f"invalid UTF-8 at byte {utf8_error.start} of the line")
            return Rejected(f"invalid JSON: {error}")
        if not isinstance(record, dict):
            return Rejected(f"a JSON {type(record).__name__}, not an object")
        if self.sft:
            conversation = parse_conversation(record)
            return Rejected(conversation) if isinstance(conversation, str) else conversation
        if self.text_key not in record:
            return Rejected(f"missing text key {self.text_key!r} (keys: {', '.join(sorted(record))[:200]})")
        text = record[self.text_key]
        if not isinstance(text, str):
            return Rejected(f"field {self.text_key!r} is {type(text).__name__}, not a string")
        return text

    def _whole_file(self) -> Iterator[Item]:
        with self._open() as handle:
            data = handle.read()
        self.lines = 1
        self.bytes_read = self.unit.file.size
        if not data:
            return  # an empty file holds no document; the manifest shows documents=0
        try:
            yield 1, data.decode("utf-8")
        except UnicodeDecodeError as error:
            yield 1, Rejected(f"invalid UTF-8 at byte {error.start} of the file")

    def _parquet(self) -> Iterator[Item]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.unit.file.path)
        if parquet.metadata.num_row_groups == 0:
            return
        if self.text_key not in parquet.schema_arrow.names:
            raise ValueError(
                f"no column {self.text_key!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
                "choose one with --text-key"
            )
        table = parquet.read_row_group(self.unit.start, columns=[self.text_key])
        column = table.column(0)
        for batch in column.chunks:
            for value in batch.to_pylist():
                self.lines += 1
                if value is None:
                    yield self.lines, Rejected(f"{self.text_key!r} is null")
                elif isinstance(value, bytes):
                    yield self.lines, _decode_text_line(value, strip=False)
                else:
                    yield self.lines, value
        self.bytes_read = self.unit.file.size // max(parquet.metadata.num_row_groups, 1)


def _decode_text_line(line: bytes, strip: bool = True) -> str | Rejected | Blank:
    if strip:
        line = line.rstrip(b"\r\n")
        if not line.strip():
            return BLANK
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        return Rejected(f"invalid UTF-8 at byte {error.start} of the line")
