"""Request and response models of the indicators service (also the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

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


class IndicatorRow(BaseModel):
    ts: datetime = Field(description="the bar's open time, ISO 8601 UTC")
    values: dict[str, float] = Field(description="the 17 features by name, in catalog order")


class IndicatorsOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "symbol": "SPX",
                "timeframes": {"D1": [{"ts": "2018-12-28T00:00:00Z", "values": {"rsi_14": 41.2}}]},
            }
        }
    )

    symbol: str
    timeframes: dict[str, list[IndicatorRow]] = Field(description="rows per timeframe, newest last")


class IndicatorsIn(BaseModel):
    """Bars sent by the client; features are computed from them alone (nothing is stored)."""

    symbol: str = Field(default="CUSTOM", pattern=r"^[A-Z0-9._-]{1,20}$")
    timeframe: Timeframe
    bars: list[Bar] = Field(description="at least warm-up + 1 bars; sorted by the service")
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
