"""Storage URIs in InternLM's forms: where a checkpoint folder goes.

- ``local:/path`` or a plain path: a folder on this machine (or a mounted file system);
- ``boto3:s3://bucket/prefix`` (or ``s3://bucket/prefix``): an S3 bucket and key prefix;
- ``boto3:s3://bucket.ENDPOINT/prefix``: the same, at an explicit endpoint. ENDPOINT is what
  follows the *first* dot of the bucket part when it is an IPv4 address with an optional port
  (``model_weights.10.1.2.3/...`` -> ``http://10.1.2.3``) or any ``host:port``
  (``ckpts.127.0.0.1:9000/...``, ``ckpts.minio.local:9000/...`` -> ``http://minio.local:9000``).
  Anything else after a dot stays part of the bucket name (``my.bucket`` is a bucket), and the
  endpoint then comes from boto3's usual sources (``AWS_ENDPOINT_URL``, ~/.aws/config), as it
  does for the forms without one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_IPV4_PORT = re.compile(r"^\d{1,3}(\.\d{1,3}){3}(:\d{1,5})?$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*:\d{1,5}$")
_BUCKET = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,254}$")


class StorageURIError(ValueError):
    """A storage URI that cannot be used; the message names the text."""


@dataclass(frozen=True)
class StorageURI:
    scheme: str  # "local" or "s3"
    path: Path | None = None  # local folder (scheme "local")
    bucket: str | None = None
    prefix: str = ""  # key prefix without leading/trailing "/" (scheme "s3")
    endpoint_url: str | None = None  # from the URI only; None: boto3's usual sources

    def __str__(self) -> str:
        if self.scheme == "local":
            return f"local:{self.path}"
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


def parse_storage_uri(text: str) -> StorageURI:
    """Parses one of the forms in this module's docstring; raises StorageURIError naming ``text``."""
    if not isinstance(text, str) or not text.strip():
        raise StorageURIError(f"empty storage URI {text!r}")
    if text.startswith("local:"):
        rest = text[len("local:") :]
        if not rest:
            raise StorageURIError(f"storage URI {text!r} has no folder after 'local:'")
        return StorageURI("local", path=Path(rest))
    if text.startswith("boto3:"):
        rest = text[len("boto3:") :]
        if not rest.startswith("s3://"):
            raise StorageURIError(f"storage URI {text!r}: after 'boto3:' expected 's3://bucket/prefix'")
        return _parse_s3(text, rest[len("s3://") :])
    if text.startswith("s3://"):
        return _parse_s3(text, text[len("s3://") :])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text) and not re.match(r"^[A-Za-z]:[\\/]", text):
        raise StorageURIError(
            f"storage URI {text!r}: unknown scheme; use local:/path, a plain path or boto3:s3://bucket/prefix"
        )
    return StorageURI("local", path=Path(text))


def _parse_s3(text: str, rest: str) -> StorageURI:
    bucket_part, _, prefix = rest.partition("/")
    if not bucket_part:
        raise StorageURIError(f"storage URI {text!r} has no bucket")
    bucket, endpoint_url = bucket_part, None
    name, dot, endpoint = bucket_part.partition(".")
    if dot and (_IPV4_PORT.match(endpoint) or _HOST_PORT.match(endpoint)):
        bucket, endpoint_url = name, f"http://{endpoint}"
    if not _BUCKET.match(bucket):
        raise StorageURIError(f"storage URI {text!r}: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise StorageURIError(f"storage URI {text!r}: the prefix may not hold empty, '.' or '..' parts")
    return StorageURI("s3", bucket=bucket, prefix=prefix, endpoint_url=endpoint_url)
