"""Where checkpoints live: a local folder (`local:/path` or a plain path) or an object store
(`boto3:s3://bucket[.endpoint]/prefix`, through ckpt_uploader's stores). The trainer sees one
interface: files under a root addressed by '/'-separated names."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

from train_kernel.durable import atomic_write, atomic_write_bytes


class Location(Protocol):
    uri: str

    def child(self, name: str) -> Location: ...
    def subfolders(self) -> list[str]: ...
    def files(self) -> list[str]: ...
    def exists(self, name: str) -> bool: ...
    def read_bytes(self, name: str) -> bytes: ...
    def fetch(self, name: str, scratch: Path) -> Path: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def put_file(self, local: Path, name: str) -> None: ...
    def delete(self, name: str) -> None: ...
    def check_access(self) -> None: ...
    @property
    def local_path(self) -> Path | None: ...


def is_local(uri: str) -> bool:
    return not uri.startswith("boto3:")


def _local_root(uri: str) -> Path:
    return Path(uri.removeprefix("local:"))


class LocalLocation:
    def __init__(self, root: Path, uri: str | None = None) -> None:
        self.root = root
        self.uri = uri or f"local:{root}"

    @property
    def local_path(self) -> Path:
        return self.root

    def child(self, name: str) -> LocalLocation:
        return LocalLocation(self.root / name, self.uri.rstrip("/") + "/" + name)

    def subfolders(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def files(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_file())

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def fetch(self, name: str, scratch: Path) -> Path:
        return self.root / name  # already local: read in place

    def write_bytes(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / name, data)

    def put_file(self, local: Path, name: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / name
        if local.resolve() == target.resolve():
            return
        atomic_write(target, lambda tmp: shutil.copyfile(local, tmp))

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def check_access(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise PermissionError(f"{self.uri}: the checkpoint folder is not writable")


class StoreLocation:
    """A folder in an object store; `store` is a ckpt_uploader Store rooted at the URI's prefix."""

    def __init__(self, store, uri: str, prefix: str = "") -> None:
        self.store = store
        self.uri = uri
        self.prefix = prefix.strip("/")

    @property
    def local_path(self) -> None:
        return None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def child(self, name: str) -> StoreLocation:
        return StoreLocation(self.store, self.uri.rstrip("/") + "/" + name, self._key(name))

    def _below(self) -> list[str]:
        start = self.prefix + "/" if self.prefix else ""
        return [key[len(start) :] for key in self.store.list_keys(start) if key.startswith(start)]

    def subfolders(self) -> list[str]:
        return sorted({rest.split("/", 1)[0] for rest in self._below() if "/" in rest})

    def files(self) -> list[str]:
        return sorted(rest for rest in self._below() if "/" not in rest)

    def exists(self, name: str) -> bool:
        return self.store.size(self._key(name)) is not None

    def read_bytes(self, name: str) -> bytes:
        return self.store.get_bytes(self._key(name))

    def fetch(self, name: str, scratch: Path) -> Path:
        scratch.mkdir(parents=True, exist_ok=True)
        target = scratch / name
        self.store.download_file(self._key(name), target)
        return target

    def write_bytes(self, name: str, data: bytes) -> None:
        self.store.put_bytes(self._key(name), data)

    def put_file(self, local: Path, name: str) -> None:
        self.store.put_file(local, self._key(name))

    def delete(self, name: str) -> None:
        self.store.delete(self._key(name))

    def check_access(self) -> None:
        self.store.check_access()


def open_location(uri: str, retry=None) -> Location:
    """`retry`: a ckpt_uploader.stores.RetryPolicy for S3 calls (default: botocore's variables)."""
    if is_local(uri):
        return LocalLocation(_local_root(uri), uri)
    from ckpt_uploader.stores import open_store  # boto3 only when an S3 folder is used

    return StoreLocation(open_store(uri, retry=retry), uri)
