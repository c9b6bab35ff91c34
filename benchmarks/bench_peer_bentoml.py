"""Peer benchmark: our predictor against the same ONNX model served by BentoML, same machine, same load
generator (wrk), in one run, the sides alternating. Prints a Markdown section.

Run: `.venv/bin/python -m benchmarks.bench_peer_bentoml [--quick]`. Needs what `benchmarks.bench_predictor`
needs (PostgreSQL, Redis, wrk) and network access to PyPI the first time: BentoML lives in a venv of its own,
made here at var/bench/bentoml-venv with pinned versions and reused while the pins match. It is not one of the
project's dependencies because BentoML pins its own starlette and OpenTelemetry stack, which would then decide
the versions the services run with; the peer's code (`benchmarks/peers/bentoml_service.py`) runs only there.

Sides, each a uvicorn-served process group with `--workers` worker processes (uvloop and httptools on both):
- each framework's floor: our predictor's `GET /health`, BentoML's `POST /ping` (an API that does nothing);
- ours, cached: `POST /v1/predictions` for stored bars, answered from the cache (and logged);
- ours, uncached: the same with `Cache-Control: no-cache`: the predictor asks the indicators service for the
  feature window of the stored bars (HTTP; the service reads PostgreSQL and computes), runs ONNX, caches, logs;
- ours, uncached, bars in the request: the bars sent in the body; the predictor checks them and sends them on
  to the indicators service, which computes the features;
- BentoML, window: the 20 x 17 feature window in the body; scale, ONNX, calibrate, answer;
- BentoML, bars: the same bars as ours in the body; `shared.features` computes the features in the BentoML
  worker, then as the window endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.bench_predictor import (
    API_KEYS,
    READ_KEY,
    SYMBOLS,
    WRITE_KEY,
    _ms,
    _stop_all,
    first_prediction,
    predictor_env,
    setup_models,
    start,
)
from benchmarks.common import Paired, alternating, profile_top, warnings_of

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "var" / "bench" / "bentoml-venv"
BENTOML_VERSION = "1.4.40"
# Every library both sides run (the ONNX kernels, the feature kernels, the event loop and HTTP parser) at the
# project venv's own version, so the sides differ in the serving stack only.
SHARED_PINS = ("onnxruntime", "numpy", "TA-Lib", "uvloop", "httptools")
PEER_APP = "benchmarks.peers.bentoml_service:PeerPredictor"
BARS_SENT = 540  # 500 warm-up bars + the 20-row window + 20 to spare, the same bars to both sides


def pins() -> list[str]:
    return [f"bentoml=={BENTOML_VERSION}", *(f"{p}=={version(p)}" for p in SHARED_PINS)]


def ensure_venv() -> tuple[Path, float | None]:
    """The BentoML venv's python and, when it had to be made, the seconds that took (None: reused)."""
    python = VENV / "bin" / "python"
    marker = VENV / "aicash-pins.txt"
    wanted = "\n".join(pins()) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python, None
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter under the project's venv
    t0 = time.perf_counter()
    uv = sorted((ROOT / "var" / "tools").glob("uv-*/bin/uv"))
    if uv:
        # uv would otherwise try to download a managed CPython (docs/FIELD-NOTES: no network for that here).
        env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
        subprocess.run([str(uv[-1]), "venv", "-q", "--python", base, str(VENV)], check=True, env=env)
        cmd = [str(uv[-1]), "pip", "install", "-q", "--python", str(python), *pins()]
        subprocess.run(cmd, check=True, env=env)
    else:
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *pins()], check=True)
    marker.write_text(wanted)
    return python, time.perf_counter() - t0


