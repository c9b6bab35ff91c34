"""Shadow mode's cost: latency of uncached and cached predictions with the rollout's shadow off and on.
Prints a Markdown section.

    .venv/bin/python -m benchmarks.bench_shadow            # 9 off/on pairs, 6 s per run
    .venv/bin/python -m benchmarks.bench_shadow --quick    # 1 round, 3 s per run

Real stack, one uvicorn process each (uvloop, httptools, no access log): the indicators service and the
predictor (`--workers`, default 2). One series has a production model and a rollout candidate at 0 % traffic,
so production serves every request; only the rollouts row's `shadow` flag changes between runs (SQL UPDATE,
as the trainer writes it; the predictor picks it up by NOTIFY). Load: the open-loop generator of
benchmarks/bench_predictor.py in its own process (latency from each request's scheduled send time, so no
coordinated omission), at a fixed rate, uncached (`Cache-Control: no-cache`: every request computes, so every
request is shadowed - the worst case) and cached (a hit is never shadowed). Off and on run in alternating
pairs, the order flipped every round, so drift on the shared machine falls on both alike; each figure is the
median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

from benchmarks.bench_predictor import (
    API_KEYS,
    WRITE_KEY,
    _stop_all,
    first_prediction,
    open_loop,
    predictor_env,
    start,
)

SYMBOL, TF = "SHADOW1", "H1"


def run_load(url: str, rate: float, seconds: float, no_cache: bool) -> dict[str, float]:
    """One open-loop run in its own process (bench_predictor's generator)."""
    return open_loop(
        url, {"symbol": SYMBOL, "timeframe": TF, "user_id": "bench-user"}, rate, seconds, no_cache=no_cache
    )


async def setup(db_url: str, store_url: str, scaler: tuple[list[float], list[float]]) -> None:
    from shared.storage import store_from_url
    from tests.predictor.model_factory import register, write_model

    store = store_from_url(store_url)
    mean, scale = scaler
    sha = write_model(store, SYMBOL, TF, "prod", seed=1, mean=mean, scale=scale, temperature=1.3)
    await register(db_url, store, SYMBOL, TF, "prod", sha)
    sha = write_model(store, SYMBOL, TF, "cand", seed=2, mean=mean, scale=scale, temperature=1.3)
    await register(db_url, store, SYMBOL, TF, "cand", sha, status="candidate")
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO rollouts (symbol, timeframe, policy, candidate_model_id, candidate_traffic_percent, shadow) "
            "SELECT $1, $2, 'manual', id, 0, false FROM model_versions WHERE symbol = $1 AND timeframe = $2 "
            "AND version = 'cand'",
            SYMBOL,
            TF,
        )
    finally:
        await conn.close()


async def set_shadow(db_url: str, on: bool) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "UPDATE rollouts SET shadow = $3, updated_at = now() WHERE symbol = $1 AND timeframe = $2", SYMBOL, TF, on
        )
    finally:
        await conn.close()


