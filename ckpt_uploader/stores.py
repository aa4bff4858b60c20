"""Where checkpoint files go: a local folder or an S3 prefix, behind one small interface.

Keys are '/'-separated paths under the URI's root (its folder or its key prefix). Both stores
check what they write: the bytes read are counted and hashed while they are sent, compared with
the expected size and sha256 before the object becomes visible, and the stored size (and, on S3,
the CRC32 (or SHA256) checksum S3 keeps) is read back afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ckpt_uploader.durable import AtomicWriter
from ckpt_uploader.uri import StorageURI, parse_storage_uri

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE_BYTES = 8 << 20  # boto3's default; grown for files over 10,000 parts
MAX_PARTS = 10_000  # S3's limit per multipart upload
MIN_PART_SIZE_BYTES = 5 << 20  # S3's minimum for every part but the last
_COPY_CHUNK_BYTES = 8 << 20

ProgressFn = Callable[[int], None]


class StoreError(RuntimeError):
    """A store operation that failed; the message says which object, where, and why."""


class TransientStoreError(StoreError):
    """The store was unreachable, busy or failing (5xx, SlowDown, timeouts, dropped connections)
    through every retry botocore made: the same operation may well succeed later."""


@dataclass(frozen=True)
class RetryPolicy:
    """botocore's retry mode for every S3 call: "standard" (exponential backoff with jitter, up to
    20 s between attempts, a retry quota that refills on success) or "adaptive" (standard plus
    client-side rate limiting when S3 throttles). `attempts` counts the first call too."""

    mode: str = "standard"
    attempts: int = 10

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """botocore's own variables, AWS_RETRY_MODE and AWS_MAX_ATTEMPTS, when set."""
        mode = os.environ.get("AWS_RETRY_MODE") or cls.mode
        attempts = os.environ.get("AWS_MAX_ATTEMPTS")
        return cls(mode, int(attempts) if attempts and attempts.isdigit() else cls.attempts)

    def __post_init__(self) -> None:
        if self.mode not in ("standard", "adaptive"):
            raise StoreError(f"retry mode {self.mode!r}: expected standard or adaptive")
        if self.attempts < 1:
            raise StoreError(f"retry attempts {self.attempts}: expected at least 1")


class ContentMismatch(StoreError):
    """The bytes read from the spool do not match the manifest (short, changed or missing file)."""


@dataclass(frozen=True)
class PutResult:
    size_bytes: int
    sha256: str  # hex digest of the bytes sent


class Store(ABC):
    @abstractmethod
    def put_file(
        self,
        local_path: str | Path,
        key: str,
        *,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        on_progress: ProgressFn | None = None,
    ) -> PutResult:
        """Uploads a file (multipart when large); nothing becomes visible under ``key`` when the
        bytes read differ from ``expected_size`` / ``expected_sha256`` (ContentMismatch)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def download_file(self, key: str, local_path: str | Path) -> None: ...

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (recursive), relative to the store's root, sorted."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The stored object's size in bytes; None when it does not exist."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def check_access(self) -> None:
        """Fails fast (seconds) with a StoreError saying what is wrong: unreachable endpoint,
        missing bucket or folder, bad credentials."""

    @abstractmethod
    def describe(self) -> str: ...

    def abort_incomplete_uploads(self, keys: Iterable[str] | None = None) -> int:
        """Cleans up what a killed uploader left half-sent (S3 multipart uploads), of `keys` only
        when given; returns how many."""
        return 0

    def close(self) -> None:
        """Releases what the store holds (worker pools, connections); a no-op unless a store overrides it."""
        return None


def open_store(
    uri: str | StorageURI,
    *,
    concurrency: int = 8,
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
    part_delay_s: float = 0.0,
    checksum_algorithm: str = "CRC32",
    retry: RetryPolicy | None = None,
) -> Store:
    """The store for a storage URI (see ckpt_uploader.uri for the forms). ``concurrency``: S3 parts
    in flight; ``checksum_algorithm``: S3 per-part checksum (SHA256 or CRC32); ``retry``: botocore's
    retry mode for every S3 call (default: RetryPolicy.from_env()); ``part_delay_s`` slows every
    part / chunk down, for tests that need an upload caught in the middle."""
    parsed = uri if isinstance(uri, StorageURI) else parse_storage_uri(uri)
    if parsed.scheme == "local":
        return LocalStore(parsed.path, part_delay_s=part_delay_s)
    from ckpt_uploader.s3_store import S3Store  # boto3 is imported only when S3 is used

    return S3Store(
        parsed,
        concurrency=concurrency,
        part_size_bytes=part_size_bytes,
        part_delay_s=part_delay_s,
        checksum_algorithm=checksum_algorithm,
        retry=retry or RetryPolicy.from_env(),
    )


def check_key(key: str) -> str:
    """A key must stay under the root: relative, no empty, '.' or '..' parts."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key:
        raise StoreError(f"invalid key {key!r}: expected a relative '/'-separated path")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise StoreError(f"invalid key {key!r}: empty, '.' or '..' parts are not allowed")
    return key


