"""Blobs in an S3 bucket (Ceph RGW here; any S3 service), through boto3.

Design facts:
- `s3://bucket[/prefix]`; the endpoint and credentials come from the standard
  `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` variables, as every
  S3 tool reads them. Objects mirror the local layout: `<prefix>/ab/<key>.safetensors`.
- Keys are content addresses, so an upload is idempotent: putting the same key again
  writes the same bytes. The xxh3 checksum rides along as object metadata, so "is the
  stored object the one the manifest describes?" is a HEAD, not a download.
- This module never trusts what it reads: callers (store/tiered.py) check every object's
  bytes against the manifest checksum before use.
- An unreachable endpoint, a timeout or a 5xx is `RemoteUnavailable`, raised fast (short
  timeouts, one attempt): the caller falls back to the local tier or the durable queue.
- boto3 is imported on first use, so importing kvlib stays fast.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from kvlib.errors import InputError
from kvlib.store.blobs import BLOB_SUFFIX
from kvlib.store.keys import KEY_HEX_LEN, ChunkKey

CHECKSUM_META = "xxh3"
CONNECT_TIMEOUT_S = 2
READ_TIMEOUT_S = 20


class RemoteUnavailable(Exception):
    """The object store did not answer (connection refused, timeout, 5xx)."""


def parse_store_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket[/prefix]`, or an InputError."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise InputError(f"unsupported store {url!r}: use 'local' or s3://bucket[/prefix]")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


class S3Blobs:
    """One bucket and prefix: put, get, head, delete and list chunk blobs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bucket, self.prefix = parse_store_url(url)
        self._client: Any = None
        self._bucket_ready = False
        self._lock = threading.Lock()

    def object_name(self, key: ChunkKey) -> str:
        name = f"{key.fanout}/{key.hex}{BLOB_SUFFIX}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, key: ChunkKey, data: bytes, checksum: str) -> None:
        self._ensure_bucket()
        self._call("put_object", Bucket=self.bucket, Key=self.object_name(key), Body=data,
                   Metadata={CHECKSUM_META: checksum})

    def get(self, key: ChunkKey) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        found = self._call("get_object", Bucket=self.bucket, Key=self.object_name(key), missing_ok=True)
        if found is None:
            return None
        try:
            return found["Body"].read()
        except Exception as exc:  # a gateway dying mid-body reads as a broken stream
            raise RemoteUnavailable(f"{self.url}: {exc}") from exc

    def head_checksum(self, key: ChunkKey) -> str | None:
        """The checksum recorded with the object at upload, or None if there is none."""
        found = self._call("head_object", Bucket=self.bucket, Key=self.object_name(key), missing_ok=True)
        return None if found is None else found.get("Metadata", {}).get(CHECKSUM_META)

    def delete(self, key: ChunkKey) -> None:
        self._call("delete_object", Bucket=self.bucket, Key=self.object_name(key))

    def list_keys(self, older_than_s: float = 0.0) -> set[str]:
        """Keys of the blobs stored under the prefix, last modified more than `older_than_s` ago."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
        start = f"{self.prefix}/" if self.prefix else ""
        keys: set[str] = set()
        token: dict = {}
        while True:
            page = self._call("list_objects_v2", Bucket=self.bucket, Prefix=start, missing_ok=True, **token)
            for item in (page or {}).get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1].removesuffix(BLOB_SUFFIX)
                if len(name) == KEY_HEX_LEN and item["LastModified"] <= cutoff:
                    keys.add(name)
            if not page or not page.get("IsTruncated"):
                return keys
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _ensure_bucket(self) -> None:
        """Create the bucket on first use (idempotent; another node may win the race)."""
        if self._bucket_ready:
            return
        if self._call("head_bucket", Bucket=self.bucket, missing_ok=True) is None:
            try:
                self._call("create_bucket", Bucket=self.bucket)
            except _client_error() as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        self._bucket_ready = True

    def _call(self, operation: str, missing_ok: bool = False, **kwargs: Any) -> Any:
        """One S3 call; None for a missing object when `missing_ok`; RemoteUnavailable when down."""
        import botocore.exceptions as bce

        try:
            return getattr(self.client, operation)(**kwargs)
        except (bce.EndpointConnectionError, bce.ConnectionClosedError, bce.ConnectTimeoutError,
                bce.ReadTimeoutError, bce.HTTPClientError) as exc:
            raise RemoteUnavailable(f"{self.url}: {exc}") from exc
        except bce.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if missing_ok and status == 404:
                return None
            if status >= 500:
                raise RemoteUnavailable(f"{self.url}: {exc}") from exc
            raise

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # One attempt, short timeouts: a down gateway must cost a read milliseconds,
                # not the SDK's retry ladder; the queue does the retrying for writes.
                config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                                retries={"max_attempts": 1, "mode": "standard"}, s3={"addressing_style": "path"})
                self._client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                                            region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                                            config=config)
            return self._client


def _client_error():
    import botocore.exceptions as bce

    return bce.ClientError
