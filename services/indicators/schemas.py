"""Request and response models of the indicators service (also the OpenAPI document)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from shared.bars import Bar
from shared.timeframes import Timeframe


class IngestResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"inserted": 5000, "updated": 0, "flagged": 2}})

    inserted: int = Field(description="bars that were not stored before")
    updated: int = Field(description="stored bars whose values changed")
    flagged: int = Field(description="bars stored with a data-quality flag (large move or gap)")


BAR_EXAMPLE: dict[str, Any] = {
    "ts": "2024-03-01T09:00:00Z",
    "open": 1.08412,
    "high": 1.08497,
    "low": 1.08371,
    "close": 1.08466,
    "volume": 1834.0,
}


class BarOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [BAR_EXAMPLE]})

    ts: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float


class BarsOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "bars": [
                        BAR_EXAMPLE,
                        {**BAR_EXAMPLE, "ts": "2024-03-01T10:00:00Z", "open": 1.08466, "close": 1.08431},
                    ]
                }
            ]
        }
    )

    bars: list[BarOut] = Field(description="oldest first, newest last")


# GET /v1/indicators/SPX/D1?limit=2 on the S&P 500 bars of the tests, in each format (the first two of the 17
# features, for brevity).
ROWS_EXAMPLE: dict[str, Any] = {
    "symbol": "SPX",
    "timeframes": {
        "D1": [
            {"ts": "2018-12-28T00:00:00Z", "values": {"rsi_14": 38.99, "macd_line": -0.0284}},
            {"ts": "2018-12-31T00:00:00Z", "values": {"rsi_14": 41.71, "macd_line": -0.0262}},
        ]
    },
}
COLUMNS_EXAMPLE: dict[str, Any] = {
    "symbol": "SPX",
    "timeframes": {
        "D1": {
            "ts": ["2018-12-28T00:00:00Z", "2018-12-31T00:00:00Z"],
            "names": ["rsi_14", "macd_line"],
            "values": [[38.99, -0.0284], [41.71, -0.0262]],
        }
    },
}


class IndicatorRow(BaseModel):
    ts: datetime = Field(description="the bar's open time, ISO 8601 UTC")
    values: dict[str, float] = Field(description="the 17 features by name, in catalog order")


class IndicatorsOut(BaseModel):
    """`format=rows` (the default): one object per row, the features by name."""

    model_config = ConfigDict(json_schema_extra={"example": ROWS_EXAMPLE})

    symbol: str
    timeframes: dict[str, list[IndicatorRow]] = Field(description="rows per timeframe, newest last")


class IndicatorColumns(BaseModel):
    ts: list[datetime] = Field(description="the bars' open times, ISO 8601 UTC, newest last")
    names: list[str] = Field(description="the 17 features in catalog order: the columns of `values`")
    values: list[list[float]] = Field(description="one row per `ts`, one number per name")


class IndicatorColumnsOut(BaseModel):
    """`format=columns`: the numbers of IndicatorsOut, one matrix per timeframe (what the predictor reads)."""

    model_config = ConfigDict(json_schema_extra={"example": COLUMNS_EXAMPLE})

    symbol: str
    timeframes: dict[str, IndicatorColumns] = Field(description="one matrix per timeframe, rows newest last")


def _indicators_shape(value: Any) -> str:
    """Which shape an indicators answer has: a timeframe holding a list is `rows`, an object `columns`."""
    tfs = value.get("timeframes") if isinstance(value, dict) else getattr(value, "timeframes", None)
    first = next(iter(tfs.values()), None) if isinstance(tfs, dict) else None
    return "columns" if isinstance(first, dict | IndicatorColumns) else "rows"


# The answer of GET and POST /v1/indicators: `format=rows` (default) or `format=columns`. A callable
# discriminator makes the OpenAPI schema a `oneOf` of the two models (a plain union would be an `anyOf`).
IndicatorsAnswer = Annotated[
    Annotated[IndicatorsOut, Tag("rows")] | Annotated[IndicatorColumnsOut, Tag("columns")],
    Discriminator(_indicators_shape),
]


def synthetic_bars(count: int, start: datetime, step: timedelta) -> list[dict[str, Any]]:
    """`count` consecutive bars of a smooth made-up series that every ingest rule accepts (for examples)."""
    bars = []
    close = 1.08
    for i in range(count):
        open_ = close
        close = round(1.08 + 0.004 * math.sin(i / 9) + 0.0015 * math.sin(i / 2.3), 5)
        spread = 0.0004 + 0.0002 * (i % 3)
        bars.append(
            {
                "ts": (start + i * step).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "open": open_,
                "high": round(max(open_, close) + spread, 5),
                "low": round(min(open_, close) - spread, 5),
                "close": close,
                "volume": float(1000 + (i * 37) % 900),
            }
        )
    return bars


# POST /v1/bars: two hours of EURUSD H1.
BARS_IN_EXAMPLE: dict[str, Any] = {"bars": synthetic_bars(2, datetime(2024, 3, 1, 9, tzinfo=UTC), timedelta(hours=1))}
# POST /v1/indicators needs warm-up (500) + 1 bars: 510 H1 bars, the newest 2 rows asked for.
INDICATORS_IN_EXAMPLE: dict[str, Any] = {
    "symbol": "EURUSD",
    "timeframe": "H1",
    "bars": synthetic_bars(510, datetime(2024, 1, 1, tzinfo=UTC), timedelta(hours=1)),
    "limit": 2,
}


class IndicatorsIn(BaseModel):
    """Bars sent by the client; features are computed from them alone (nothing is stored)."""

    symbol: str = Field(default="CUSTOM", pattern=r"^[A-Z0-9._-]{1,20}$")
    timeframe: Timeframe
    bars: list[Bar] = Field(
        min_length=1, max_length=50_000, description="at least warm-up + 1 bars; sorted by the service"
    )
    limit: int | None = Field(default=None, ge=1, le=50_000, description="newest rows to return (default all)")
    timeframes: list[Timeframe] | None = Field(
        default=None, description="higher timeframes to resample the bars to (default: the bars' timeframe)"
    )


def _catalog_example(schema: dict[str, Any]) -> None:
    from shared.features import catalog

    schema["examples"] = [catalog()[0]]


class CatalogEntry(BaseModel):
    model_config = ConfigDict(json_schema_extra=_catalog_example)

    name: str
    description: str
    formula: str
    parameters: dict[str, float | int]
    lookback_bars: int = Field(description="bars before TA-Lib defines a first value")
    warmup_bars: int = Field(description="bars before a row is returned: its value no longer depends on history")


class SeriesOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "first_ts": "2019-01-02T00:00:00Z",
                    "last_ts": "2024-03-01T10:00:00Z",
                }
            ]
        }
    )

    symbol: str
    timeframe: Timeframe
    first_ts: datetime
    last_ts: datetime
