"""Where an uploader may write: the destinations it was started with (`--allow-dst`), never one a
peer chooses. A job's `dst` must lie inside one of them, or the job is refused before anything is
created, deleted or journaled; journal records are checked again when they are replayed.

Matching is by meaning, not by text: a local destination is compared after resolving symlinks and
`..` (so `allowed/../elsewhere` or a link out of the allowed folder is outside), an S3 destination
by endpoint, bucket and whole key-prefix components (`run1` does not allow `run10`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ckpt_uploader.protocol import ProtocolError
from ckpt_uploader.uri import StorageURI, StorageURIError, parse_storage_uri


class DestinationRefused(ProtocolError):
    """A job's destination lies outside every allowed prefix; the message names them."""


class AllowedDestinations:
    def __init__(self, prefixes: Iterable[str]) -> None:
        self.texts = tuple(prefixes)
        if not self.texts:
            raise StorageURIError("no allowed destination given")
        self._uris = tuple(_absolute(parse_storage_uri(text)) for text in self.texts)

    def check(self, dst: str) -> StorageURI:
        """The parsed `dst` when it lies inside an allowed prefix; DestinationRefused otherwise
        (a StorageURIError when `dst` is no storage URI at all)."""
        uri = _absolute(parse_storage_uri(dst))
        if any(_inside(uri, allowed) for allowed in self._uris):
            return uri
        raise DestinationRefused(
            f"dst {dst!r} is outside the destinations this uploader may write to: "
            + ", ".join(self.texts)
            + " (ckpt-uploader serve --allow-dst)"
        )

    def __str__(self) -> str:
        return ", ".join(self.texts)


def _absolute(uri: StorageURI) -> StorageURI:
    if uri.scheme != "local":
        return uri
    # realpath: symlinks and '..' resolved as far as the path exists, so neither leads outside.
    return StorageURI("local", path=Path(os.path.realpath(uri.path)))


def _inside(uri: StorageURI, allowed: StorageURI) -> bool:
    if uri.scheme != allowed.scheme:
        return False
    if uri.scheme == "local":
        return uri.path == allowed.path or allowed.path in uri.path.parents
    if (uri.bucket, uri.endpoint_url) != (allowed.bucket, allowed.endpoint_url):
        return False
    return not allowed.prefix or uri.prefix == allowed.prefix or uri.prefix.startswith(allowed.prefix + "/")
