"""HTTP routes of the indicators service: bars in and out, indicators on stored or sent bars."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from services.indicators import service
from services.indicators.deps import PoolDep, ReadKey, SettingsDep, WriteKey
from services.indicators.metrics import BARS_REJECTED
from services.indicators.schemas import (
    BARS_IN_EXAMPLE,
    COLUMNS_EXAMPLE,
    INDICATORS_IN_EXAMPLE,
    ROWS_EXAMPLE,
    BarsOut,
    CatalogEntry,
    IndicatorsAnswer,
    IndicatorsIn,
    IngestResult,
    SeriesOut,
)
from shared.app import json_body, read_body
from shared.bars import BarsIn, BarValidationError, bars_from_body, bars_from_payload, bars_to_rows, parse_json
from shared.db import with_retry
from shared.errors import (
    TEXT_SCHEMA,
    TIMEFRAME_LIST_SCHEMA,
    AppError,
    ValidationFailed,
    error_responses,
    handler_checked,
)
from shared.features import catalog
from shared.market_repository import bars_range, list_series
from shared.query import QueryTime
from shared.responses import JSON
from shared.timeframes import SYMBOL_RE, Timeframe, check_symbol, parse_timeframe

router = APIRouter()

# Bars and indicator rows go out as `JSON` (orjson) rather than through their response_model, which
# measured 1.6-4.2x slower to render for indicator rows and 3.4-6.6x for bars (the table in shared/responses.py).


@router.post(
    "/v1/bars/{symbol}/{timeframe}",
    summary="Store bars of a series",
    tags=["bars"],
    response_model=IngestResult,
    responses=error_responses(401, 403, 413, 422, 503),
    openapi_extra=json_body(BarsIn, BARS_IN_EXAMPLE),
)
async def post_bars(
    symbol: str, timeframe: str, request: Request, pool: PoolDep, settings: SettingsDep, _: WriteKey
) -> IngestResult:
    """Store bars (idempotent upsert, up to 50,000 per request; role write).

    Bars may come in any order. A batch with any invalid bar is refused whole with 422 naming the bar
    index, the field and the rule; nothing of it is written. Valid but suspicious bars (a move beyond
    `QUALITY_MOVE_SIGMA` recent standard deviations, a gap in the series) are stored and flagged.
    """
    label = symbol if SYMBOL_RE.match(symbol) else "invalid"
    body: bytes | None = None
    try:
        check_symbol(symbol)
        tf = parse_timeframe(timeframe)
        body = await read_body(request)
    except AppError:
        BARS_REJECTED.labels(label).inc(_count_bars(body))
        raise
    # A large body of new bars in time order is written while it is read; any other, and one that breaks a
    # rule, is read whole here (outside the try above: a database outage is not a refused batch).
    streamed = await service.ingest_body(pool, settings, symbol, tf, body)
    if streamed is None:
        try:
            bars, _order = bars_from_body(body, tf, settings.max_bars_per_request)
        except AppError as exc:
            size = exc.batch_size if isinstance(exc, BarValidationError) else None
            BARS_REJECTED.labels(label).inc(size or _count_bars(body))
            raise
        result, last = await service.ingest(pool, settings, symbol, tf, bars), int(bars.ts[-1])
    else:
        result, last = streamed
    request.app.state.staleness.observe(symbol, tf, last)
    return result


def _count_bars(body: bytes | None) -> int:
    """Bars in a batch refused before its bars were checked (too many, not JSON, a bad symbol), for the
    rejected-bars metric: 1 when the body could not be read. Parsed again: only such a body pays for it."""
    try:
        raw = parse_json(body) if body is not None else None
    except AppError:
        return 1
    if isinstance(raw, dict) and isinstance(raw.get("bars"), list):
        return max(len(raw["bars"]), 1)
    return 1


@router.get(
    "/v1/bars/{symbol}/{timeframe}",
    summary="Read stored bars of a series",
    tags=["bars"],
    response_model=BarsOut,
    responses=error_responses(401, 403, 422),
)
async def get_bars(
    symbol: str,
    timeframe: str,
    pool: PoolDep,
    _: ReadKey,
    start: Annotated[QueryTime | None, Query(description="inclusive, ISO 8601")] = None,
    end: Annotated[QueryTime | None, Query(description="exclusive, ISO 8601")] = None,
    limit: Annotated[int, Query(ge=1, le=50_000, description="newest bars in the range")] = 1000,
) -> JSON:
    """Stored bars of a series, oldest first and newest last (role read)."""
    check_symbol(symbol)
    tf = parse_timeframe(timeframe)
    for name, value in (("start", start), ("end", end)):
        if value is not None and value.tzinfo is None:
            raise ValidationFailed(f"{name} must carry a UTC offset (e.g. 2024-01-01T00:00:00Z)")
    bars = await with_retry(lambda: bars_range(pool, symbol, tf, start, end, limit))
    return JSON({"bars": bars_to_rows(bars)})


@router.get(
    "/v1/series",
    summary="List stored series",
    tags=["bars"],
    response_model=list[SeriesOut],
    responses=error_responses(401, 403),
    openapi_extra=handler_checked(symbol=TEXT_SCHEMA),
)
async def get_series(pool: PoolDep, _: ReadKey, symbol: str | None = None) -> list[SeriesOut]:
    """Stored series (symbol, timeframe) with their first and last bar times (role read)."""
    rows = await with_retry(lambda: list_series(pool, symbol))
    return [SeriesOut(symbol=s.symbol, timeframe=s.timeframe, first_ts=s.first_ts, last_ts=s.last_ts) for s in rows]


@router.get(
    "/v1/indicators/catalog", summary="The feature catalog", tags=["indicators"], response_model=list[CatalogEntry]
)
async def get_catalog() -> list[CatalogEntry]:
    """The 17 features: name, description, formula, parameters and warm-up bars. Public."""
    return [CatalogEntry.model_validate(entry) for entry in catalog()]


FormatQuery = Annotated[
    Literal["rows", "columns"],
    Query(
        description='`rows` (default): `[{"ts", "values": {feature: number}}]`; `columns`: `{"ts": [...], '
        '"names": [...], "values": [[...]]}`, the same numbers in a form cheaper to render and parse'
    ),
]


# GET and POST /v1/indicators answer one of two shapes, chosen by `format`; the OpenAPI document shows both
# (the schema is a oneOf of IndicatorsOut and IndicatorColumnsOut, with an example of each).
INDICATORS_200: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`format=rows` (default): IndicatorsOut; `format=columns`: IndicatorColumnsOut, the same "
        "numbers as one matrix per timeframe",
        "content": {
            "application/json": {
                "examples": {
                    "rows": {"summary": "format=rows (default)", "value": ROWS_EXAMPLE},
                    "columns": {"summary": "format=columns (what the predictor asks for)", "value": COLUMNS_EXAMPLE},
                }
            }
        },
    }
}


def _parse_timeframes(value: str | None, base: Timeframe) -> list[Timeframe]:
    if value is None:
        return [base]
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValidationFailed("timeframes is empty; name at least one, e.g. timeframes=H1,H4")
    return [parse_timeframe(v) for v in names]


@router.get(
    "/v1/indicators/{symbol}/{timeframe}",
    summary="Indicators of a stored series",
    tags=["indicators"],
    response_model=IndicatorsAnswer,
    responses={**INDICATORS_200, **error_responses(401, 403, 404, 422)},
    openapi_extra=handler_checked(timeframes=TIMEFRAME_LIST_SCHEMA),
)
async def get_indicators(
    symbol: str,
    timeframe: str,
    pool: PoolDep,
    _: ReadKey,
    limit: Annotated[int, Query(ge=1, le=10_000, description="rows per timeframe, newest last")] = 100,
    timeframes: Annotated[
        str | None,
        Query(
            description="comma-separated timeframes, resampled from the path's stored bars (completed bars "
            "only); default: the path's timeframe"
        ),
    ] = None,
    format: FormatQuery = "rows",  # the query parameter's public name
) -> JSON:
    """Indicator rows of a stored series (role read).

    Reads only the bars the rows need (warm-up plus `limit`). Higher timeframes are built from the path's
    stored bars, completed bars only. Warm-up rows are never returned.
    """
    check_symbol(symbol)
    base = parse_timeframe(timeframe)
    rows = await service.stored_rows(pool, symbol, base, _parse_timeframes(timeframes, base), limit)
    return JSON({"symbol": symbol, "timeframes": {t.value: service.render_rows(r, format) for t, r in rows.items()}})


@router.post(
    "/v1/indicators",
    summary="Indicators of bars sent in the body",
    tags=["indicators"],
    response_model=IndicatorsAnswer,
    responses={**INDICATORS_200, **error_responses(401, 403, 413, 422)},
    openapi_extra=json_body(IndicatorsIn, INDICATORS_IN_EXAMPLE),
)
async def post_indicators(
    request: Request,
    settings: SettingsDep,
    _: ReadKey,
    format: FormatQuery = "rows",
) -> JSON:
    """Indicator rows computed from the bars in the body (nothing is stored; role read).

    The bars are checked by the same rules as ingest. Needs at least warm-up + 1 bars of each requested
    timeframe.
    """
    raw = parse_json(await read_body(request))
    if not isinstance(raw, dict):
        raise ValidationFailed("body must be a JSON object")
    for name in ("symbol", "timeframe"):
        if name in raw and not isinstance(raw[name], str):
            raise ValidationFailed(f"{name} must be a string, got {type(raw[name]).__name__}")
    symbol = check_symbol(str(raw.get("symbol", "CUSTOM")))
    tf = parse_timeframe(str(raw.get("timeframe", "")))
    limit = raw.get("limit")
    if limit is not None and (type(limit) is not int or not 1 <= limit <= 50_000):
        raise ValidationFailed("limit must be an integer from 1 to 50000")
    tfs_raw = raw.get("timeframes")
    if tfs_raw is not None and not (isinstance(tfs_raw, list) and all(isinstance(t, str) for t in tfs_raw)):
        raise ValidationFailed("timeframes must be a list of timeframe names")
    targets = [parse_timeframe(t) for t in tfs_raw] if tfs_raw else [tf]
    bars, _order = bars_from_payload(raw, tf, settings.max_bars_per_request)
    rows = service.client_rows(bars, symbol, tf, targets, limit)
    return JSON({"symbol": symbol, "timeframes": {t.value: service.render_rows(r, format) for t, r in rows.items()}})