async def count_variants(db_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT variant, count(*) AS n FROM predictions GROUP BY variant")
    finally:
        await conn.close()
    return {r["variant"]: int(r["n"]) for r in rows}


def shadow_cpu_us(store_url: str, bars: object) -> float:
    """Microseconds of CPU one shadow scoring costs: the same calls `Predictor._score_shadow` makes."""
    import uuid

    import numpy as np

    from benchmarks.common import best_of
    from services.predictor.model_manager import load_model
    from services.predictor.prediction_log import LogRecord
    from services.predictor.repository import RegistryRow
    from services.predictor.service import _window_fields, uuid7
    from services.predictor.signals import decide
    from shared.features import FEATURE_NAMES, feature_rows
    from shared.model_metadata import artifact_prefix
    from shared.storage import sha256_hex, store_from_url
    from shared.timeframes import OHLCV

    assert isinstance(bars, OHLCV)
    store = store_from_url(store_url)
    prefix = artifact_prefix(SYMBOL, TF, "cand")
    sha = sha256_hex(store.get(prefix + "metadata.json"))
    model = load_model(store, RegistryRow(SYMBOL, TF, "cand", store.uri(prefix), sha))
    rows = feature_rows(bars)
    cols = [FEATURE_NAMES.index(n) for n in model.feature_names]
    window = np.ascontiguousarray(rows.values[-model.sequence_length :, cols])

    def once() -> None:
        p = model.predict(window)
        signal, confidence = decide(p.tolist())
        h, shape, b64 = _window_fields(window)
        LogRecord(
            uuid7(),
            time.time(),
            SYMBOL,
            TF,
            "2026-01-01T00:00:00Z",
            model.version,
            "shadow",
            None,
            h,
            b64,
            shape,
            [round(float(x), 6) for x in p],
            signal,
            round(confidence, 6),
            signal,
            False,
            str(uuid.uuid4()),
        )

    return best_of(once, repeat=5, number=2000) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers of the predictor")
    parser.add_argument("--uncached-rate", type=float, default=200.0, help="open-loop rate, uncached (req/s)")
    parser.add_argument("--cached-rate", type=float, default=1000.0, help="open-loop rate, cached (req/s)")
    # Many short pairs rather than a few long runs: on a shared machine the median of paired differences is
    # what survives another job's burst.
    parser.add_argument("--rounds", type=int, default=9, help="off/on pairs (1 with --quick)")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per run (3 with --quick)")
    args = parser.parse_args()
    dur = 3.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds

    from shared.bars import bars_to_rows
    from shared.features import feature_rows  # the benchmark may use TA-Lib; the predictor process does not
    from shared.local_services import scratch_database
    from tests.data import generate_bars

    server_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    tmp = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    procs: list[subprocess.Popen[bytes]] = []
    runs: dict[tuple[str, bool], list[dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(scratch_database(server_url, "aicash_bench"))
        stack.callback(shutil.rmtree, tmp, True)
        stack.callback(_stop_all, procs)
        store_url = f"file://{tmp / 'models'}"
        bars = generate_bars(TF, 3000, seed=7)
        env = {"DATABASE_URL": db_url, "API_KEYS": API_KEYS, "ENVIRONMENT": "test", "LOG_LEVEL": "WARNING"}
        p, ind_url = start("services.indicators.main:app", env, tmp / "indicators.log")
        procs.append(p)
        with httpx.Client(base_url=ind_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as c:
            c.post(f"/v1/bars/{SYMBOL}/{TF}", json={"bars": bars_to_rows(bars)}).raise_for_status()
        values = feature_rows(bars).values
        asyncio.run(setup(db_url, store_url, (values.mean(0).tolist(), values.std(0).tolist())))
        penv = predictor_env(env, redis_url, ind_url, store_url)
        pred, url = start("services.predictor.main:app", penv, tmp / "predictor.log", args.workers)
        procs.append(pred)
        first = first_prediction(url, {"symbol": SYMBOL, "timeframe": TF})
        assert first.json()["variant"] == "production"

        # Warm-up (not reported): the first runs after start pay for connection pools and caches filling.
        for no_cache in (True, False):
            run_load(url, args.uncached_rate if no_cache else args.cached_rate, 2.0, no_cache)
        shadows_off = 0
        shadows_on_uncached = 0
        for i in range(rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            for on in order:
                asyncio.run(set_shadow(db_url, on))
                time.sleep(1.5)  # the NOTIFY lands in milliseconds; also lets the log writer drain
                for kind, rate, no_cache in (
                    ("uncached", args.uncached_rate, True),
                    ("cached", args.cached_rate, False),
                ):
                    before = asyncio.run(count_variants(db_url)).get("shadow", 0)
                    result = run_load(url, rate, dur, no_cache)
                    time.sleep(1.0)
                    result["shadows"] = asyncio.run(count_variants(db_url)).get("shadow", 0) - before
                    runs.setdefault((kind, on), []).append(result)
                    if on and kind == "uncached":
                        shadows_on_uncached += int(result["shadows"])
                    elif not on:
                        shadows_off += int(result["shadows"])
        variants = asyncio.run(count_variants(db_url))
        cpu_us = shadow_cpu_us(store_url, bars)

    print("## Shadow mode's cost\n")
    print(
        f"Machine: {os.cpu_count()} cores shared by the predictor ({args.workers} uvicorn worker(s)), the "
        f"indicators service, PostgreSQL, Redis and the load generator. One series, production serving every "
        f"request (candidate at 0 %), the rollout's `shadow` flag off or on. Open-loop load at a fixed rate "
        f"(benchmarks/bench_predictor.py's generator, own process), {dur:.0f} s per run, off/on in {rounds} "
        f"alternating pair(s), median over rounds. Uncached = `Cache-Control: no-cache`, so every request "
        f"computes and (shadow on) is shadowed; cached = hits, which are never shadowed.\n"
    )
    print("| load | shadow | p50 ms | p95 ms | p99 ms | achieved req/s | errors | shadow rows logged |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    medians: dict[tuple[str, bool], dict[str, float]] = {}
    for kind, rate in (("uncached", args.uncached_rate), ("cached", args.cached_rate)):
        for on in (False, True):
            rs = runs[(kind, on)]
            m = {k: statistics.median(r[k] for r in rs) for k in ("p50_ms", "p95_ms", "p99_ms", "achieved")}
            medians[(kind, on)] = m
            p99s = "/".join(f"{r['p99_ms']:.1f}" for r in rs)
            print(
                f"| {kind}, {rate:.0f} req/s | {'on' if on else 'off'} | {m['p50_ms']:.2f} | {m['p95_ms']:.2f} | "
                f"{m['p99_ms']:.2f} (rounds {p99s}) | {m['achieved']:.0f} | {sum(r['errors'] for r in rs):.0f} | "
                f"{sum(int(r['shadows']) for r in rs)} |"
            )
    print()
    for kind in ("uncached", "cached"):
        pairs = list(zip(runs[(kind, False)], runs[(kind, True)], strict=True))
        d50 = [on["p50_ms"] - off["p50_ms"] for off, on in pairs]
        d99 = [on["p99_ms"] - off["p99_ms"] for off, on in pairs]
        print(
            f"- {kind}: shadow on minus off, per pair: p50 {'/'.join(f'{d:+.2f}' for d in d50)} ms (median "
            f"{statistics.median(d50):+.2f}), p99 {'/'.join(f'{d:+.1f}' for d in d99)} ms (median "
            f"{statistics.median(d99):+.1f})."
        )
    print(
        f"- CPU of one shadow scoring, measured in process (the candidate's ONNX run on a (20, 17) window, the "
        f"decision rule, the window's hash and base64, the log record): {cpu_us:.0f} µs (best of 5 x 2,000), "
        f"added once per computed entry, after the response is rendered."
    )
    print(
        f"- Shadow rows logged: {shadows_on_uncached} during the uncached runs with shadow on (one per computed "
        f"entry: concurrent identical no-cache requests share one computation, so fewer than requests), "
        f"{shadows_off} with shadow off; log totals by variant {json.dumps(variants, sort_keys=True)}."
    )


if __name__ == "__main__":
    main()
