"""Process faults under load (docs/RELIABILITY.md, issue 12 cases 4, 5, 6 and 12): a predictor running as a
real uvicorn process while its Redis stops, its PostgreSQL restarts, its indicators service is killed, or it is
sent SIGTERM itself.

Everything here runs on servers of this module's own, on free ports: a PostgreSQL 16 cluster (pgserver) that the
restart case stops and starts, a redis-server per test, an indicators service the kill case kills. The machine's
shared PostgreSQL and Redis are never touched. Each case prints what it measured (run with `-s`); timing bounds
are asserted loosely (a 2-core machine shared with other suites) and the measured figures are in
docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from services.predictor.prediction_log import LogRecord, PredictionLog
from shared.bars import bars_to_rows
from shared.features import feature_rows
from shared.migrate import upgrade
from shared.storage import ObjectStore, store_from_url
from shared.timeframes import OHLCV
from tests.data import generate_bars
from tests.predictor.model_factory import feature_scaler, register, write_model
from tests.support.keys import API_KEYS, WRITE_KEY
from tests.support.predictor import predictor_env
from tests.support.process_faults import (
    GRACE_S,
    Load,
    Postgres,
    ReadinessProbe,
    RedisServer,
    Req,
    Sample,
    Server,
    StreamSubscriber,
    loading,
    stats,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SYMBOL = "PFLT1"  # H1 bars stored, a model on H1
SERIES = f"{SYMBOL}:H1"
N_BARS = 3000
PREDICTOR = "services.predictor.main:app"
NO_CACHE = {"Cache-Control": "no-cache"}
STORED = {"symbol": SYMBOL, "timeframe": "H1"}
# Issue 12's bounds: readiness and caching back within 5 s of the dependency's return; p99 up by under 50 ms.
RECOVERY_S = 5.0
P99_RISE_MS = 50.0


class Stack:
    """This module's own PostgreSQL (migrated), model store and indicators service, with SYMBOL's bars and
    model; `more_bars` are the bars after the stored ones, ingested one at a time by the tests."""

    def __init__(self, pg: Postgres, store_url: str, indicators: Server, bars: OHLCV) -> None:
        self.pg = pg
        self.database_url = pg.url
        self.store_url = store_url
        self.indicators = indicators
        self.bars = bars
        self.next_bar = N_BARS

    def env(self, redis_url: str, **extra: str) -> dict[str, str]:
        return predictor_env(
            self.database_url,
            redis_url,
            self.indicators.url,
            self.store_url,
            **{
                "MODEL_POLL_SECONDS": "1",
                "PREDICTION_LOG_FLUSH_SECONDS": "0.05",
                # 50 ms (the default) can fire on this shared 2-core machine under load and skip the cache for its
                # cooldown; a stopped Redis refuses connections, which fails at once whatever the timeout.
                "REDIS_SOCKET_TIMEOUT_SECONDS": "1",
                "REDIS_CONNECT_TIMEOUT_SECONDS": "1",
                "STREAM_SWEEP_SECONDS": "1",
                **extra,
            },
        )

    async def ingest_next(self) -> int:
        part = self.bars.window(self.next_bar, self.next_bar + 1)
        async with httpx.AsyncClient(base_url=self.indicators.url, headers={"X-API-Key": WRITE_KEY}) as client:
            r = await client.post(f"/v1/bars/{SERIES.replace(':', '/')}", json={"bars": bars_to_rows(part)}, timeout=30)
        assert r.status_code == 200, r.text
        self.next_bar += 1
        return int(part.ts[0])

    def body_with_bars(self) -> dict[str, object]:
        """A prediction from bars sent in the request (520 needed: 500 warm-up + the model's 20): it needs the
        indicators service but not PostgreSQL."""
        return {**STORED, "bars": bars_to_rows(self.bars.window(N_BARS - 530, N_BARS))}


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    server = Postgres()
    try:
        upgrade(server.url)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
async def stack(pg: Postgres, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root = tmp_path_factory.mktemp("process-faults")
    store_url = f"file://{root / 'models'}"
    store: ObjectStore = store_from_url(store_url)
    bars = generate_bars("H1", N_BARS + 20, seed=12)
    indicators = Server(
        "services.indicators.main:app", {"DATABASE_URL": pg.url, "API_KEYS": API_KEYS}, root / "indicators.log"
    ).start()
    try:
        async with httpx.AsyncClient(base_url=indicators.url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as c:
            r = await c.post(f"/v1/bars/{SYMBOL}/H1", json={"bars": bars_to_rows(bars.window(0, N_BARS))})
        assert r.status_code == 200, r.text
        mean, scale = feature_scaler(feature_rows(bars.window(0, N_BARS)).values)
        sha = write_model(store, SYMBOL, "H1", "v1", seed=5, mean=mean, scale=scale, temperature=1.5)
        await register(pg.url, store, SYMBOL, "H1", "v1", sha)
        yield Stack(pg, store_url, indicators, bars)
    finally:
        indicators.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


async def _until(cond: Callable[[], object], timeout_s: float, every_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every_s)


def _no_server_errors(samples: list[Sample], *logs: Path) -> None:
    """No 5xx but 503 and no request without an answer; on failure, the server log lines (the traceback) of the
    first bad request's id, so that a failure seen once in CI says what raised."""
    bad = [s for s in samples if (s.status >= 500 and s.status != 503) or s.status == 0]
    context = ""
    if bad:
        lines = [line for log in logs if log.exists() for line in log.read_text(errors="replace").splitlines()]
        hits = [i for i, line in enumerate(lines) if bad[0].request_id in line]
        context = "\n".join(lines[hits[0] : hits[0] + 60]) if hits else "(no server log line names it)"
    assert not bad, f"{len(bad)} requests failed without a clean answer, e.g. {bad[:3]}\n{context}"


def _after(t: float | None, ref: float) -> str:
    return "never" if t is None else f"{t - ref:.2f}"


def _json_or_empty(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def _logged(database_url: str, ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id::text AS id FROM predictions WHERE id = ANY($1::uuid[])", ids)
    finally:
        await conn.close()
    return {r["id"] for r in rows}


async def _logged_request_ids(database_url: str, request_ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT request_id FROM predictions WHERE request_id = ANY($1::text[])", request_ids)
    finally:
        await conn.close()
    return {r["request_id"] for r in rows}


def _served_ids(samples: list[Sample]) -> list[str]:
    return [str(s.body["prediction_id"]) for s in samples if s.status == 200 and s.body and "prediction_id" in s.body]


# --- case 4: Redis stopped ---------------------------------------------------------------------------------------


async def test_redis_stopped_under_load_no_5xx_degraded_then_healthy_and_caching_again(
    stack: Stack, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Case 4. 30 s of load (3 cached : 1 `no-cache`, about 100 req/s) with Redis stopped from 8 s to 18 s, and an
    SSE subscriber connected throughout. Pass: no 5xx and no failed request at all; p99 while Redis is down
    within P99_RISE_MS of its p99 with Redis up; readiness `degraded` while it is down and `healthy` within 5 s of
    its return; cache entries written to Redis again within 5 s; the subscriber keeps its one connection, is told
    Redis is unavailable while it is down and reachable again within 5 s of its return, and gets the signal of a
    bar that closes after Redis is back."""
    server = Server(PREDICTOR, stack.env(own_redis.url), tmp_path / "predictor.log").start()
    rconn = aioredis.Redis(port=own_redis.port, socket_timeout=0.5)
    try:
        assert await _until(lambda: rconn.exists(f"signals:last:{SERIES}"), 20), "the stream never saw the series"
        sub = await StreamSubscriber(server.url, SERIES).start()

        def make(i: int) -> Req:
            return (
                Req("nocache", "POST", "/v1/predictions", STORED, NO_CACHE)
                if i % 4 == 3
                else Req("cached", "POST", "/v1/predictions", STORED)
            )

        load = Load(server.url, make, concurrency=8, interval_s=0.08)
        probe = ReadinessProbe(server.url, load.now)
        async with loading(load):
            probe.start()
            await asyncio.sleep(8 - load.now())
            t_stop = load.now()
            own_redis.stop()
            await asyncio.sleep(18 - load.now())
            t_back = load.now()
            await asyncio.to_thread(own_redis.start)
            t_started = load.now()

            async def cached_in_redis() -> bool:
                try:
                    return bool([k async for k in rconn.scan_iter(match="pred:*", count=1000)])
                except Exception:  # the client reconnects on its own; retry
                    return False

            assert await _until(cached_in_redis, 10), "no prediction was cached in Redis after it came back"
            t_caching = load.now()
            await _until(lambda: probe.first("healthy", t_started) is not None, 10)
            await asyncio.sleep(max(0.0, 22 - load.now()))
            t_ingest = load.now()
            bar = await stack.ingest_next()
            t_bar = load.now()
            bar_ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bar))
            got_signal = await _until(lambda: any(s.get("bar_ts") == bar_ts for s in sub.of("signal")), 20)
            t_signal = load.now()
            await asyncio.sleep(max(0.0, 30 - load.now()))
        await probe.stop()
        await sub.stop()

        before = stats(load.window(2, t_stop))
        during = stats(load.window(t_stop + 0.5, t_back))
        # Redis up again and caching, before the test's own bar (whose recomputation is not Redis's doing).
        after = stats(load.window(t_caching + 1, t_ingest))
        healthy_at = probe.first("healthy", t_started)
        events = [e for e, _i, _d in sub.events if e != "signal"]
        notices = [
            (e, _json_or_empty(d), t - load.t0)
            for (e, _i, d), t in zip(sub.events, sub.at, strict=True)
            if e != "signal"
        ]
        stream_down = next((t for e, d, t in notices if e == "error" and d.get("reason") == "redis_unavailable"), None)
        stream_ok = next((t for e, d, t in notices if e == "status" and d.get("redis") == "ok" and t > t_back), None)
        buckets = {f"{t}-{t + 2}": round(stats(load.window(t, t + 2)).p99_ms) for t in range(2, 30, 2)}
        print(
            f"\n[case 4] redis down {t_back - t_stop:.1f} s (restart took {t_started - t_back:.2f} s); "
            f"before: {before}\n[case 4] during: {during}\n[case 4] after: {after}\n"
            f"[case 4] p99 rise {during.p99_ms - before.p99_ms:+.1f} ms; cached answers while down "
            f"{sum(1 for s in load.window(t_stop + 0.5, t_back, 'cached') if s.body and s.body.get('cached'))}"
            f"/{len(load.window(t_stop + 0.5, t_back, 'cached'))}; readiness while down "
            f"{probe.statuses(t_stop + 0.5, t_back)}; healthy {_after(healthy_at, t_started)} s "
            f"and caching {t_caching - t_started:.2f} s after redis was back; stream: {sub.connects} connection(s), "
            f"events {events}, 'redis_unavailable' {_after(stream_down, t_stop)} s after the stop, 'redis ok' "
            f"{_after(stream_ok, t_started)} s after the return, signal {t_signal - t_bar:.2f} s after the bar\n"
            f"[case 4] p99 ms per 2 s: {buckets}"
        )
        _no_server_errors(load.samples, server.log)
        assert {s.status for s in load.samples} == {200}, stats(load.samples)
        assert probe.statuses(t_stop + 0.5, t_back) == {"degraded"}
        assert "healthy" in probe.statuses(2, t_stop)
        assert healthy_at is not None and healthy_at - t_started < RECOVERY_S
        assert t_caching - t_started < RECOVERY_S
        assert got_signal, f"no signal for the bar closed after Redis came back; events {sub.events}"
        # The streaming fan-out, the same way: its connection kept throughout, told that Redis is unavailable
        # while it is down and that it is reachable again within RECOVERY_S of its return.
        assert sub.connects == 1, f"the stream was reconnected: {sub.events}"
        assert stream_down is not None and t_stop <= stream_down < t_back, notices
        assert stream_ok is not None and stream_ok - t_started < RECOVERY_S, notices
        # The bound: p99 while Redis is down under P99_RISE_MS above its p99 with Redis up, before the
        # outage or after it (the worse of the two windows, so one noisy second on a shared machine does not decide
        # it). While Redis is down the L1 serves what it holds and the breaker skips Redis between refused
        # connections, so little changes on the request path: measured -2.2 to +4.7 ms over 5 runs when the
        # suite ran alone.
        baseline = max(before.p99_ms, after.p99_ms)
        assert during.p99_ms - baseline < P99_RISE_MS, (before, during, after)
    finally:
        await rconn.aclose()
        server.stop()


# --- case 12: indicators service killed ---------------------------------------------------------------------------


async def test_indicators_killed_uncached_503_within_the_timeout_cached_keep_succeeding(
    stack: Stack, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Case 12. Load (1 cached : 1 `no-cache`, about 80 req/s); the indicators service is SIGKILLed at 4 s and
    started again on its port at 10 s. Pass: while it is down every uncached prediction answers 503 naming the
    indicators service, each within INDICATORS_TIMEOUT_SECONDS (2 s), and every cached one answers 200; no other
    status at any time; uncached predictions succeed again once it is back."""
    server = Server(PREDICTOR, stack.env(own_redis.url), tmp_path / "predictor.log").start()
    try:

        def make(i: int) -> Req:
            return (
                Req("nocache", "POST", "/v1/predictions", STORED, NO_CACHE)
                if i % 2
                else Req("cached", "POST", "/v1/predictions", STORED)
            )

        load = Load(server.url, make, concurrency=8, interval_s=0.1)
        async with loading(load):
            await asyncio.sleep(4 - load.now())
            t_kill = load.now()
            stack.indicators.kill()
            await asyncio.sleep(10 - load.now())
            t_back = load.now()
            await asyncio.to_thread(stack.indicators.start)
            t_started = load.now()
            await asyncio.sleep(max(0.0, t_started + 4 - load.now()))
        down_nocache = load.window(t_kill + 0.1, t_back, "nocache")
        down_cached = load.window(t_kill + 0.1, t_back, "cached")
        recovered = next((s.start for s in load.window(t_started, kind="nocache") if s.status == 200), None)
        print(
            f"\n[case 12] before: {stats(load.window(1, t_kill))}\n[case 12] down, uncached: {stats(down_nocache)}\n"
            f"[case 12] down, cached: {stats(down_cached)}\n[case 12] indicators restart took "
            f"{t_started - t_back:.2f} s; first uncached 200 {_after(recovered, t_started)} s after"
        )
        _no_server_errors(load.samples, server.log)
        assert down_nocache and {s.status for s in down_nocache} == {503}, stats(down_nocache)
        assert all(s.body and "indicators service" in str(s.body.get("detail")) for s in down_nocache)
        assert max(s.latency_s for s in down_nocache) < 2.0, stats(down_nocache)
        assert down_cached and {s.status for s in down_cached} == {200}, stats(down_cached)
        # Requests in flight at the kill lost their features call: 503 too. Everything answered before it was 200.
        assert {s.status for s in load.samples if s.end < t_kill} == {200}
        assert recovered is not None and recovered - t_started < RECOVERY_S
    finally:
        server.stop()
        if stack.indicators.proc is None or stack.indicators.proc.poll() is not None:
            stack.indicators.start()


# --- case 5: PostgreSQL restarted ---------------------------------------------------------------------------------


async def test_postgresql_restart_fails_fast_loses_no_log_row_it_can_hold_and_writes_nothing_half(
    stack: Stack, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Case 5. Two predictor processes under load while PostgreSQL (this module's own; the indicators service uses
    it too) is stopped (`pg_ctl stop -m fast`) at 4 s and started at 8 s: `a` with the default log buffer, `b` with
    PREDICTION_LOG_BUFFER_ROWS=20. The load on `a` mixes stored-bar predictions (cached and not: they need the
    database for the series stamp), predictions from bars sent in the request (cached and not: no database) and
    POST /v1/outcomes for predictions it was served (outcome + audit row, one transaction).

    Pass: no 5xx other than 503, no request without an answer, every 503 within 5 s (the pool's connect
    timeout); predictions from sent bars all succeed while the database is down; readiness `unhealthy` while it
    is down and `healthy` within 5 s of its return; every prediction `a` served is in the log (nothing
    dropped); `b`'s served predictions are each either in the log or counted in ml_prediction_log_dropped_total,
    and some were dropped; every outcome row has its audit row and the reverse, every 201 outcome is stored,
    and an outcome answers only 201 or 503 (never 404 for a prediction that was served, never 500 for one that
    was stored)."""
    env = stack.env(own_redis.url)
    a = Server(PREDICTOR, env, tmp_path / "a.log").start()
    b = Server(PREDICTOR, {**env, "PREDICTION_LOG_BUFFER_ROWS": "20"}, tmp_path / "b.log").start()
    try:
        with_bars = stack.body_with_bars()
        outcome_for: list[str] = []
        load_a: Load

        def make_a(i: int) -> Req:
            if i % 6 == 5:
                unused = [p for p in _served_ids(load_a.samples[-50:]) if p not in outcome_for]
                if unused:
                    outcome_for.append(unused[-1])
                    body = {"prediction_id": unused[-1], "pnl": 0.001 * (i % 7)}
                    return Req("outcome", "POST", "/v1/outcomes", body, {"X-API-Key": WRITE_KEY})
            kinds = (
                Req("stored", "POST", "/v1/predictions", STORED),
                Req("stored", "POST", "/v1/predictions", STORED, NO_CACHE),
                Req("bars", "POST", "/v1/predictions", with_bars),
                Req("bars", "POST", "/v1/predictions", with_bars, NO_CACHE),
            )
            return kinds[i % 4]

        def make_b(i: int) -> Req:
            return Req("bars", "POST", "/v1/predictions", with_bars, NO_CACHE if i % 2 else None)

        load_a = Load(a.url, make_a, concurrency=6, interval_s=0.1)
        load_b = Load(b.url, make_b, concurrency=4, interval_s=0.1)
        probe = ReadinessProbe(a.url, load_a.now)
        async with loading(load_a), loading(load_b):
            probe.start()
            await asyncio.sleep(4 - load_a.now())
            t_stop = load_a.now()
            await asyncio.to_thread(stack.pg.stop, "fast")
            t_stopped = load_a.now()
            await asyncio.sleep(8 - load_a.now())
            t_back = load_a.now()
            await asyncio.to_thread(stack.pg.start)
            t_started = load_a.now()
            await _until(lambda: probe.first("healthy", t_started) is not None, 10)
            # Load goes on past the recovery bound, so that requests after it are there to be checked.
            await asyncio.sleep(max(2.0, t_started + RECOVERY_S + 2 - load_a.now()))
        await probe.stop()

        samples = load_a.samples
        down = (t_stopped + 0.5, t_back)
        served_a = _served_ids(samples)
        served_b = _served_ids(load_b.samples)
        written_a: set[str] = set()
        written_b: set[str] = set()
        dropped_a = dropped_b = 0.0

        async def flushed() -> bool:
            # Both logs drained: each writer flushes on its own clock (every 0.2 s), so b's last rows may still be
            # buffered when a's are all written.
            nonlocal written_a, written_b, dropped_a, dropped_b
            written_a = await _logged(stack.database_url, served_a)
            written_b = await _logged(stack.database_url, served_b)
            async with httpx.AsyncClient(timeout=5) as http:
                dropped_a = _metric((await http.get(f"{a.url}/metrics")).text, "ml_prediction_log_dropped_total")
                dropped_b = _metric((await http.get(f"{b.url}/metrics")).text, "ml_prediction_log_dropped_total")
            return len(written_a) == len(served_a) and len(written_b) + dropped_b == len(served_b)

        await _until(flushed, 10, every_s=0.5)
        conn = await asyncpg.connect(stack.database_url)
        try:
            orphans = await conn.fetchval(
                "SELECT count(*) FROM external_outcomes o WHERE NOT EXISTS (SELECT 1 FROM audit_log l "
                "WHERE l.action = 'outcome.record' AND l.target = 'prediction:' || o.prediction_id::text)"
            )
            audits_alone = await conn.fetchval(
                "SELECT count(*) FROM audit_log l WHERE l.action = 'outcome.record' AND NOT EXISTS "
                "(SELECT 1 FROM external_outcomes o WHERE l.target = 'prediction:' || o.prediction_id::text)"
            )
            stored_outcomes = {
                r["id"] for r in await conn.fetch("SELECT prediction_id::text AS id FROM external_outcomes")
            }
        finally:
            await conn.close()
        created = [str(s.body["prediction_id"]) for s in samples if s.kind == "outcome" and s.status == 201 and s.body]
        failed = [s for s in samples + load_b.samples if s.status == 503]
        healthy_at = probe.first("healthy", t_started)
        for kind in ("stored", "bars", "outcome"):
            print(
                f"\n[case 5] {kind}: before {stats(load_a.window(1, t_stop, kind))}; "
                f"down {stats(load_a.window(*down, kind))}; after {stats(load_a.window(t_started + 3, kind=kind))}"
            )
        print(
            f"[case 5] b (sent bars, 20-row buffer): before {stats(load_b.window(1, t_stop))}; down "
            f"{stats(load_b.window(*down))}; after {stats(load_b.window(t_started + 3))}"
        )
        print(
            f"[case 5] pg stop took {t_stopped - t_stop:.2f} s, down {t_back - t_stop:.1f} s, start took "
            f"{t_started - t_back:.2f} s; readiness while down {probe.statuses(*down)}, healthy "
            f"{_after(healthy_at, t_started)} s after the start; 503s: {len(failed)}, "
            f"slowest {max((s.latency_s for s in failed), default=0) * 1000:.0f} ms; log a: {len(written_a)}/"
            f"{len(served_a)} written, {dropped_a:g} dropped; log b: {len(written_b)}/{len(served_b)} written, "
            f"{dropped_b:g} dropped; outcomes: {len(created)} created, {len(stored_outcomes)} stored, "
            f"{orphans} without audit, {audits_alone} audit rows alone"
        )
        _no_server_errors(samples + load_b.samples, a.log, b.log)
        # Bounded by the pool's 5 s connect timeout (shared/db.py) whatever the machine's load; measured 0.3-1.6 s.
        assert max((s.latency_s for s in failed), default=0) < 5.0, "a request that needs PostgreSQL hung"
        assert failed, "no request noticed PostgreSQL was down"
        assert {s.status for s in load_a.window(*down, "bars")} == {200}
        # One run of eight saw no request of b start in this window, although b served at its full rate overall
        # (not understood; the message shows b's sample times around the window if it happens again).
        near = [(round(s.start, 2), round(s.latency_s, 2), s.status) for s in load_b.window(down[0] - 1, down[1] + 1)]
        assert {s.status for s in load_b.window(*down)} == {200}, (down, load_b.t0 - load_a.t0, near)
        assert probe.statuses(*down) == {"unhealthy"}
        assert healthy_at is not None and healthy_at - t_started < RECOVERY_S
        assert {s.status for s in load_a.window(t_started + RECOVERY_S, kind="stored")} == {200}
        assert written_a == set(served_a) and dropped_a == 0
        assert dropped_b > 0, "the small buffer of b never overflowed: the outage was too short to test drops"
        assert len(written_b) + dropped_b == len(served_b), "a prediction was lost without being counted"
        assert orphans == 0 and audits_alone == 0
        assert created and set(created) <= stored_outcomes
        # An outcome for a prediction this process served is found even while its log batch is being written.
        assert {s.status for s in samples if s.kind == "outcome"} <= {201, 503}
    finally:
        if not stack.pg.running():
            stack.pg.start()
        a.stop()
        b.stop()


# --- case 6: SIGTERM ---------------------------------------------------------------------------------------------


async def test_sigterm_under_load_completes_in_flight_requests_flushes_the_log_and_exits_in_grace(
    stack: Stack, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Case 6. A predictor started as in production (`--timeout-graceful-shutdown 20`) whose prediction log is
    never written before shutdown (PREDICTION_LOG_FLUSH_SECONDS=60) gets SIGTERM after 4 s of load (1 cached : 1
    `no-cache`, 8 keep-alive connections), at a moment an uncached request is 1 ms on its way, with an SSE
    subscriber connected.

    Pass: every request the server began (it logged its request id) answered 200, the ones in flight at the
    signal included; no answer at all was a 5xx; a request that got no answer is one the server never began
    (sent on a keep-alive connection as uvicorn closed it, or after the port closed: not in the log); the SSE
    stream ends and the process exits 0 within the grace period after its lifespan shutdown; PostgreSQL saw every
    connection of it closed cleanly (no "unexpected EOF" in its log); every prediction served is in the log
    afterwards (the buffer was flushed at shutdown)."""
    log = tmp_path / "predictor.log"
    env = stack.env(own_redis.url, PREDICTION_LOG_FLUSH_SECONDS="60")
    server = Server(PREDICTOR, env, log, "--timeout-graceful-shutdown", str(GRACE_S)).start()
    pg_log_from = stack.pg.log.stat().st_size
    try:

        def make(i: int) -> Req:
            return (
                Req("nocache", "POST", "/v1/predictions", STORED, NO_CACHE)
                if i % 2
                else Req("cached", "POST", "/v1/predictions", STORED)
            )

        sub = await StreamSubscriber(server.url, SERIES).start()
        load = Load(server.url, make, concurrency=8, interval_s=0.02)
        assert server.proc is not None
        async with loading(load):
            await asyncio.sleep(4 - load.now())
            # The signal comes while an uncached request (a few ms of work) is 1 ms on its way: at this load a
            # random instant finds nothing in flight about one time in five, and the case would test nothing.
            await load.until_in_flight("nocache", 0.001)
            t_term = load.now()
            server.proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(server.proc.wait, GRACE_S + 10)
            t_exit = load.now()
        await sub.stop()
        before = load.window(0, t_term)
        in_flight = [s for s in before if s.end > t_term]
        unanswered = [s for s in load.samples if s.status == 0]
        served = _served_ids(load.samples)
        written = await _logged(stack.database_url, served)
        begun_unanswered = await _logged_request_ids(stack.database_url, [s.request_id for s in unanswered])
        output = log.read_text()
        eofs = stack.pg.log.read_bytes()[pg_log_from:].decode(errors="replace").count("unexpected EOF")
        print(
            f"\n[case 6] before SIGTERM: {stats(before)}; in flight at SIGTERM: {len(in_flight)} "
            f"({stats(in_flight)}); after: {stats(load.window(t_term))}\n[case 6] unanswered: {len(unanswered)} "
            f"(sent {[round(s.start - t_term, 3) for s in unanswered[:10]]} s from SIGTERM; begun by the server: "
            f"{len(begun_unanswered)}); exit {rc} {t_exit - t_term:.2f} s after SIGTERM (grace {GRACE_S} s); log rows "
            f"{len(written)}/{len(served)}; unexpected EOFs in PostgreSQL's log: {eofs}; stream connections "
            f"{sub.connects}"
        )
        assert {s.status for s in load.samples} <= {0, 200}, stats(load.samples)
        assert [s for s in in_flight if s.status == 200], "nothing was in flight when SIGTERM came: tested nothing"
        assert not begun_unanswered, f"{len(begun_unanswered)} requests the server began got no answer"
        # uvicorn (>= 0.29) re-raises the signal it caught once its shutdown is done: the exit status is -SIGTERM.
        assert rc in (0, -signal.SIGTERM), rc
        assert t_exit - t_term < GRACE_S, "the process (or its SSE stream) outlived the grace period"
        assert "Application shutdown complete" in output and "Finished server process" in output, output[-2000:]
        assert "Traceback" not in output, output[-4000:]
        assert eofs == 0, "a connection to PostgreSQL was dropped, not closed"
        assert served and written == set(served), f"{len(set(served) - written)} served predictions not logged"
    finally:
        server.stop()


# --- a log batch held up by the database ------------------------------------------------------------------------


async def test_a_prediction_whose_log_batch_is_being_written_is_still_found(pg: Postgres) -> None:
    """The writer takes a batch out of the buffer before its COPY; while the COPY waits (here on a lock another
    session holds, as on a slow or restarting database) the record must still be found, so POST /v1/outcomes
    flushes (waiting for that commit) instead of reading too early and answering 404 — seen in case 5 above.
    Pass: found while the COPY waits; a flush asked for meanwhile returns only once the row is committed."""
    pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=2)
    plog = PredictionLog(
        pool, flush_seconds=60, batch_rows=500, buffer_rows=100, retention_days=0, prune_interval_seconds=3600
    )
    window = base64.b64encode(np.zeros((2, 3), dtype=np.float32).tobytes()).decode()
    pid = uuid.uuid4()
    record = LogRecord(
        pid, time.time(), "LOGW", "H1", "2024-01-01T00:00:00Z", "v1", "production", None, secrets.token_hex(32),
        window, [2, 3], [0.2, 0.5, 0.3], "HOLD", 0.5, "HOLD", False, "held-batch",
    )  # fmt: skip
    blocker = await asyncpg.connect(pg.url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
        plog.append(record)
        writer = asyncio.create_task(plog.flush())
        assert await _until(lambda: not plog.buffer, 5), "the writer never took the batch"
        assert plog.find(pid) == record, "a record in the batch being written was not found"
        asker = asyncio.create_task(plog.flush())
        await asyncio.sleep(0.3)
        assert not asker.done(), "a flush returned while the batch before it was not committed"
        await tx.rollback()
        assert await asyncio.wait_for(writer, 10) == 1
        await asyncio.wait_for(asker, 10)
        assert await _logged(pg.url, [str(pid)]) == {str(pid)}
        assert plog.find(pid) is None
    finally:
        await blocker.close()
        await pool.close()
