"""Predictor benchmark: cached vs a bare FastAPI endpoint, uncached latency at fixed rates, ONNX vs Keras,
resident memory with 3 models. Prints a Markdown section.

Run: `.venv/bin/python -m benchmarks.bench_predictor [--quick]`. Needs PostgreSQL (DATABASE_URL, default
postgresql://postgres@127.0.0.1:5432/postgres), Redis (REDIS_URL, default redis://127.0.0.1:6379/0) and `wrk`.
Every server runs as its own plain-uvicorn process with the same settings (1 worker).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
from fastapi import FastAPI
from fastapi.responses import ORJSONResponse

ROOT = Path(__file__).resolve().parents[1]
READ_KEY = "bench-read-secret-0001"
WRITE_KEY = "bench-write-secret-001"
API_KEYS = f"reader:read:{READ_KEY},writer:write:{WRITE_KEY}"
SYMBOLS = ("BENCH1", "BENCH2", "BENCH3")
UVICORN_ARGS = ["--host", "127.0.0.1", "--workers", "1", "--log-level", "warning", "--no-access-log"]

# The bare endpoint the cached predictions are compared with: same server, same JSON renderer.
bare_app = FastAPI()


@bare_app.get("/health")
async def bare_health() -> dict[str, str]:
    return {"status": "ok"}


@bare_app.get("/bare")
async def bare() -> ORJSONResponse:
    return ORJSONResponse({"signal": "BUY", "confidence": 0.61, "cached": True})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(module: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", module, "--port", str(port), *UVICORN_ARGS],
            cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{module} exited; see {log}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"{module} did not start; see {log}")


def wrk(url: str, seconds: int, connections: int, lua: Path | None) -> dict[str, float]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if lua is not None:
        cmd += ["-s", str(lua)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(parts[1])
        elif parts and parts[0] in ("50%", "99%"):
            result[f"p{parts[0][:-1]}_ms"] = _ms(parts[1])
        elif "Non-2xx" in line:
            result["non2xx"] = float(parts[-1])
    return result


def _ms(text: str) -> float:
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def lua_post(path: Path, body: dict[str, Any], no_cache: bool) -> Path:
    headers = f'wrk.headers["X-API-Key"] = "{READ_KEY}"\nwrk.headers["Content-Type"] = "application/json"\n'
    if no_cache:
        headers += 'wrk.headers["Cache-Control"] = "no-cache"\n'
    path.write_text(f'wrk.method = "POST"\nwrk.body = [[{json.dumps(body)}]]\n{headers}')
    return path


async def open_loop(url: str, body: dict[str, Any], rate: float, seconds: float) -> dict[str, float]:
    """Constant-rate open-loop load: request i is sent at t0 + i/rate whatever the earlier ones do, and its
    latency counts from that scheduled time (no coordinated omission)."""
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    headers = {"X-API-Key": READ_KEY, "Cache-Control": "no-cache"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10, headers=headers) as client:
        async def one(at: float) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            try:
                r = await client.post("/v1/predictions", json=body)
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            latencies.append((time.perf_counter() - at) * 1000)

        t0 = time.perf_counter() + 0.2
        await asyncio.gather(*(one(t0 + i / rate) for i in range(n)))
        achieved = n / (time.perf_counter() - t0)
    q = np.percentile(latencies, [50, 95, 99])
    return {"rate": rate, "achieved": achieved, "p50_ms": q[0], "p95_ms": q[1], "p99_ms": q[2], "errors": errors}


KERAS_SCRIPT = textwrap.dedent(
    """
    import json, time, os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np, tensorflow as tf, keras, tf2onnx, onnxruntime as ort
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((20, 17), name="features"), keras.layers.LSTM(64, return_sequences=True),
                              keras.layers.LSTM(32), keras.layers.Dense(3, activation="softmax")])
    x = np.random.default_rng(1).normal(size=(1, 20, 17)).astype(np.float32)
    for _ in range(5):
        model.predict(x, verbose=0)
    keras_ms = []
    for _ in range(N_KERAS):
        t = time.perf_counter(); model.predict(x, verbose=0); keras_ms.append((time.perf_counter() - t) * 1000)
    spec = (tf.TensorSpec((None, 20, 17), tf.float32, name="features"),)
    # from_keras trips over Keras 3 Sequential output names (tf2onnx 1.17); the traced function is the same graph.
    fn = tf.function(lambda t: model(t, training=False), input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(50):
        sess.run(None, {name: x})
    ort_ms = []
    for _ in range(2000):
        t = time.perf_counter(); sess.run(None, {name: x}); ort_ms.append((time.perf_counter() - t) * 1000)
    diff = float(np.abs(sess.run(None, {name: x})[0] - model.predict(x, verbose=0)).max())
    print(json.dumps({"keras_p50_ms": float(np.median(keras_ms)), "ort_p50_ms": float(np.median(ort_ms)),
                      "max_abs_diff": diff}))
    """
)


def keras_vs_onnx(quick: bool) -> dict[str, float] | None:
    script = KERAS_SCRIPT.replace("N_KERAS", "20" if quick else "100")
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"<!-- keras subprocess failed: {exc} -->", file=sys.stderr)
        return None
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def setup_models(db_url: str, store_url: str, scaler: tuple[list[float], list[float]]) -> None:
    from shared.storage import store_from_url
    from tests.predictor.model_factory import register, write_model

    store = store_from_url(store_url)
    for i, symbol in enumerate(SYMBOLS):
        sha = write_model(store, symbol, "H1", "v1", seed=i + 1, mean=scaler[0], scale=scaler[1], temperature=1.3)
        await register(db_url, store, symbol, "H1", "v1", sha)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    args = parser.parse_args()
    dur = 3 if args.quick else 10
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")

    from shared.features import feature_rows  # the benchmark may use TA-Lib; the predictor process does not
    from shared.migrate import upgrade
    from tests.conftest import _with_db, bars_json
    from tests.data import generate_bars

    server_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    db = f"aicash_bench_{secrets.token_hex(3)}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{db}"'))
    db_url = _with_db(server_url, db)
    tmp = Path(tempfile.mkdtemp(prefix="bench-predictor-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        upgrade(db_url)
        store_url = f"file://{tmp / 'models'}"
        bars = generate_bars("H1", 3000, seed=7)
        env = {"DATABASE_URL": db_url, "API_KEYS": API_KEYS, "ENVIRONMENT": "test", "LOG_LEVEL": "WARNING"}
        p, ind_url = start("services.indicators.main:app", env, tmp / "indicators.log")
        procs.append(p)
        with httpx.Client(base_url=ind_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as c:
            for s in SYMBOLS:
                c.post(f"/v1/bars/{s}/H1", json={"bars": bars_json(bars)}).raise_for_status()
        values = feature_rows(bars).values
        asyncio.run(setup_models(db_url, store_url, (values.mean(0).tolist(), values.std(0).tolist())))
        penv = {**env, "REDIS_URL": redis_url, "INDICATORS_URL": ind_url, "INDICATORS_API_KEY": READ_KEY,
                "MODEL_STORE_URL": store_url}
        pred, pred_url = start("services.predictor.main:app", penv, tmp / "predictor.log")
        procs.append(pred)
        p, bare_url = start("benchmarks.bench_predictor:bare_app", {}, tmp / "bare.log")
        procs.append(p)

        body = {"symbol": SYMBOLS[0], "timeframe": "H1"}
        h = {"X-API-Key": READ_KEY}
        first = httpx.post(pred_url + "/v1/predictions", json=body, headers=h, timeout=10)
        first.raise_for_status()
        assert httpx.post(pred_url + "/v1/predictions", json=body, headers=h).json()["cached"] is True

        bare_r = wrk(bare_url + "/bare", dur, 32, None)
        cached_r = wrk(pred_url + "/v1/predictions", dur, 32, lua_post(tmp / "cached.lua", body, no_cache=False))
        uncached_closed = wrk(pred_url + "/v1/predictions", dur, 8, lua_post(tmp / "nc.lua", body, no_cache=True))
        rates = [200.0, 300.0, 400.0]
        fixed = [asyncio.run(open_loop(pred_url, body, r, dur)) for r in rates]
        rss = rss_mb(pred.pid)
        models = httpx.get(pred_url + "/v1/models", headers=h).json()
        kv = keras_vs_onnx(args.quick)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = cached_r["rps"] / bare_r["rps"]
    print("## Predictor benchmark\n")
    print(f"Machine: {os.cpu_count()} cores; plain uvicorn, 1 worker, for every server; load: wrk (closed loop, "
          f"2 threads) and a Python asyncio/httpx open-loop generator (constant rate); {dur} s per run.\n")
    print("| measurement | figure | target |")
    print("| --- | --- | --- |")
    print(f"| bare FastAPI JSON endpoint, wrk 32 connections | {bare_r['rps']:.0f} req/s | |")
    print(f"| cached predictions (POST, stored bars), wrk 32 connections | {cached_r['rps']:.0f} req/s "
          f"({ratio:.0%} of bare), p99 {cached_r.get('p99_ms', 0):.1f} ms | >= 50 % of bare |")
    print(f"| uncached predictions, wrk 8 connections (closed loop, highest load) | {uncached_closed['rps']:.0f} "
          f"req/s, p50 {uncached_closed.get('p50_ms', 0):.1f} ms, p99 {uncached_closed.get('p99_ms', 0):.1f} ms | |")
    for f in fixed:
        print(f"| uncached, open loop {f['rate']:.0f} req/s (achieved {f['achieved']:.0f}) | p50 {f['p50_ms']:.1f} "
              f"ms, p95 {f['p95_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms, errors {f['errors']:.0f} | "
              f"{'p99 < 50 ms' if f['rate'] == 200 else 'p95 < 100 ms'} |")
    if kv:
        print(f"| one (1, 20, 17) sequence, 2-layer LSTM: Keras predict() vs onnxruntime (1 thread) | "
              f"{kv['keras_p50_ms']:.2f} ms vs {kv['ort_p50_ms'] * 1000:.0f} µs = "
              f"{kv['keras_p50_ms'] / kv['ort_p50_ms']:.0f}x (max diff {kv['max_abs_diff']:.1e}) | >= 100x |")
    else:
        print("| Keras vs onnxruntime | not measured (TensorFlow subprocess failed) | >= 100x |")
    print(f"| predictor resident memory, {len(models)} models loaded, after the runs | {rss:.0f} MB | < 300 MB |")


if __name__ == "__main__":
    main()
