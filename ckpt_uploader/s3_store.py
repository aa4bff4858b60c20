"""S3 (or any S3-compatible endpoint) through boto3: multipart uploads with parallel parts, SHA256
(or CRC32) checksums on every part, and a read-back of size and checksum.

Every call (HEAD, LIST, PUT, parts, completion) is retried by botocore's own retry modes
(RetryPolicy: standard or adaptive, attempts configurable), the only retry layer: an error that
survives them is a TransientStoreError when S3 may answer later (5xx, SlowDown and throttling,
timeouts, dropped connections), which the uploader's job loop treats as an outage, or a
StoreError when retrying cannot help (no bucket, access denied, a wrong checksum)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
)

from ckpt_uploader.stores import (
    DEFAULT_PART_SIZE_BYTES,
    MAX_PARTS,
    MIN_PART_SIZE_BYTES,
    ContentMismatch,
    PartPool,
    PutResult,
    RetryPolicy,
    Store,
    StoreError,
    TransientStoreError,
    b64_digest,
    check_content,
    check_key,
)
from ckpt_uploader.uri import StorageURI

log = logging.getLogger(__name__)

_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestTimeTooSkewed",
    "SlowDownRead",
    "SlowDownWrite",
}
_DENIED_CODES = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "Forbidden",
    "InvalidToken",
    "ExpiredToken",
}
_MISSING_BUCKET_CODES = {"NoSuchBucket"}


def _credentials() -> dict:
    """InternLM's S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY_ID win when set; otherwise boto3's usual
    chain (AWS_* variables, ~/.aws, instance roles). Never logged."""
    key, secret = os.environ.get("S3_ACCESS_KEY_ID"), os.environ.get("S3_SECRET_ACCESS_KEY_ID")
    if key and secret:
        return {"aws_access_key_id": key, "aws_secret_access_key": secret}
    return {}


_ENV_KEYS = (
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY_ID",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
_client_cache: dict[tuple, tuple] = {}
_client_cache_lock = threading.Lock()


def _clients(endpoint_url: str | None, concurrency: int, retry: RetryPolicy) -> tuple:
    """(transfer client, fast-failing client) for an endpoint. Cached per endpoint, concurrency,
    retry policy and credential variables: creating a boto3 session and client costs ~0.1 s of
    CPU, which every job would pay otherwise. boto3 clients are thread-safe."""
    key = (endpoint_url, concurrency, retry, *(os.environ.get(name) for name in _ENV_KEYS))
    with _client_cache_lock:
        if key not in _client_cache:
            session = boto3.session.Session(**_credentials())
            config = Config(
                max_pool_connections=2 * concurrency + 4,
                retries={"mode": retry.mode, "total_max_attempts": retry.attempts},
                connect_timeout=5,
                read_timeout=120,
                request_checksum_calculation="when_required",
                # NOTE: every body we send carries its own x-amz-checksum-* header (checked by S3);
                # signing the payload too would hash each byte a second time (botocore always
                # does over plain http, e.g. a MinIO / Ceph endpoint inside the cluster).
                s3={"payload_signing_enabled": False},
            )
            # check_access: a typo in an endpoint or bucket must fail a trainer's start in seconds,
            # yet one 503 must not; a few attempts (backoff up to ~3 s) do both.
            fast = Config(
                retries={"mode": retry.mode, "total_max_attempts": min(retry.attempts, 3)},
                connect_timeout=2,
                read_timeout=5,
            )
            _client_cache[key] = (
                session.client("s3", endpoint_url=endpoint_url, config=config),
                session.client("s3", endpoint_url=endpoint_url, config=fast),
            )
        return _client_cache[key]


CHECKSUM_ALGORITHMS = ("SHA256", "CRC32")


def _checksum(algorithm: str, data: bytes) -> bytes:
    if algorithm == "SHA256":
        return hashlib.sha256(data).digest()
    return zlib.crc32(data).to_bytes(4, "big")


class S3Store(Store):
    def __init__(
        self,
        uri: StorageURI,
        *,
        concurrency: int = 8,
        part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
        part_delay_s: float = 0.0,
        checksum_algorithm: str = "CRC32",
        retry: RetryPolicy | None = None,
    ) -> None:
        """``checksum_algorithm``: the S3 checksum sent with every part and read back after the
        upload (SHA256, or CRC32 as boto3 uses by default: cheaper for the endpoint to compute).
        The whole file's sha256 is compared with the manifest either way."""
        if checksum_algorithm not in CHECKSUM_ALGORITHMS:
            raise StoreError(
                f"checksum algorithm {checksum_algorithm!r}: expected one of {CHECKSUM_ALGORITHMS}"
            )
        self.checksum_algorithm = checksum_algorithm
        self._checksum_field = f"Checksum{checksum_algorithm}"
        if part_size_bytes < MIN_PART_SIZE_BYTES:
            raise StoreError(
                f"part size {part_size_bytes} is below S3's minimum of {MIN_PART_SIZE_BYTES} bytes"
            )
        self.uri = uri
        self.bucket = uri.bucket
        self.root = uri.prefix
        self.part_size_bytes = part_size_bytes
        self.part_delay_s = part_delay_s
        self.retry = retry or RetryPolicy()
        self.client, self._fast_client = _clients(uri.endpoint_url, concurrency, self.retry)
        self.endpoint_url = self.client.meta.endpoint_url
        self._pool = PartPool(concurrency)

    # ---- naming -------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.root}/{key}" if self.root else key

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.root} at {self.endpoint_url}"

    def close(self) -> None:
        self._pool.close()

    # ---- errors -------------------------------------------------------------------------
    def _error(self, error: Exception, what: str) -> StoreError:
        where = f"s3://{self.bucket}/{self.root} at {self.endpoint_url}"
        if self._transient(error):
            return TransientStoreError(
                f"{what} ({where}): {self._describe_error(error)} (still failing after botocore's "
                f"retries, mode {self.retry.mode})"
            )
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_BUCKET_CODES or (
                code in ("404", "NotFound") and what == "checking the bucket"
            ):
                return StoreError(f"{what}: bucket {self.bucket!r} does not exist at {self.endpoint_url}")
            if code in _DENIED_CODES:
                return StoreError(
                    f"{what}: access denied ({code}) to {where}; check the credentials "
                    "(S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY_ID, "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws)"
                )
            return StoreError(
                f"{what} ({where}): {code}: {error.response.get('Error', {}).get('Message', '')}"
            )
        if isinstance(error, NoCredentialsError):
            return StoreError(
                f"{what}: no S3 credentials found; set S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY_ID "
                "or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(error, EndpointConnectionError):
            return StoreError(f"{what}: cannot reach the S3 endpoint {self.endpoint_url} ({error})")
        return StoreError(f"{what} ({where}): {type(error).__name__}: {error}")

    def _describe_error(self, error: Exception) -> str:
        if isinstance(error, ClientError):
            details = error.response.get("Error", {})
            return f"{details.get('Code', '')}: {details.get('Message', '')}".strip(": ")
        if isinstance(error, EndpointConnectionError):
            return f"cannot reach the S3 endpoint {self.endpoint_url} ({error})"
        return f"{type(error).__name__}: {error}"

    @staticmethod
    def _transient(error: Exception) -> bool:
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        # Connection errors, timeouts, dropped connections; not a missing credential or a bad call.
        return isinstance(error, BotoCoreError) and not isinstance(
            error, (NoCredentialsError, ParamValidationError)
        )

    def _call(self, what: str, fn, **kwargs):
        """One S3 call; botocore has retried it as the policy says. Errors become StoreErrors
        naming `what`; calls that needed retries are logged (botocore itself logs them at DEBUG)."""
        try:
            response = fn(**kwargs)
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, what) from None
        metadata = response.get("ResponseMetadata", {}) if isinstance(response, dict) else {}
        retries = metadata.get("RetryAttempts", 0)
        if retries:
            log.info("%s: succeeded after %d retr%s", what, retries, "y" if retries == 1 else "ies")
        return response

    # ---- uploads ------------------------------------------------------------------------
    def put_file(
        self, local_path, key, *, expected_size=None, expected_sha256=None, on_progress=None
    ) -> PutResult:
        path, full_key = Path(local_path), self._key(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ContentMismatch(f"{path}: file is missing") from None
        if size <= self.part_size_bytes:
            result, remote_checksum = self._put_single(
                path, full_key, expected_size, expected_sha256, on_progress
            )
        else:
            result, remote_checksum = self._put_multipart(
                path, full_key, size, expected_size, expected_sha256, on_progress
            )
        self._verify_remote(full_key, result.size_bytes, remote_checksum)
        return result

    def _put_single(self, path: Path, full_key: str, expected_size, expected_sha256, on_progress):
        with open(path, "rb") as reader:
            data = reader.read(self.part_size_bytes + 1)
        digest = hashlib.sha256(data)
        check_content(path, len(data), digest.hexdigest(), expected_size, expected_sha256)
        if self.part_delay_s:
            time.sleep(self.part_delay_s)
        checksum = self._put_object(full_key, data, f"uploading {path} to {full_key}")
        if on_progress:
            on_progress(len(data))
        return PutResult(len(data), digest.hexdigest()), checksum

    def _put_multipart(
        self, path: Path, full_key: str, size: int, expected_size, expected_sha256, on_progress
    ):
        what = f"uploading {path} to {full_key}"
        upload_id = self._call(
            what,
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key=full_key,
            ChecksumAlgorithm=self.checksum_algorithm,
        )["UploadId"]
        futures, whole, read_bytes = [], hashlib.sha256(), 0
        part_size = max(self.part_size_bytes, -(-size // MAX_PARTS))
        failed = threading.Event()

        def send(number: int, data: bytes) -> dict:
            try:
                return self._upload_part(full_key, upload_id, number, data, on_progress)
            except BaseException:
                failed.set()
                raise

        try:
            with open(path, "rb") as reader:
                number = 0
                while not failed.is_set():  # stop reading after a failed part
                    self._pool.slots.acquire()
                    data = reader.read(part_size)
                    if not data:
                        self._pool.slots.release()
                        break
                    whole.update(data)
                    read_bytes += len(data)
                    number += 1
                    futures.append(self._pool.submit(send, number, data))
            parts = [future.result() for future in futures]  # raises the first part's error
            check_content(path, read_bytes, whole.hexdigest(), expected_size, expected_sha256)
            self._complete(what, full_key, upload_id, parts, read_bytes)
        except BaseException:
            for future in futures:
                future.cancel()
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
            except (ClientError, BotoCoreError) as error:
                log.warning("could not abort the multipart upload of %s: %s", full_key, error)
            raise
        # S3's checksum of a multipart object: the checksum of the parts' checksums, "-<parts>"
        composite = b64_digest(_checksum(self.checksum_algorithm, b"".join(p["digest"] for p in parts)))
        return PutResult(read_bytes, whole.hexdigest()), composite

    def _complete(self, what: str, full_key: str, upload_id: str, parts: list[dict], size: int) -> None:
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{k: v for k, v in p.items() if k != "digest"} for p in parts]},
            )
        except ClientError as error:
            # A completion whose reply was lost is retried by botocore and then finds its upload
            # gone (NoSuchUpload): the object is there if the first call went through. Its size
            # here and its checksum in _verify_remote tell whether it is ours.
            code = str(error.response.get("Error", {}).get("Code", ""))
            key = full_key[len(self.root) + 1 :] if self.root else full_key
            if code != "NoSuchUpload" or self.size(key) != size:
                raise self._error(error, what) from None
            log.info("%s: the completion's first reply was lost; the object is complete", what)
        except BotoCoreError as error:
            raise self._error(error, what) from None

    def _upload_part(self, full_key: str, upload_id: str, number: int, data: bytes, on_progress) -> dict:
        if self.part_delay_s:
            time.sleep(self.part_delay_s)
        digest = _checksum(self.checksum_algorithm, data)
        response = self._call(
            f"uploading part {number} of {full_key}",
            self.client.upload_part,
            Bucket=self.bucket,
            Key=full_key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            **{self._checksum_field: b64_digest(digest)},
        )
        if on_progress:
            on_progress(len(data))
        return {
            "PartNumber": number,
            "ETag": response["ETag"],
            self._checksum_field: b64_digest(digest),
            "digest": digest,
        }

    def _verify_remote(self, full_key: str, size: int, checksum: str) -> None:
        head = self._call(
            f"checking {full_key}",
            self.client.head_object,
            Bucket=self.bucket,
            Key=full_key,
            ChecksumMode="ENABLED",
        )
        if head["ContentLength"] != size:
            raise StoreError(
                f"s3://{self.bucket}/{full_key}: stored size {head['ContentLength']} "
                f"differs from the {size} bytes sent"
            )
        remote = head.get(self._checksum_field)
        if remote and remote.split("-")[0] != checksum:  # stores without checksums: size only
            raise StoreError(
                f"s3://{self.bucket}/{full_key}: stored {self.checksum_algorithm} checksum {remote} "
                f"differs from the one sent ({checksum})"
            )

    def put_bytes(self, key: str, data: bytes) -> None:
        """One small object (the `<step>.step` marker), read back like every file: its stored size
        and checksum must be what was sent."""
        full_key = self._key(key)
        checksum = self._put_object(full_key, data, f"writing {full_key}")
        self._verify_remote(full_key, len(data), checksum)

    def _put_object(self, full_key: str, data: bytes, what: str) -> str:
        """One PUT with its checksum header (S3 rejects a body that does not match), retried;
        returns that checksum (base64) for the read-back."""
        checksum = b64_digest(_checksum(self.checksum_algorithm, data))
        self._call(
            what,
            self.client.put_object,
            Bucket=self.bucket,
            Key=full_key,
            Body=data,
            **{self._checksum_field: checksum},
        )
        return checksum

    # ---- reads and the rest ---------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes:
        full_key = self._key(key)
        response = self._call(f"reading {full_key}", self.client.get_object, Bucket=self.bucket, Key=full_key)
        return response["Body"].read()

    def download_file(self, key: str, local_path) -> None:
        full_key, target = self._key(key), Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            self.client.download_file(self.bucket, full_key, str(temp))
            os.replace(temp, target)
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, f"downloading {full_key}") from None
        finally:
            if temp.exists():
                temp.unlink()

    def list_keys(self, prefix: str = "") -> list[str]:
        base = f"{self.root}/" if self.root else ""
        full_prefix = base + prefix
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix
            ):
                keys.extend(item["Key"][len(base) :] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, f"listing {full_prefix}") from None
        return sorted(keys)

    def size(self, key: str) -> int | None:
        full_key = self._key(key)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=full_key)["ContentLength"]
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(error, f"checking {full_key}") from None
        except BotoCoreError as error:
            raise self._error(error, f"checking {full_key}") from None

    def delete(self, key: str) -> None:
        full_key = self._key(key)
        self._call(f"deleting {full_key}", self.client.delete_object, Bucket=self.bucket, Key=full_key)

    def abort_incomplete_uploads(self, keys: Iterable[str] | None = None) -> int:
        """Aborts the multipart uploads left under the root by a killed uploader, only those of
        `keys` when given (another uploader, e.g. another node's on a multi-node save, may be
        uploading other files into the same folder right now); returns how many."""
        prefix = f"{self.root}/" if self.root else ""
        only = None if keys is None else {self._key(key) for key in keys}
        aborted = 0
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                for upload in page.get("Uploads", []):
                    if only is not None and upload["Key"] not in only:
                        continue
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        except (ClientError, BotoCoreError) as error:
            log.warning("could not clean up incomplete uploads under %s: %s", self.describe(), error)
        return aborted

    def check_access(self) -> None:
        try:
            self._fast_client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as error:
            raise self._error(error, "checking the bucket") from None