def b64_digest(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def check_content(
    path: Path, read_bytes: int, sha256_hex: str, expected_size: int | None, expected_sha256: str | None
) -> None:
    if expected_size is not None and read_bytes != expected_size:
        raise ContentMismatch(
            f"{path}: read {read_bytes} bytes, the manifest says {expected_size} (file changed or truncated?)"
        )
    if expected_sha256 is not None and sha256_hex != expected_sha256.lower():
        raise ContentMismatch(f"{path}: sha256 {sha256_hex} differs from the manifest's {expected_sha256}")


class LocalStore(Store):
    """A folder. Every write goes to a temporary name in the target folder, is fsynced, then renamed
    into place (and the folder fsynced: durable.AtomicWriter), so a reader never sees a partial file."""

    def __init__(self, root: Path, *, part_delay_s: float = 0.0) -> None:
        self.root = Path(root)
        self.part_delay_s = part_delay_s

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def describe(self) -> str:
        return f"local folder {self.root}"

    def check_access(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create the destination folder {self.root}: {error}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"destination folder {self.root} is not writable")

    def put_file(
        self, local_path, key, *, expected_size=None, expected_sha256=None, on_progress=None
    ) -> PutResult:
        source, target = Path(local_path), self._path(key)
        digest, copied = hashlib.sha256(), 0
        try:
            with open(source, "rb") as reader, self._atomic_writer(target) as writer:
                while chunk := reader.read(_COPY_CHUNK_BYTES):
                    if self.part_delay_s:
                        time.sleep(self.part_delay_s)
                    digest.update(chunk)
                    writer.write(chunk)
                    copied += len(chunk)
                    if on_progress:
                        on_progress(len(chunk))
                check_content(source, copied, digest.hexdigest(), expected_size, expected_sha256)
        except FileNotFoundError:
            raise ContentMismatch(f"{source}: file is missing") from None
        except OSError as error:
            raise StoreError(f"copying {source} to {target}: {error}") from None
        stored = target.stat().st_size
        if stored != copied:
            raise StoreError(f"{target}: stored size {stored} differs from the {copied} bytes written")
        return PutResult(copied, digest.hexdigest())

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._atomic_writer(self._path(key)) as writer:
            writer.write(data)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{self._path(key)} does not exist") from None

    def download_file(self, key: str, local_path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StoreError(f"{source} does not exist")
        with open(source, "rb") as reader, self._atomic_writer(Path(local_path)) as writer:
            shutil.copyfileobj(reader, writer, _COPY_CHUNK_BYTES)

    def list_keys(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = []
        for path in base.rglob("*"):
            if path.is_file() and ".partial-" not in path.name:
                keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def _atomic_writer(self, target: Path) -> AtomicWriter:
        target.parent.mkdir(parents=True, exist_ok=True)
        return AtomicWriter(target)


class PartPool:
    """Threads sending parts, plus a bound on the parts read but not yet sent (memory:
    ``(workers + 2) x part size`` however many files are being sent at once)."""

    def __init__(self, workers: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="part")
        self.slots = threading.BoundedSemaphore(workers + 2)

    def submit(self, fn: Callable, *args) -> Future:
        """Call after ``slots.acquire()``; the slot is given back when the part is done."""

        def run():
            try:
                return fn(*args)
            finally:
                self.slots.release()

        return self.executor.submit(run)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
