"""Request and response models of the predictor (the OpenAPI document; bodies are parsed with orjson)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.bars import Bar
from shared.timeframes import Timeframe

Signal = Literal["BUY", "SELL", "HOLD"]


class PredictionIn(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"example": {"symbol": "EURUSD", "timeframe": "H1", "timeframes": ["H1", "H4", "D1"]}}
    )

    symbol: str = Field(pattern=r"^[A-Z0-9._-]{1,20}$")
    timeframe: Timeframe = Field(description="the model's timeframe and the timeframe of stored or sent bars")
    bars: list[Bar] | None = Field(
        default=None,
        description="bars to predict from (checked by the ingest rules; at least 500 warm-up + the model's "
        "sequence length); leave out to use the stored bars",
    )
    timeframes: list[Timeframe] | None = Field(
        default=None, description="higher timeframes for the consensus, resampled from the same bars"
    )
    user_id: str | None = Field(default=None, max_length=256, description="stored only as a salted sha256")


class Probabilities(BaseModel):
    BUY: float
    SELL: float
    HOLD: float


class TimeframeSignal(BaseModel):
    status: Literal["ok", "no_model", "insufficient_data"]
    signal: Signal | None
    confidence: float | None
    model_version: str | None
    probabilities: Probabilities | None = None
    bar_ts: datetime | None = None
    detail: str | None = Field(default=None, description="why there is no signal")


class Consensus(BaseModel):
    signal: Signal
    rule: Literal["confidence_weighted_vote"]
    votes: Probabilities = Field(description="sum of the confidences of the timeframes voting for each signal")
    strength: float = Field(description="the winner's share of all votes")
    agreement: float = Field(description="share of the voting timeframes whose signal is the consensus")
    timeframes_used: list[Timeframe]


class Risk(BaseModel):
    side: Literal["long", "short", "flat"]
    position_fraction: float = Field(description="suggested position as a fraction of equity; 0 for HOLD")
    max_position_fraction: float
    risk_per_trade_fraction: float = Field(description="equity lost if the stop is hit at the full position")
    entry_price: float = Field(description="close of the newest bar")
    atr: float = Field(description="ATR(14) in price units")
    atr_pct: float | None
    stop_loss: float | None
    take_profit: float | None


class PredictionOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    prediction_id: str
    symbol: str
    timeframe: Timeframe
    signal: Signal
    confidence: float = Field(description="calibrated probability of the signal")
    probabilities: Probabilities
    model_version: str
    variant: str = Field(description="which model variant served: 'production' until A/B routing exists")
    cached: bool
    timeframes: dict[str, TimeframeSignal]
    consensus: Consensus
    indicator_score: float = Field(description="-1 (every indicator says SELL) .. +1 (every indicator says BUY)")
    weights_version: str
    risk: Risk
    bar_ts: datetime = Field(description="open time of the newest bar of the input window")
    generated_at: datetime = Field(description="when the prediction was computed (earlier when cached)")


class PredictionRecord(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    prediction_id: str
    created_at: datetime
    symbol: str
    timeframe: str
    bar_ts: datetime
    model_version: str
    variant: str
    user_hash: str | None
    window_hash: str
    feature_names: list[str] | None = Field(description="column names, when the model version is loaded")
    features: list[list[float]] = Field(description="the raw feature window, oldest row first")
    probabilities: Probabilities
    signal: Signal
    confidence: float
    consensus_signal: Signal | None
    cached: bool
    request_id: str | None


class WeightsOut(BaseModel):
    symbol: str | None
    timeframe: str | None
    weights_version: str
    source: str = Field(description="'default' (equal weights) or the scope of the stored row")
    weights: dict[str, float]


class ModelOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    symbol: str
    timeframe: str
    version: str
    sha256: str
    sequence_length: int
    feature_names: list[str]
    temperature: float
