"""Object store for model artifacts behind one small interface: S3 (boto3) or a local folder.

`MODEL_STORE_URL=s3://bucket/prefix` (with `S3_ENDPOINT_URL` for S3-compatible servers) or
`file:///abs/path` / `file://relative/path` (the embedded default, `file://var/models`).
Calls are blocking (boto3): async callers run them in a thread (`anyio.to_thread.run_sync`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from shared.settings import Settings


class ObjectNotFound(KeyError):
    pass


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def uri(self, key: str) -> str: ...
    def ping(self) -> None: ...


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileStore:
    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise ValueError(f"key {key!r} escapes the store")
        return p

    def put(self, key: str, data: bytes) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, p)  # readers see the old file or the whole new one
        except BaseException:
            # A full disk (ENOSPC) or an interruption leaves no half-written .tmp behind to fill it further.
            tmp.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root.resolve()
        return sorted(
            str(p.relative_to(base))
            for p in base.rglob("*")
            if p.is_file() and str(p.relative_to(base)).startswith(prefix)
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


class S3Store:
    def __init__(self, bucket: str, prefix: str, url: str, endpoint_url: str | None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = url
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            raise ObjectNotFound(key) from None
        return bytes(obj["Body"].read())

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        out: list[str] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            out += [o["Key"][strip:] for o in page.get("Contents", [])]
        return sorted(out)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def ping(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def open_store(settings: Settings) -> ObjectStore:
    return store_from_url(settings.model_store_url, settings.s3_endpoint_url)


def store_from_url(url: str, endpoint_url: str | None = None) -> ObjectStore:
    parts = urlsplit(url)
    if parts.scheme == "file":
        # file:///abs/path, or file://relative/path (netloc + path) relative to the working directory
        raw = parts.netloc + parts.path
        return FileStore(Path(raw), url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"MODEL_STORE_URL {url!r} names no bucket")
        return S3Store(parts.netloc, parts.path, url, endpoint_url)
    raise ValueError(f"MODEL_STORE_URL must start with s3:// or file://, got {url!r}")
