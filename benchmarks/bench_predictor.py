"""Predictor benchmark: cached vs a bare FastAPI endpoint, uncached latency at fixed rates, ONNX vs Keras,
resident memory with 3 models. Prints a Markdown section.

Run: `.venv/bin/python -m benchmarks.bench_predictor [--quick]`. Needs PostgreSQL (DATABASE_URL, default
postgresql://postgres@127.0.0.1:5432/postgres), Redis (REDIS_URL, default redis://127.0.0.1:6379/0) and `wrk`.
Every server runs as its own uvicorn process (uvloop, httptools, no access log); the predictor and the bare
endpoint with the same number of workers (`--workers`, default 2), the indicators service with
`--indicators-workers` (default 1). Fixed-rate load comes from an open-loop generator run as
`python -m benchmarks.bench_predictor --loadgen ...` in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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

from benchmarks.common import (
    Paired,
    alternating,
    cpu_seconds,
    process_tree,
    processes_named,
    profile_top,
    warnings_of,
)
from shared.responses import JSON

ROOT = Path(__file__).resolve().parents[1]
READ_KEY = "bench-read-secret-0001"
WRITE_KEY = "bench-write-secret-001"
API_KEYS = f"reader:read:{READ_KEY},writer:write:{WRITE_KEY}"
SYMBOLS = ("BENCH1", "BENCH2", "BENCH3")
# Every server: uvloop + httptools (uvicorn[standard]), no access log; --workers is set per run (see main()).
UVICORN_ARGS = [
    "--host",
    "127.0.0.1",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--log-level",
    "warning",
    "--no-access-log",
]

# The bare endpoint the cached predictions are compared with: same server, same JSON renderer.
bare_app = FastAPI()


@bare_app.get("/health")
async def bare_health() -> dict[str, str]:
    return {"status": "ok"}


@bare_app.get("/bare")
async def bare() -> JSON:
    return JSON({"signal": "BUY", "confidence": 0.61, "cached": True})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(module: str, env: dict[str, str], log: Path, workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", module, "--port", str(port), "--workers", str(workers), *UVICORN_ARGS],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
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


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the open-loop generator: one request in flight at a time."""

    def __init__(self, gen: _OpenLoop) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.sent_at = 0.0
        self.need = -1  # bytes of the whole response once the head is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, at: float) -> None:
        assert self.transport is not None
        self.sent_at = at
        self.buf.clear()
        self.need = -1
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15 : head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            ok = self.buf[9:12] == b"200"
            self.gen.done(self, self.sent_at, ok)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class _OpenLoop:
    """Request i is written at t0 + i/rate on an idle keep-alive connection (a new one if none is idle),
    whatever the earlier ones do; latency counts from the scheduled time, so a stalled server shows up in
    the figures (no coordinated omission). Raw asyncio protocols on uvloop: about 20 µs of CPU a request,
    so the generator takes little of the 2 cores the servers need."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.idle: list[_Conn] = []
        self.latencies: list[float] = []
        self.errors = 0
        self.outstanding = 0
        self.all_done = asyncio.Event()
        self.finished_sending = False

    def done(self, conn: _Conn, at: float, ok: bool) -> None:
        self.latencies.append((time.perf_counter() - at) * 1000)
        if not ok:
            self.errors += 1
        self.idle.append(conn)
        self._settle()

    def lost(self, conn: _Conn) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        elif conn.sent_at:
            self.errors += 1
            self.latencies.append((time.perf_counter() - conn.sent_at) * 1000)
            self._settle()

    def _settle(self) -> None:
        self.outstanding -= 1
        if self.finished_sending and self.outstanding == 0:
            self.all_done.set()

    async def _fire(self, at: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except OSError:
            self.errors += 1
            self.latencies.append((time.perf_counter() - at) * 1000)
            self._settle()
            return
        conn.transport = transport  # uvloop may call connection_made only after this returns
        conn.send(at)

    async def run(self, rate: float, seconds: float) -> dict[str, float]:
        n = int(rate * seconds)
        t0 = time.perf_counter() + 0.1
        for i in range(n):
            at = t0 + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self.outstanding += 1
            if self.idle:
                self.idle.pop().send(at)
            else:
                asyncio.get_running_loop().create_task(self._fire(at))
        self.finished_sending = True
        if self.outstanding:
            await asyncio.wait_for(self.all_done.wait(), 60)
        elapsed = time.perf_counter() - t0
        q = np.percentile(self.latencies, [50, 95, 99])
        return {
            "rate": rate,
            "achieved": n / elapsed,
            "p50_ms": float(q[0]),
            "p95_ms": float(q[1]),
            "p99_ms": float(q[2]),
            "errors": self.errors,
        }


def predictor_env(env: dict[str, str], redis_url: str, indicators_url: str, store_url: str) -> dict[str, str]:
    """The predictor's environment: the indicators service's (`env`) plus Redis, the indicators URL and key, and
    the model store."""
    return {
        **env,
        "REDIS_URL": redis_url,
        "INDICATORS_URL": indicators_url,
        "INDICATORS_API_KEY": READ_KEY,
        "MODEL_STORE_URL": store_url,
    }


def first_prediction(url: str, body: dict[str, Any], timeout_s: float = 60.0) -> httpx.Response:
    """POST /v1/predictions until it answers 200; exits when it does not within `timeout_s`. With several workers
    /health answers as soon as one is up; the others may still be loading models and the indicators service
    warming up: the first prediction gets time before anything is measured."""
    deadline = time.monotonic() + timeout_s
    while True:
        first = httpx.post(url + "/v1/predictions", json=body, headers={"X-API-Key": READ_KEY}, timeout=10)
        if first.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if first.status_code != 200:
        raise SystemExit(f"first prediction failed: {first.status_code} {first.text}")
    return first


def open_loop(
    url: str, body: dict[str, Any], rate: float, seconds: float, *, no_cache: bool = True
) -> dict[str, float]:
    """Runs the open-loop generator in its own process (uvloop), so it neither shares this process's GIL nor
    slows because of it. `no_cache`: every request sends `Cache-Control: no-cache` (each one computes)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_predictor",
            "--loadgen",
            url,
            str(rate),
            str(seconds),
            json.dumps(body),
            "1" if no_cache else "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 120,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def loadgen_main(url: str, rate: float, seconds: float, body_json: str, no_cache: bool = True) -> None:
    """The generator's process: `rate` POST /v1/predictions a second for `seconds`; prints its result as JSON."""
    import uvloop

    host, port = url.removeprefix("http://").split(":")
    body = body_json.encode()
    cache = "Cache-Control: no-cache\r\n" if no_cache else ""
    request = (
        f"POST /v1/predictions HTTP/1.1\r\nHost: {host}:{port}\r\nX-API-Key: {READ_KEY}\r\n{cache}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    result = uvloop.run(_OpenLoop(host, int(port), request).run(rate, seconds))
    print(json.dumps(result))


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
    spec = (tf.TensorSpec((None, 20, 17), tf.float32, name="features"),)
    # from_keras trips over Keras 3 Sequential output names (tf2onnx 1.17); the traced function is the same graph.
    fn = tf.function(lambda t: model(t, training=False), input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(50):
        sess.run(None, {name: x})
    # Alternating pairs (the method of every side-by-side figure): each pair times a block of Keras calls, then
    # a block of onnxruntime calls; the per-pair ratio is of the two blocks' medians.
    keras_ms, ort_ms, keras_pair, ort_pair = [], [], [], []
    for _ in range(N_PAIRS):
        k = []
        for _ in range(N_KERAS):
            t = time.perf_counter(); model.predict(x, verbose=0); k.append((time.perf_counter() - t) * 1000)
        o = []
        for _ in range(200):
            t = time.perf_counter(); sess.run(None, {name: x}); o.append((time.perf_counter() - t) * 1000)
        keras_ms += k; ort_ms += o
        keras_pair.append(float(np.median(k))); ort_pair.append(float(np.median(o)))
    diff = float(np.abs(sess.run(None, {name: x})[0] - model.predict(x, verbose=0)).max())
    print(json.dumps({"keras_p50_ms": float(np.median(keras_ms)), "ort_p50_ms": float(np.median(ort_ms)),
                      "max_abs_diff": diff, "keras_pair_ms": keras_pair, "ort_pair_ms": ort_pair}))
    """
)


def keras_vs_onnx(quick: bool) -> dict[str, Any] | None:
    script = KERAS_SCRIPT.replace("N_KERAS", "4" if quick else "10").replace("N_PAIRS", "5" if quick else "10")
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        print(f"<!-- keras subprocess failed: {exc} -->", file=sys.stderr)
        return None
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median throughput (its latencies come with it)."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    return ordered[len(ordered) // 2]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_rss_mb(pid: int) -> tuple[float, float]:
    """(largest serving process, all of them with the uvicorn supervisor): with 1 worker the uvicorn process
    itself serves; with several, each worker child holds the 3 models."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    sizes = [rss_mb(k) for k in kids]
    return max(sizes, default=rss_mb(pid)), sum(sizes) + rss_mb(pid)


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


async def _log_size(db_url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM predictions) AS predictions, (SELECT count(*) FROM prediction_windows) "
            "AS windows, (pg_total_relation_size('predictions') + pg_total_relation_size('prediction_windows')) "
            "/ 1048576.0 AS mb"
        )
    finally:
        await conn.close()
    assert row is not None
    return {"predictions": row["predictions"], "windows": row["windows"], "mb": float(row["mb"])}


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
    # 2: on this 2-core machine both the bare endpoint and the predictor serve more with 2 (docs/PREDICTOR.md).
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers of the predictor and the bare app")
    parser.add_argument("--indicators-workers", type=int, default=1, help="uvicorn workers of the indicators service")
    parser.add_argument("--rates", default="200,400,600,800,1000", help="open-loop rates (req/s), comma-separated")
    parser.add_argument(
        "--step", type=float, default=200, help="after the last rate: step up by this much (2.5x it past 2,000) ..."
    )
    parser.add_argument("--max-rate", type=float, default=8000, help="... until p95 >= 100 ms or this rate")
    parser.add_argument("--no-keras", action="store_true", help="skip the Keras-vs-onnxruntime row")
    parser.add_argument(
        "--loadgen", nargs=5, metavar=("URL", "RATE", "SECONDS", "BODY", "NO_CACHE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.loadgen:
        url, rate, seconds, body_json, no_cache = args.loadgen
        loadgen_main(url, float(rate), float(seconds), body_json, no_cache == "1")
        return
    dur = 3 if args.quick else 10
    tdur = 3 if args.quick else 6  # a throughput run: shorter, more rounds
    rounds = 3 if args.quick else 7
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")

    from shared.bars import bars_to_rows as bars_json
    from shared.features import feature_rows  # the benchmark may use TA-Lib; the predictor process does not
    from shared.local_services import scratch_database
    from tests.data import generate_bars

    server_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    tmp = Path(tempfile.mkdtemp(prefix="bench-predictor-"))
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(scratch_database(server_url, "aicash_bench"))
        stack.callback(shutil.rmtree, tmp, True)
        stack.callback(_stop_all, procs)
        store_url = f"file://{tmp / 'models'}"
        bars = generate_bars("H1", 3000, seed=7)
        env = {"DATABASE_URL": db_url, "API_KEYS": API_KEYS, "ENVIRONMENT": "test", "LOG_LEVEL": "WARNING"}
        p, ind_url = start("services.indicators.main:app", env, tmp / "indicators.log", args.indicators_workers)
        procs.append(p)
        with httpx.Client(base_url=ind_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as c:
            for s in SYMBOLS:
                c.post(f"/v1/bars/{s}/H1", json={"bars": bars_json(bars)}).raise_for_status()
        values = feature_rows(bars).values
        asyncio.run(setup_models(db_url, store_url, (values.mean(0).tolist(), values.std(0).tolist())))
        penv = predictor_env(env, redis_url, ind_url, store_url)
        pred, pred_url = start("services.predictor.main:app", penv, tmp / "predictor.log", args.workers)
        procs.append(pred)
        bare_proc, bare_url = start("benchmarks.bench_predictor:bare_app", {}, tmp / "bare.log", args.workers)
        procs.append(bare_proc)

        body = {"symbol": SYMBOLS[0], "timeframe": "H1"}
        h = {"X-API-Key": READ_KEY}
        first_prediction(pred_url, body)
        assert httpx.post(pred_url + "/v1/predictions", json=body, headers=h).json()["cached"] is True

        # Bare, floor and cached in alternating rounds (the order rotating); every ratio is the median of the
        # per-round ratios, with their range: one slow moment hits one round's sides together, not one side.
        cached_lua = lua_post(tmp / "cached.lua", body, no_cache=False)
        servers = {"bare": process_tree(bare_proc.pid), "predictor": process_tree(pred.pid)}

        def measured(url: str, lua: Path | None, server: str) -> dict[str, float]:
            """A wrk run, and the CPU its server's processes and PostgreSQL's used per request meanwhile."""
            pg = processes_named("postgres")
            before = cpu_seconds(servers[server]), cpu_seconds(pg)
            r = wrk(url, tdur, 32, lua)
            n = r["rps"] * tdur
            r["cpu_us"] = (cpu_seconds(servers[server]) - before[0]) / n * 1e6
            r["pg_us"] = (cpu_seconds(pg) - before[1]) / n * 1e6
            return r

        runs = alternating(
            {
                "bare": lambda: measured(bare_url + "/bare", None, "bare"),
                "floor": lambda: measured(pred_url + "/health", None, "predictor"),
                "cached": lambda: measured(pred_url + "/v1/predictions", cached_lua, "predictor"),
            },
            rounds,
        )
        cpu = {
            k: (float(np.median([r["cpu_us"] for r in v])), float(np.median([r["pg_us"] for r in v])))
            for k, v in runs.items()
        }
        rps = {k: [r["rps"] for r in v] for k, v in runs.items()}
        cached_vs_bare = Paired(rps["bare"], rps["cached"])
        cached_vs_floor = Paired(rps["floor"], rps["cached"])
        floor_vs_bare = Paired(rps["bare"], rps["floor"])
        cached_r = _median_run(runs["cached"])
        profile_cached = profile_top(pred.pid, lambda: wrk(pred_url + "/v1/predictions", tdur, 32, cached_lua), tdur)
        uncached_closed = wrk(pred_url + "/v1/predictions", dur, 8, lua_post(tmp / "nc.lua", body, no_cache=True))
        # Open loop: the given rates, then on in steps past the last until p95 crosses 100 ms (or the rate is
        # not achieved): the saturation rate.
        rates = [float(r) for r in args.rates.split(",")]
        fixed = []
        rate = rates[0]
        while True:
            fixed.append(open_loop(pred_url, body, rate, dur))
            time.sleep(1)  # let the log writer and PostgreSQL catch up, so runs do not inherit backlog
            if len(fixed) < len(rates):
                rate = rates[len(fixed)]
                continue
            last = fixed[-1]
            if last["p95_ms"] >= 100 or last["achieved"] < 0.95 * last["rate"] or rate >= args.max_rate:
                break
            rate += args.step if rate < 2000 else 2.5 * args.step
        profile_uncached = profile_top(
            pred.pid, lambda: open_loop(pred_url, body, rates[len(rates) // 2], dur), int(dur)
        )
        # The 200 req/s run once more at the end: a drift from the first one is work accumulating.
        again = open_loop(pred_url, body, rates[0], dur)
        rss = worker_rss_mb(pred.pid)
        models = httpx.get(pred_url + "/v1/models", headers=h).json()
        time.sleep(1)
        log_size = asyncio.run(_log_size(db_url))
        kv = None if args.no_keras else keras_vs_onnx(args.quick)

    print("## Predictor benchmark\n")
    print(
        f"Machine: {os.cpu_count()} cores, shared by every server, PostgreSQL, Redis and the load generator. "
        f"uvicorn `{' '.join(UVICORN_ARGS[2:])}`, {args.workers} worker(s) for the predictor and the bare "
        f"endpoint alike, {args.indicators_workers} for the indicators service. Load: wrk 2 threads (closed loop) "
        f"for throughput; for fixed rates an open-loop generator (raw asyncio protocols on uvloop, own process, "
        f"keep-alive connections opened as needed; latency from each request's scheduled send time, so no "
        f"coordinated omission). Uncached = the same stored-bars request with `Cache-Control: no-cache` (full "
        f"pipeline each time: stamp, indicators over HTTP, ONNX, log). {tdur} s per throughput run, {dur} s per "
        f"fixed-rate run.\n"
    )
    each = "; ".join(f"{k} " + " / ".join(f"{x:,.0f}" for x in v) for k, v in rps.items())
    print(
        f"Throughput: {rounds} rounds of bare, floor and cached, one after the other, the order rotating from "
        f"round to round. Each ratio is the median of the {rounds} per-round ratios, with their range (a spread "
        f"over 20 points is flagged ⚠); the req/s are the medians of each side, context only ({each} req/s).\n"
    )
    print("| measurement | figure | target |")
    print("| --- | --- | --- |")
    print(f"| bare FastAPI JSON endpoint, wrk 32 connections | {np.median(rps['bare']):.0f} req/s | |")
    print(
        f"| predictor app, trivial GET /health (its shared middleware, no prediction code), wrk 32 connections | "
        f"{np.median(rps['floor']):.0f} req/s; {floor_vs_bare.percent()} of bare | |"
    )
    print(
        f"| cached predictions (POST, stored bars), wrk 32 connections | {np.median(rps['cached']):.0f} req/s, "
        f"p99 {cached_r.get('p99_ms', 0):.1f} ms | |"
    )
    print(f"| cached / bare | {cached_vs_bare.percent()} | ≥ 60 % |")
    print(f"| cached / the predictor's /health floor | {cached_vs_floor.percent()} | ≥ 80 % |")
    print(
        "| CPU per request of the serving processes (all workers; /proc times over each run, median of the rounds), "
        "and of PostgreSQL's processes | "
        + "; ".join(f"{k} {c:.1f} µs (+ PostgreSQL {g:.1f} µs)" for k, (c, g) in cpu.items())
        + " | |"
    )
    print(
        f"| uncached predictions, wrk 8 connections (closed loop, highest load) | {uncached_closed['rps']:.0f} "
        f"req/s, p50 {uncached_closed.get('p50_ms', 0):.1f} ms, p99 {uncached_closed.get('p99_ms', 0):.1f} ms | |"
    )
    for f in fixed:
        print(
            f"| uncached, open loop {f['rate']:.0f} req/s (achieved {f['achieved']:.0f}) | p50 {f['p50_ms']:.1f} "
            f"ms, p95 {f['p95_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms, errors {f['errors']:.0f} | "
            f"{'p99 < 50 ms' if f['rate'] == 200 else 'p95 < 100 ms' if f['rate'] <= 1000 else ''} |"
        )
    print(
        f"| uncached, open loop {again['rate']:.0f} req/s again, after all the runs (achieved "
        f"{again['achieved']:.0f}) | p50 {again['p50_ms']:.1f} ms, p95 {again['p95_ms']:.1f} ms, p99 "
        f"{again['p99_ms']:.1f} ms, errors {again['errors']:.0f} | no drift |"
    )
    held = [f["rate"] for f in fixed if f["p95_ms"] < 100 and f["achieved"] >= 0.95 * f["rate"]]
    crossed = [f["rate"] for f in fixed if f["rate"] not in held]
    print(
        f"| saturation: highest measured rate with p95 < 100 ms (and ≥ 95 % of it achieved) | "
        f"{max(held) if held else 0:.0f} req/s; "
        + (f"crossed at {min(crossed):.0f} req/s" if crossed else f"not crossed up to {fixed[-1]['rate']:.0f} req/s")
        + " | |"
    )
    print(
        f"| prediction log after the runs | {log_size['predictions']} predictions, {log_size['windows']} "
        f"windows, {log_size['mb']:.1f} MB | |"
    )
    pair_figures = [cached_vs_bare, cached_vs_floor, floor_vs_bare]
    if kv:
        keras_factor = Paired(kv["ort_pair_ms"], kv["keras_pair_ms"], factor=True)
        pair_figures.append(keras_factor)
        print(
            f"| one (1, 20, 17) sequence, 2-layer LSTM: Keras predict() vs onnxruntime (1 thread) | "
            f"{kv['keras_p50_ms']:.2f} ms vs {kv['ort_p50_ms'] * 1000:.0f} µs; per pair "
            f"{keras_factor.median:.0f}× (pairs {keras_factor.lo:.0f}–{keras_factor.hi:.0f}×, "
            f"n={len(keras_factor.a)}){' ⚠' if keras_factor.warning else ''} "
            f"(max diff {kv['max_abs_diff']:.1e}) | >= 100x |"
        )
    else:
        why = "--no-keras" if args.no_keras else "TensorFlow subprocess failed"
        print(f"| Keras vs onnxruntime | not measured ({why}) | >= 100x |")
    print(
        f"| predictor resident memory, {len(models)} models loaded, after the runs | {rss[0]:.0f} MB per serving "
        f"process ({args.workers} worker(s); all processes together {rss[1]:.0f} MB) | < 300 MB |"
    )
    warn = warnings_of(*pair_figures)
    if warn:
        print("\n" + "\n".join(warn))
    print("\n### Where the time goes: cached predictions\n")
    print(
        f"py-spy on the predictor's {args.workers} worker(s) during one more cached wrk run (32 connections, "
        f"{tdur} s), after the measured rounds. Self = samples in the function itself; total = in it or what "
        "it called, for this project's functions. C code (uvloop, httptools, orjson, onnxruntime, a socket "
        "write) counts to the Python function calling it; the by-package shares put each self sample with the "
        "package of its function.\n"
    )
    print("\n".join(profile_cached))
    print("\n### Where the time goes: uncached predictions\n")
    print(
        f"The same during an open-loop run at {rates[len(rates) // 2]:.0f} req/s with `Cache-Control: no-cache` "
        "(predictor only: the indicators service, PostgreSQL and Redis are other processes).\n"
    )
    print("\n".join(profile_uncached))


if __name__ == "__main__":
    main()
