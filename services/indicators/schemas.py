"""Request and response models of the indicators service (also the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from shared.bars import Bar
from shared.timeframes import Timeframe


class IngestResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"inserted": 5000, "updated": 0, "flagged": 2}})

    inserted: int = Field(description="bars that were not stored before")
    updated: int = Field(description="stored bars whose values changed")
    flagged: int = Field(description="bars stored with a data-quality flag (large move or gap)")


class BarOut(BaseModel):
    ts: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float


class BarsOut(BaseModel):
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


class CatalogEntry(BaseModel):
    name: str
    description: str
    formula: str
    parameters: dict[str, float | int]
    lookback_bars: int = Field(description="bars before TA-Lib defines a first value")
    warmup_bars: int = Field(description="bars before a row is returned: its value no longer depends on history")


class SeriesOut(BaseModel):
    symbol: str
    timeframe: Timeframe
    first_ts: datetime
    last_ts: datetime
