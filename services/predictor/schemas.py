"""Request and response models of the predictor (the OpenAPI document; bodies are parsed with orjson)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.bars import Bar
from shared.model_metadata import QUALITY_DESCRIPTION, ModelQuality
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
    quality: ModelQuality = Field(description=QUALITY_DESCRIPTION)


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
    model_config = ConfigDict(protected_namespaces=())

    symbol: str | None
    timeframe: str | None
    weights_version: str
    source: str = Field(
        description="'default' (built-in equal weights: no indicator_weights row covers this scope) or the scope "
        "of the stored row used: 'SYMBOL/TF', 'SYMBOL/*' or '*/*'"
    )
    weights: dict[str, float] = Field(description="the weight of each voting indicator in `indicator_score`")
    id: int | None = Field(description="indicator_weights row id; null for the built-in default")
    method: str = Field(description="how the weights were computed ('default', 'manual', 'shap', ...)")
    model_version_id: int | None = Field(description="the model version the weights were derived from")
    data_start: datetime | None = Field(description="first bar of the data the weights were computed on")
    data_end: datetime | None = Field(description="last bar of the data the weights were computed on")
    created_at: datetime | None
    importances: dict[str, float] | None = Field(description="feature importances behind the weights")
    correlation: list[list[float]] | None = Field(
        description="correlation matrix of the features, rows and columns in `feature_names` order"
    )
    feature_names: list[str] | None = Field(description="order of the correlation matrix's rows and columns")
    inputs: dict[str, Any] = Field(
        description="the rest of what the weights were computed from (hit rates, sample sizes, ...)"
    )
    detail: str | None = Field(description="why the built-in default is used, when it is")


class ModelOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    symbol: str
    timeframe: str
    version: str
    sha256: str
    sequence_length: int
    feature_names: list[str]
    temperature: float
    quality: ModelQuality = Field(description="the promotion gate's current verdict on this version")


class Contribution(BaseModel):
    feature: str
    step: int = Field(description="bar of the input window; 0 is the newest")
    value: float = Field(description="the raw feature value")
    contribution: float = Field(description="its contribution to the explained class's output")


class ExplanationOut(BaseModel):
    """A finished explanation; `detail` keys of the trainer's row (base value, ...) are added as they are."""

    model_config = ConfigDict(protected_namespaces=(), extra="allow", populate_by_name=True)

    prediction_id: str
    status: Literal["succeeded"]
    model_version: str | None
    class_: str | None = Field(alias="class", description="the class explained (the prediction's signal)")
    method: str | None = Field(description="how contributions were computed (e.g. SHAP's explainer)")
    contributions: list[Contribution] = Field(description="largest |contribution| first")
    created_at: datetime
    finished_at: datetime | None


class ExplanationPending(BaseModel):
    """The explanation is being computed: ask again after `Retry-After` seconds."""

    prediction_id: str
    status: Literal["queued", "running"]