def venv_versions(python: Path) -> dict[str, str]:
    names = ["bentoml", "starlette", "uvicorn", "pydantic", "opentelemetry-sdk", *SHARED_PINS]
    code = (
        "import json, sys; from importlib.metadata import version; "
        "print(json.dumps({n: version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def start_bentoml(
    python: Path, model_dir: Path, workers: int, home: Path, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    from shared.local_services import free_port

    port = free_port()
    env = {
        **os.environ,
        "PEER_MODEL_DIR": str(model_dir),
        "PEER_WORKERS": str(workers),
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    cmd = [str(python.parent / "bentoml"), "serve", PEER_APP, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--working-dir", str(ROOT)]
    with log.open("ab") as out:
        # Own session: `bentoml serve` supervises its workers (circus); the group is stopped together.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"bentoml serve did not get ready; see {log}")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and every process under it."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total


def wrk_script(path: Path, body: dict[str, Any], no_cache: bool) -> Path:
    """A wrk script POSTing `body` as JSON. A level-2 long bracket (`[==[`): a JSON window of rows holds `]]`,
    which would close `lua_post`'s `[[ ... ]]` string early (wrk then fails every request)."""
    text = json.dumps(body)
    assert "]==]" not in text
    headers = {
        "X-API-Key": READ_KEY,
        "Content-Type": "application/json",
        **({"Cache-Control": "no-cache"} if no_cache else {}),
    }
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{text}]==]"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk(url: str, seconds: int, connections: int, script: Path | None) -> dict[str, float]:
    """`bench_predictor.wrk`'s figures (rps, p50_ms, p99_ms, non2xx) and wrk's socket errors (connect, read,
    write, timeout) as `socket_errors`. A 10 s timeout instead of wrk's 2 s: the slowest side (bars in the
    request) queues for seconds at 32 connections on a busy machine, and a request wrk times out is in no
    latency figure."""
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = {"non2xx": 0.0, "socket_errors": 0.0}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(parts[1])
        elif parts and parts[0] in ("50%", "99%"):
            result[f"p{parts[0][:-1]}_ms"] = _ms(parts[1])
        elif "Non-2xx" in line:
            result["non2xx"] = float(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            result["socket_errors"] = float(sum(int(n.rstrip(",")) for n in parts[3::2]))
    return result


def self_only(line: str) -> str:
    """A row of `profile_top`'s table without its two "total" columns (they list this project's functions,
    and BentoML's workers run none of them)."""
    if not line.startswith("| "):
        return line
    return " | ".join(line.split(" | ")[:3]) + " |"


def post(url: str, body: dict[str, Any], no_cache: bool = False) -> dict[str, Any]:
    headers = {"X-API-Key": READ_KEY, **({"Cache-Control": "no-cache"} if no_cache else {})}
    r = httpx.post(url, json=body, headers=headers, timeout=30)
    if r.status_code != 200:
        raise SystemExit(f"POST {url} answered {r.status_code}: {r.text[:500]}")
    return dict(r.json())


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(abs(float(a["probabilities"][c]) - float(b["probabilities"][c])) for c in ("SELL", "HOLD", "BUY"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the predictor and of BentoML")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections, every side")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    seconds = 3 if args.quick else 5
    rounds = 3 if args.quick else 5

    from shared.bars import bars_to_rows
    from shared.features import feature_rows
    from shared.local_services import scratch_database
    from shared.model_metadata import artifact_prefix
    from tests.data import generate_bars

    python, venv_s = ensure_venv()
    peer_versions = venv_versions(python)

    server_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    tmp = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(scratch_database(server_url, "aicash_bench"))
        stack.callback(shutil.rmtree, tmp, True)
        stack.callback(_stop_all, procs)
        store_url = f"file://{tmp / 'models'}"
        bars = generate_bars("H1", 3000, seed=7)
        symbol = SYMBOLS[0]
        env = {"DATABASE_URL": db_url, "API_KEYS": API_KEYS, "ENVIRONMENT": "test", "LOG_LEVEL": "WARNING"}
        p, ind_url = start("services.indicators.main:app", env, tmp / "indicators.log", 1)
        procs.append(p)
        with httpx.Client(base_url=ind_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as c:
            for s in SYMBOLS:
                c.post(f"/v1/bars/{s}/H1", json={"bars": bars_to_rows(bars)}).raise_for_status()
        values = feature_rows(bars).values
        asyncio.run(setup_models(db_url, store_url, (values.mean(0).tolist(), values.std(0).tolist())))
        pred, pred_url = start(
            "services.predictor.main:app",
            predictor_env(env, redis_url, ind_url, store_url),
            tmp / "predictor.log",
            args.workers,
        )
        procs.append(pred)
        # The very files the predictor loaded (model.onnx, metadata.json), from its store.
        model_dir = tmp / "models" / artifact_prefix(symbol, "H1", "v1")
        bento, bento_url = start_bentoml(python, model_dir, args.workers, tmp / "bentoml-home", tmp / "bentoml.log")
        stack.callback(stop_group, bento)

        stored = {"symbol": symbol, "timeframe": "H1"}
        sent = bars_to_rows(bars.tail(BARS_SENT))
        with_bars = {**stored, "bars": sent}
        window = {"features": values[-20:].tolist()}  # the stored bars' newest 20 feature rows
        first_prediction(pred_url, stored)

        # Equivalence: each BentoML endpoint gives the probabilities our predictor gives for the same input.
        ours_stored = post(pred_url + "/v1/predictions", stored, no_cache=True)
        ours_bars = post(pred_url + "/v1/predictions", with_bars, no_cache=True)
        peer_window = post(bento_url + "/window", window)
        peer_bars = post(bento_url + "/bars", {"bars": sent})
        diffs = (max_diff(ours_stored, peer_window), max_diff(ours_bars, peer_bars))
        if max(diffs) > 2e-6:  # both sides round to 6 decimals
            raise SystemExit(f"the sides disagree: {ours_stored} vs {peer_window}; {ours_bars} vs {peer_bars}")
        refused = httpx.post(bento_url + "/window", json={"features": [[0.0] * 17] * 19}, timeout=10).status_code

        url = pred_url + "/v1/predictions"
        sides: dict[str, tuple[str, Path | None]] = {
            "ours_floor": (pred_url + "/health", None),
            "bento_floor": (bento_url + "/ping", wrk_script(tmp / "ping.lua", {}, no_cache=False)),
            "ours_cached": (url, wrk_script(tmp / "cached.lua", stored, no_cache=False)),
            "ours_uncached": (url, wrk_script(tmp / "uncached.lua", stored, no_cache=True)),
            "ours_uncached_bars": (url, wrk_script(tmp / "uncached_bars.lua", with_bars, no_cache=True)),
            "bento_window": (bento_url + "/window", wrk_script(tmp / "window.lua", window, no_cache=False)),
            "bento_bars": (bento_url + "/bars", wrk_script(tmp / "bars.lua", {"bars": sent}, no_cache=False)),
        }
        for target, script in sides.values():  # warm-up: connections, caches, each worker's first requests
            wrk(target, 2, args.connections, script)

        def run(name: str) -> dict[str, float]:
            target, script = sides[name]
            return wrk(target, seconds, args.connections, script)

        runs = alternating({name: functools.partial(run, name) for name in sides}, rounds)
        # Where BentoML's time goes, on its own load after the measured rounds (py-spy over its workers).
        profile = [self_only(line) for line in profile_top(bento.pid, functools.partial(run, "bento_window"), seconds)]
        rss_ours = tree_rss_mb(pred.pid)
        rss_peer = tree_rss_mb(bento.pid)

    non2xx = {k: sum(r["non2xx"] for r in v) for k, v in runs.items()}
    if any(non2xx.values()):  # an endpoint that refuses requests is broken, its figures meaningless
        raise SystemExit(f"non-2xx answers during the runs: {non2xx}")
    socket_errors = {k: sum(r["socket_errors"] for r in v) for k, v in runs.items()}
    rps = {k: [r["rps"] for r in v] for k, v in runs.items()}
    p99 = {k: [r["p99_ms"] for r in v] for k, v in runs.items()}

    def thr(ours: str, peer: str) -> Paired:
        return Paired(rps[peer], rps[ours], factor=True)

    def lat(ours: str, peer: str) -> Paired:
        return Paired(p99[peer], p99[ours], factor=True)

    pairs = [
        ("ours, floor", "BentoML, floor", "ours_floor", "bento_floor"),
        ("ours, cached", "BentoML, window", "ours_cached", "bento_window"),
        ("ours, uncached (stored bars)", "BentoML, window", "ours_uncached", "bento_window"),
        ("ours, uncached (stored bars)", "BentoML, bars", "ours_uncached", "bento_bars"),
        ("ours, uncached (bars in the request)", "BentoML, bars", "ours_uncached_bars", "bento_bars"),
    ]
    figures = [(a, b, thr(x, y), lat(x, y)) for a, b, x, y in pairs]
    label = {
        "ours_floor": "our predictor's trivial `GET /health` (its middleware, no prediction code)",
        "bento_floor": "BentoML `POST /ping` {}: an API that does nothing, through BentoML's middleware",
        "ours_cached": "`POST /v1/predictions` (stored bars), answered from the cache, logged",
        "ours_uncached": "the same with `Cache-Control: no-cache` (features from the indicators "
        "service over HTTP, ONNX, cache write, log)",
        "ours_uncached_bars": f"the same with {BARS_SENT} bars in the request (checked, sent on to the indicators "
        "service, which computes the features; ONNX, cache write, log)",
        "bento_window": "`POST /window`: a ready 20 × 17 feature window (shape check, scale, ONNX, calibrate)",
        "bento_bars": f"`POST /bars`: the same {BARS_SENT} bars; `shared.features` in the BentoML worker, "
        "then as `/window`",
    }

    print("## Peer: the same ONNX model served by BentoML\n")
    made = f"made by this run in {venv_s:.1f} s" if venv_s is not None else "made by an earlier run, reused"
    pv = peer_versions
    print(
        f"The predictor's production model (`{symbol}` H1 v1: the benchmark's linear-softmax ONNX model over a "
        f"20 × 17 window, the very `model.onnx` and `metadata.json` the predictor loaded) served a second time by "
        f"BentoML {pv['bentoml']} (`benchmarks/peers/bentoml_service.py`), on the same {os.cpu_count()} cores, "
        f"in the same run. BentoML runs from its own venv, `var/bench/bentoml-venv` ({made}; starlette "
        f"{pv['starlette']}, uvicorn {pv['uvicorn']}, pydantic {pv['pydantic']}, OpenTelemetry SDK "
        f"{pv['opentelemetry-sdk']}), not the project's: it pins its own starlette and OpenTelemetry, which would "
        f"then pick the services' versions. Both sides run the same onnxruntime {pv['onnxruntime']} session "
        f"options (1 thread), numpy {pv['numpy']}, TA-Lib {pv['TA-Lib']}, uvloop {pv['uvloop']} and httptools "
        f"{pv['httptools']}; {args.workers} worker processes each; no access log; metrics on (ours Prometheus, "
        f"BentoML its own); ours checks an API key, BentoML has none to check. Our indicators service: 1 worker.\n"
    )
    print("What each side does per request:\n")
    for k, text in label.items():
        print(f"- **{k}**: {text}.")
    print(
        f"\nEquivalence, checked before the runs: the probabilities BentoML answers equal ours for the same input "
        f"(stored-bars window: max difference {diffs[0]:.0e}; the same {BARS_SENT} bars: {diffs[1]:.0e}; both "
        f"sides round to 6 decimals); a 19-row window gets {refused} from BentoML. Ours also answers the "
        "decision rules (consensus, indicator score, risk) and writes every prediction to the log; BentoML "
        "answers signal, confidence and probabilities only.\n"
    )
    each = "; ".join(f"{k} " + " / ".join(f"{x:,.0f}" for x in v) for k, v in rps.items())
    print(
        f"Load: wrk, 2 threads, {args.connections} connections (closed loop), 10 s timeout, for every side, "
        f"{seconds} s a run, "
        f"{rounds} rounds of the {len(sides)} sides, the order rotating from round to round; p99 is wrk's at that "
        f"load. Each ratio is the median of the per-round ratios of two sides, with their range; req/s and ms "
        f"are each side's median, context only ({each} req/s).\n"
    )
    print("| side | req/s | p50 | p99 | wrk socket errors (all rounds) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k, v in runs.items():
        print(
            f"| {k} | {np.median(rps[k]):,.0f} | {np.median([r['p50_ms'] for r in v]):.1f} ms | "
            f"{np.median(p99[k]):.1f} ms | {socket_errors[k]:.0f} |"
        )
    print("\n| ours vs BentoML | throughput, ours / BentoML | p99, ours / BentoML (below 1: ours faster) |")
    print("| --- | ---: | ---: |")
    for a, b, t, lt in figures:
        print(f"| {a} vs {b} | {t.times()} | {lt.times()} |")
    print(
        f"\nResident memory after the runs: our predictor {rss_ours:.0f} MB (supervisor and {args.workers} workers; "
        f"the indicators service not counted), BentoML {rss_peer:.0f} MB (`bentoml serve`, its supervisor and "
        f"{args.workers} workers)."
    )
    warn = warnings_of(*[f for _, _, t, lt in figures for f in (t, lt)])
    if warn:
        print("\n" + "\n".join(warn))
    print("\n### Where the time goes: BentoML `POST /window`\n")
    print(
        f"py-spy on BentoML's {args.workers} workers during one more `/window` wrk run ({args.connections} "
        f"connections, {seconds} s), after the measured rounds. Self = samples in the function itself; C code "
        "(uvloop, httptools, onnxruntime, a socket write) counts to the Python function calling it.\n"
    )
    print("\n".join(profile))


if __name__ == "__main__":
    main()
