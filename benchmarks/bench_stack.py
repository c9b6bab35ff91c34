"""Per-request cost of the shared service stack, in-process (the ASGI app called directly, no server).

Backs the choices in shared/app.py, shared/metrics.py, shared/bars.py and the indicators' `format=columns`: the
instrumentator's default metric set against the two metrics kept, routers included against routes added flat,
the access log on and off, bulk bars checked with numpy against pydantic, the two response formats, orjson
against stdlib json and a `response_model` for the hot answers (`shared/responses.py`), and the prediction log's
own COPY encoding against asyncpg's record copy.
`python -m benchmarks.bench_stack [--quick]` prints a Markdown section.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as instrumentator_metrics

from benchmarks.common import Paired, alternating, warnings_of
from shared.metrics import LATENCY_BUCKETS
from shared.responses import JSON


def _app(routes: int, include: bool) -> tuple[FastAPI, str]:
    app = FastAPI()
    router = APIRouter()
    for i in range(routes - 1):

        async def other(x: str) -> JSON:
            return JSON({"x": x})

        router.add_api_route(f"/r{i}/{{x}}", other, methods=["GET"])

    async def target() -> JSON:
        return JSON({"ok": True})

    router.add_api_route("/x", target, methods=["GET"])  # the last route: matched after all the others
    if include:
        app.include_router(router)
    else:
        app.router.routes.extend(router.routes)
    return app, "/x"


def _instrument(app: FastAPI, lean: bool) -> None:
    registry = CollectorRegistry()  # each variant its own, so names never collide
    inst = Instrumentator(should_group_status_codes=False, registry=registry)
    if lean:  # what shared.metrics.install_metrics does
        inst.add(instrumentator_metrics.requests(registry=registry))
        inst.add(
            instrumentator_metrics.latency(should_include_status=False, buckets=LATENCY_BUCKETS, registry=registry)
        )
    else:
        inst.add(instrumentator_metrics.default(registry=registry))
    inst.instrument(app)


async def per_request_us(app: Any, path: str, n: int) -> float:
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"t")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("t", 80),
        "client": ("c", 1),
        "root_path": "",
        "app": app,
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    for _ in range(500):
        await app(dict(scope), receive, send)
    t = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return (time.perf_counter() - t) / n * 1e6


def main_rows(n: int, rounds: int) -> tuple[list[str], list[Paired]]:
    """Every app variant once per round, the order rotating; µs are each variant's median over the rounds and
    "vs bare" the median of the per-round ratios to the bare app (their range in brackets)."""
    import io
    import logging

    from shared.app import RequestIdMiddleware
    from shared.logging import JsonFormatter
    from shared.metrics import HttpMetrics

    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter("bench"))
    access = logging.getLogger("aicash.access")
    access.addHandler(handler)
    access.propagate = False

    variants: dict[str, tuple[Any, str, int]] = {}
    bare, path = _app(13, include=False)
    variants["bare FastAPI, 13 routes added flat"] = (bare, path, logging.WARNING)
    for label, include, lean in (
        ("13 routes through `include_router`", True, None),
        ("flat + instrumentator, its default metric set", False, False),
        ("flat + instrumentator, two metrics (what `shared.metrics` used before)", False, True),
        ("`include_router` + instrumentator default set", True, False),
    ):
        app, path = _app(13, include)
        if lean is not None:
            _instrument(app, lean)
        variants[label] = (app, path, logging.WARNING)
    for level, label in ((logging.WARNING, "off"), (logging.INFO, "on")):
        app, path = _app(13, include=False)
        app.add_middleware(RequestIdMiddleware)
        variants[f"flat + request-id middleware, access log {label}"] = (app, path, level)
    app, path = _app(13, include=False)
    app.add_middleware(RequestIdMiddleware, metrics=HttpMetrics())
    variants["flat + request-id middleware recording the two metrics (`HttpMetrics`, one layer: now)"] = (
        app,
        path,
        logging.WARNING,
    )

    def run(app: Any, path: str, level: int) -> float:
        access.setLevel(level)
        return asyncio.run(per_request_us(app, path, n))

    got = alternating({k: functools.partial(run, *v) for k, v in variants.items()}, rounds)
    access.removeHandler(handler)
    base_label = next(iter(variants))
    base = got[base_label]
    rows = [
        "| app | µs per request | vs bare (per-round ratio) | + µs |",
        "| --- | ---: | ---: | ---: |",
    ]
    figures = []
    for label, us in got.items():
        if label == base_label:
            rows.append(f"| {label} | {np.median(us):.1f} | | |")
            continue
        f = Paired(base, us, factor=True)
        figures.append(f)
        diff = np.median([b - a for a, b in zip(base, us, strict=True)])
        rows.append(f"| {label} | {np.median(us):.1f} | {f.times()} | {diff:+.1f} |")
    return rows, figures


def payload_rows(quick: bool, figures: list[Paired]) -> list[str]:
    """Bulk bars validation and the indicators response formats."""
    import orjson

    from benchmarks.common import best_of
    from services.indicators.service import render_rows
    from shared.bars import BarsIn, bars_from_body, bars_from_payload, bars_to_rows, parse_json
    from shared.features import FeatureRows, feature_rows
    from shared.timeframes import Timeframe
    from tests.data import generate_bars

    body = orjson.dumps({"bars": bars_to_rows(generate_bars("H1", 50_000, seed=5))})

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        return lambda: best_of(fn, 1 if quick else 2, 1)

    # The three in alternating rounds; each round's time the best of its calls; ratios per round.
    got = alternating(
        {
            "general": timed(lambda: bars_from_payload(parse_json(body), Timeframe.H1, 50_000)),
            "typed": timed(lambda: bars_from_body(body, Timeframe.H1, 50_000)),
            "pydantic": timed(lambda: BarsIn.model_validate_json(body)),
        },
        3 if quick else 5,
    )
    ms = {k: float(np.median(v)) * 1e3 for k, v in got.items()}
    general, typed = Paired(got["pydantic"], got["general"], True), Paired(got["pydantic"], got["typed"], True)
    figures.extend([general, typed])
    full = feature_rows(generate_bars("H1", 600, seed=6))
    last = FeatureRows(full.ts[-20:], full.values[-20:])  # the window a prediction asks for
    n = 2000 if quick else 10000
    lines = [
        "",
        "| payload work (50,000 bars, alternating rounds) | time | vs pydantic (per-round ratio of times) |",
        "| --- | ---: | ---: |",
        f"| pydantic `BarsIn.model_validate_json` (types and signs only) | {ms['pydantic']:.1f} ms | |",
        f"| `shared.bars` general path (orjson + numpy, every ingest rule) | {ms['general']:.1f} ms | "
        f"{general.times()} |",
        f"| ingest's path (`bars_from_body`: msgspec typed decode + numpy, every rule) | {ms['typed']:.1f} ms | "
        f"{typed.times()} |",
    ]
    for fmt in ("rows", "columns"):
        blob = orjson.dumps(render_rows(last, fmt), option=orjson.OPT_SERIALIZE_NUMPY)
        render = best_of(lambda fmt=fmt: orjson.dumps(render_rows(last, fmt), option=orjson.OPT_SERIALIZE_NUMPY), 3, n)
        parse = best_of(lambda blob=blob: orjson.loads(blob), 3, n)
        lines.append(
            f"| 20 indicator rows as `{fmt}`: render {render * 1e6:.0f} µs, parse {parse * 1e6:.0f} µs, "
            f"{len(blob):,} bytes | |"
        )
    return lines


def response_rows(quick: bool) -> list[str]:
    """What an answer costs to render three ways: orjson (`shared.responses.JSON`, numpy arrays written as they
    are), starlette's JSONResponse (stdlib json, arrays as lists) and a `response_model` (what FastAPI does with
    a returned value: pydantic validates it, then pydantic-core writes the JSON)."""
    import orjson
    from pydantic import TypeAdapter
    from starlette.responses import JSONResponse

    from benchmarks.common import best_of
    from services.indicators.schemas import BarsOut, IndicatorColumnsOut, IndicatorsOut
    from services.indicators.service import render_rows
    from shared.bars import bars_to_rows
    from shared.features import FeatureRows, feature_rows
    from tests.data import generate_bars

    full = feature_rows(generate_bars("H1", 600, seed=6))

    def window(n: int) -> FeatureRows:
        return FeatureRows(full.ts[-n:], full.values[-n:])

    def as_lists(body: dict[str, Any]) -> dict[str, Any]:
        # stdlib json and pydantic take no numpy arrays: the `columns` matrix goes through `tolist()` first.
        if "timeframes" not in body:
            return body
        tfs = {
            tf: {**v, "values": v["values"].tolist()} if isinstance(v, dict) else v
            for tf, v in body["timeframes"].items()
        }
        return {**body, "timeframes": tfs}

    cases: list[tuple[str, Any, Any]] = []
    for label, n, fmt, model in (
        ("`GET /v1/indicators`, 20 rows as `columns` (the predictor's call)", 20, "columns", IndicatorColumnsOut),
        ("`GET /v1/indicators`, 100 rows as `rows` (the default)", 100, "rows", IndicatorsOut),
    ):
        rows = window(n)

        def body(rows: FeatureRows = rows, fmt: str = fmt) -> dict[str, Any]:
            return {"symbol": "BENCH", "timeframes": {"H1": render_rows(rows, fmt)}}

        cases.append((label, body, TypeAdapter(model)))
    for count in (1000, 50_000):
        bars = generate_bars("H1", count, seed=7)

        def bars_body(bars: Any = bars) -> dict[str, Any]:
            return {"bars": bars_to_rows(bars)}

        cases.append((f"`GET /v1/bars`, {count:,} bars", bars_body, TypeAdapter(BarsOut)))

    lines = [
        "",
        "| render an answer | orjson (`shared.responses.JSON`) | stdlib json (`JSONResponse`) | `response_model` |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, make, adapter in cases:
        n = 1 if "50,000" in label else (200 if quick else 1000)
        ours = best_of(lambda make=make: orjson.dumps(make(), option=orjson.OPT_SERIALIZE_NUMPY), 3, n)
        std = best_of(lambda make=make: JSONResponse(as_lists(make())).body, 3, n)
        pyd = best_of(
            lambda make=make, adapter=adapter: adapter.dump_json(adapter.validate_python(as_lists(make()))), 3, n
        )
        lines.append(
            f"| {label} | {ours * 1e6:,.0f} µs | {std * 1e6:,.0f} µs ({std / ours:.1f}×) | "
            f"{pyd * 1e6:,.0f} µs ({pyd / ours:.1f}×) |"
        )
    return lines


def log_rows(quick: bool, figures: list[Paired]) -> list[str]:
    """The prediction log's write, this process's CPU per row (`time.process_time` around each batch's
    `copy_predictions` into a scratch database): `prediction_log.RowEncoder` against `to_row` and asyncpg's
    `copy_records_to_table`, in alternating rounds; and FastAPI's per-request OpenTelemetry check, on and off."""
    import uuid

    import asyncpg
    from fastapi import FastAPI as PlainFastAPI

    from benchmarks.common import best_of, temporary_database
    from services.predictor import repository
    from services.predictor.prediction_log import LogRecord, RowEncoder, to_row

    batch, batches = 500, 4 if quick else 20
    base = LogRecord(
        uuid.uuid4(), time.time(), "BENCH1", "H1", "2024-01-02T00:00:00Z", "v1", "production", None, "a" * 64,
        "", [20, 17], [0.2, 0.3, 0.5], "BUY", 0.5, "BUY", True, "3edf5c17915ce5f0df5f000000000001",
    )  # fmt: skip
    encoder = RowEncoder()

    def records() -> list[LogRecord]:
        return [base._replace(prediction_id=uuid.uuid4(), created=time.time()) for _ in range(batch)]

    async def run(db: str) -> dict[str, list[float]]:
        pool = await asyncpg.create_pool(db, min_size=1, max_size=1)
        sides: dict[str, Callable[[list[LogRecord]], Any]] = {
            "records": lambda rs: [to_row(r) for r in rs],
            "encoder": encoder.encode,
        }
        got: dict[str, list[float]] = {k: [] for k in sides}
        try:
            for r in range(5 if quick else 9):
                for name in list(sides)[r % 2 :] + list(sides)[: r % 2]:
                    spent = 0.0
                    for _ in range(batches):
                        rs = records()
                        t = time.process_time()
                        await repository.copy_predictions(pool, sides[name](rs))
                        spent += time.process_time() - t
                    got[name].append(spent / (batch * batches) * 1e6)
        finally:
            await pool.close()
        return got

    with temporary_database() as db:
        got = asyncio.run(run(db))
    vs = Paired(got["encoder"], got["records"], factor=True)
    figures.append(vs)
    default, off = PlainFastAPI(), PlainFastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})
    on_us = best_of(default._native_telemetry.enabled, 3, 100_000) * 1e6
    off_us = best_of(off._native_telemetry.enabled, 3, 100_000) * 1e6
    return [
        "",
        f"| prediction log write, {batch}-row batches (this process's CPU per row) | µs | per round |",
        "| --- | ---: | ---: |",
        f"| `to_row` + asyncpg `copy_records_to_table` | {np.median(got['records']):.2f} | |",
        f"| `prediction_log.RowEncoder` + binary `copy_to_table` (what the log does) | "
        f"{np.median(got['encoder']):.2f} | records / encoder {vs.times()} |",
        f"| FastAPI's per-request OpenTelemetry check (`_native_telemetry.enabled`), default / off (`build_app`) | "
        f"{on_us:.2f} / {off_us:.2f} | |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    lines = [
        "## Shared service stack, per request (in-process)",
        "",
        f"The ASGI app called directly (no server, no network), {rounds} alternating rounds of every variant "
        "(500 warm-up calls, then the mean of a round's calls):",
        "",
    ]
    rows, figures = main_rows(3000 if args.quick else 10000, rounds)
    lines += rows
    lines += payload_rows(args.quick, figures)
    lines += response_rows(args.quick)
    lines += log_rows(args.quick, figures)
    warn = warnings_of(*figures)
    if warn:
        lines += ["", *warn]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
