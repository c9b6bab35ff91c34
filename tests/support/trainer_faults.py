"""Helpers of the trainer's fault cases (tests/trainer/test_faults_*.py): an S3 server of the test's own that it
can kill and bring back on the same ports and data, a tiny full filesystem, the worker's pool children, and the
broker's view of a queue."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.net import free_ports
from tests.support.s3 import CREDENTIALS, WEED_GRPC_OFFSET, weed_server_command


@dataclass
class Seaweed:
    """A seaweedfs server with its S3 gateway, owned by one test: `kill()` is a SIGKILL (the store is gone at
    once, as a crashed or unreachable server is), `start()` brings it back on the same ports and data folder."""

    data: Path
    bucket: str
    # master, volume, filer, s3: drawn once, kept across restarts
    ports: list[int] = field(default_factory=lambda: free_ports(4, also_free_at=WEED_GRPC_OFFSET))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[3]}"

    def start(self, timeout_s: float = 60.0) -> float:
        """Start it and wait until the bucket answers; returns the seconds that took."""
        import boto3

        for k, v in CREDENTIALS.items():
            os.environ.setdefault(k, v)
        master, volume, filer, s3 = self.ports
        t0 = time.monotonic()
        with (self.data / "weed.log").open("ab") as log:
            self.proc = subprocess.Popen(
                weed_server_command(self.data, master, volume, filer, s3),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = boto3.client("s3", endpoint_url=self.endpoint)
        while True:
            try:
                client.head_bucket(Bucket=self.bucket)
                break
            except Exception:
                with contextlib.suppress(Exception):
                    client.create_bucket(Bucket=self.bucket)
                if self.proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                    pytest.fail(f"seaweedfs did not start; see {self.data / 'weed.log'}")
                time.sleep(0.3)
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def seaweed(data: Path, bucket: str) -> Iterator[Seaweed]:
    server = Seaweed(data, bucket)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted at `path` (root only: skips the test otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave_bytes: int) -> Path:
    """Fill the filesystem holding `path` until at most `leave_bytes` are free; returns the filler file."""
    filler = path / "filler"
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with filler.open("wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return filler


def pool_children(pid: int) -> list[int]:
    """The processes `pid` forked (a Celery worker's prefork pool), from /proc."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def queue_depth(redis_url: str, queue: str) -> tuple[int, int]:
    """(messages waiting in `queue`, messages delivered and not yet acknowledged on this Redis) as kombu's Redis
    transport keeps them: a list named after the queue and the `unacked` hash."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        return int(client.llen(queue)), int(client.hlen("unacked"))  # type: ignore[arg-type]
    finally:
        client.close()


def messages_for(redis_url: str, queue: str, text: str) -> int:
    """Messages of `queue` mentioning `text` (a job id): waiting in the queue or delivered and unacknowledged
    (a message older than the visibility timeout moves from the second back to the first)."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        waiting = sum(1 for v in client.lrange(queue, 0, -1) if text.encode() in v)  # type: ignore[union-attr]
    finally:
        client.close()
    return waiting + unacked_for(redis_url, text)


def unacked_for(redis_url: str, text: str) -> int:
    """Unacknowledged messages on this Redis whose payload mentions `text` (a job id)."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        return sum(1 for v in client.hvals("unacked") if text.encode() in v)  # type: ignore[union-attr]
    finally:
        client.close()
