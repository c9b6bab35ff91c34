"""Request and response models of the predictor (the OpenAPI document; bodies are parsed with orjson)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

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
        default=None,
        max_length=8,
        description="higher timeframes for the consensus, resampled from the same bars (whole multiples of "
        "`timeframe`)",
    )
    user_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="the A/B split's sticky key (a user in the rollout's test group gets the candidate) and "
        "stored only as a salted sha256",
    )


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


_PROBS: dict[str, Any] = {"BUY": 0.58, "SELL": 0.17, "HOLD": 0.25}
_QUALITY: dict[str, Any] = {
    "gate": "failed",
    "reasons": [
        # the verdict of the S&P 500 sample's first model (make up, 2026-12-02)
        "log_loss: the LSTM does not beat the best baseline, the training class prior: pooled 1.0988 against 1.0973; "
        "LSTM minus it over 5 folds +0.0015, 95% CI [-0.0055, +0.0084] (the upper bound must be below 0)"
    ],
    "validation_id": 7,
}
_PID = "0192f3a4-5b6c-7d8e-9f00-112233445566"
PREDICTION_EXAMPLE: dict[str, Any] = {
    "prediction_id": _PID,
    "symbol": "EURUSD",
    "timeframe": "H1",
    "signal": "BUY",
    "confidence": 0.58,
    "probabilities": _PROBS,
    "model_version": "20240301T100512Z",
    "variant": "production",
    "cached": False,
    "timeframes": {
        "H1": {
            "status": "ok",
            "signal": "BUY",
            "confidence": 0.58,
            "model_version": "20240301T100512Z",
            "probabilities": _PROBS,
            "bar_ts": "2024-03-01T09:00:00Z",
        },
        "H4": {
            "status": "no_model",
            "signal": None,
            "confidence": None,
            "model_version": None,
            "detail": "no production model for EURUSD H4",
        },
    },
    "consensus": {
        "signal": "BUY",
        "rule": "confidence_weighted_vote",
        "votes": {"BUY": 0.58, "SELL": 0.0, "HOLD": 0.0},
        "strength": 1.0,
        "agreement": 1.0,
        "timeframes_used": ["H1"],
    },
    "indicator_score": 0.29,
    "weights_version": "default",
    "risk": {
        "side": "long",
        "position_fraction": 0.058,
        "max_position_fraction": 0.1,
        "risk_per_trade_fraction": 0.0012,
        "entry_price": 1.08466,
        "atr": 0.00112,
        "atr_pct": 0.1033,
        "stop_loss": 1.08242,
        "take_profit": 1.0880,
    },
    "bar_ts": "2024-03-01T09:00:00Z",
    "generated_at": "2024-03-01T10:00:00.412Z",
    "quality": _QUALITY,
}


class PredictionOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), json_schema_extra={"examples": [PREDICTION_EXAMPLE]})

    prediction_id: str
    symbol: str
    timeframe: Timeframe
    signal: Signal
    confidence: float = Field(description="calibrated probability of the signal")
    probabilities: Probabilities
    model_version: str
    variant: str = Field(
        description="which model variant served: 'production', or 'candidate' when the series' rollout routes "
        "this request to its candidate (test group, symbol in the rollout, or the sticky traffic split); "
        "`model_version` names it"
    )
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
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "prediction_id": _PID,
                    "created_at": "2024-03-01T10:00:00.412Z",
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "bar_ts": "2024-03-01T09:00:00Z",
                    "model_version": "20240301T100512Z",
                    "variant": "production",
                    "user_hash": None,
                    "window_hash": "5d41402abc4b2a76b9719d911017c592",
                    "feature_names": ["rsi_14", "macd_line"],
                    "features": [[52.1, 0.0114], [55.8, 0.0131]],
                    "probabilities": _PROBS,
                    "signal": "BUY",
                    "confidence": 0.58,
                    "consensus_signal": "BUY",
                    "cached": False,
                    "request_id": "9f1c2a7b3e4d5f60a1b2000000000001",
                }
            ]
        },
    )

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
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "symbol": None,
                    "timeframe": None,
                    "weights_version": "default",
                    "source": "default",
                    "weights": {"rsi_14": 1.0, "macd_line": 1.0},
                    "id": None,
                    "method": "default",
                    "model_version_id": None,
                    "data_start": None,
                    "data_end": None,
                    "created_at": None,
                    "importances": None,
                    "correlation": None,
                    "feature_names": None,
                    "inputs": {},
                    "detail": "no indicator_weights row covers this scope: built-in equal weights (every voting "
                    "indicator 1.0)",
                }
            ]
        },
    )

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
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "version": "20240301T100512Z",
                    "role": "production",
                    "sha256": "9c1185a5c5e9fc54612808977ee8f548b2258d31f2f6b1fcb1b5d1e1c8f0a4d2",
                    "sequence_length": 20,
                    "feature_names": ["rsi_14", "macd_line"],
                    "temperature": 1.31,
                    "quality": _QUALITY,
                }
            ]
        },
    )

    symbol: str
    timeframe: str
    version: str
    role: Literal["production", "candidate"] = Field(
        description="production serves the series; candidate is its rollout's candidate (A/B split, test group, "
        "symbol rollout or shadow)"
    )
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

    model_config = ConfigDict(
        protected_namespaces=(),
        extra="allow",
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {
                    "prediction_id": _PID,
                    "status": "succeeded",
                    "model_version": "20240301T100512Z",
                    "class": "BUY",
                    "method": "shap.GradientExplainer",
                    "contributions": [{"feature": "rsi_14", "step": 0, "value": 55.8, "contribution": 0.0412}],
                    "created_at": "2024-03-01T10:01:00Z",
                    "finished_at": "2024-03-01T10:01:04Z",
                }
            ]
        },
    )

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

    model_config = ConfigDict(json_schema_extra={"examples": [{"prediction_id": _PID, "status": "queued"}]})

    prediction_id: str
    status: Literal["queued", "running"]


# --- outcomes and live performance (services/predictor/performance.py) -----------------------------------------


# What PostgreSQL's jsonb and orjson both store: no NUL character in a string or key, integers within 64 bits
# (orjson's range). Anything else in `detail` was a 500 when the row was written; now it is a 422 naming it.
def _no_nul(key: str) -> str:
    if "\x00" in key:
        raise ValueError("a NUL character cannot be stored")
    return key


_NoNul = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
_Key = Annotated[str, AfterValidator(_no_nul)]  # (a pattern on dict keys documents as patternProperties: not a rule)
_KEYS: dict[str, Any] = {"propertyNames": {"pattern": r"^[^\x00]*$"}}
type StoredJson = (
    _NoNul
    | Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
    | float
    | bool
    | None
    | list[StoredJson]
    | Annotated[dict[_Key, StoredJson], Field(json_schema_extra=_KEYS)]
)


class OutcomeIn(BaseModel):
    """A result a client observed for one served prediction, e.g. the PnL of the trade it placed on it."""

    model_config = ConfigDict(
        allow_inf_nan=False,
        extra="forbid",
        json_schema_extra={
            "example": {
                "prediction_id": "0192f3a4-5b6c-7d8e-9f00-112233445566",
                "pnl": 0.0042,
                "detail": {"trade_id": "T-1842", "entry": 1.0831, "exit": 1.0876},
            }
        },
    )

    prediction_id: uuid.UUID = Field(description="the prediction_id of a served prediction")
    pnl: float | None = Field(default=None, description="the result as a return (e.g. 0.0042 = +0.42 %); optional")
    detail: Annotated[dict[_Key, StoredJson], Field(json_schema_extra=_KEYS)] | None = Field(
        default=None, description="anything else worth keeping, as JSON (no NUL characters, integers within 64 bits)"
    )


class OutcomeOut(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "prediction_id": _PID,
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "model_version": "20240301T100512Z",
                    "variant": "production",
                    "pnl": 0.0042,
                    "detail": {"trade_id": "T-1842", "entry": 1.0831, "exit": 1.0876},
                    "recorded_by": "write-1",
                    "recorded_at": "2024-03-01T14:00:00Z",
                }
            ]
        },
    )

    prediction_id: str
    symbol: str
    timeframe: str
    model_version: str
    variant: str
    pnl: float | None
    detail: dict[str, Any]
    recorded_by: str = Field(description="the API key id that recorded it")
    recorded_at: datetime


class CalibrationBucket(BaseModel):
    confidence_low: float = Field(description="bucket lower edge (inclusive)")
    confidence_high: float = Field(description="bucket upper edge (exclusive; the last bucket includes 1.0)")
    bars: int = Field(description="settled bars whose signal's confidence falls in the bucket")
    mean_confidence: float | None
    hit_rate: float | None = Field(description="share of those bars whose signal was right")


class VariantPerformance(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_version: str
    variant: Literal["production", "candidate", "shadow"]
    predictions: int = Field(description="logged predictions (every request, cached ones too)")
    settled_bars: int = Field(description="settled outcomes: one per bar, however many requests asked for it")
    first_bar: datetime | None
    last_bar: datetime | None
    hits: int
    hit_rate: float | None = Field(description="share of settled bars whose signal equals the realised label")
    hit_rate_ci_low: float | None = Field(description="95 % Wilson interval, lower end")
    hit_rate_ci_high: float | None = Field(description="95 % Wilson interval, upper end")
    brier: float | None = Field(description="multiclass Brier score, mean of sum over classes of (p - onehot)^2")
    log_loss: float | None = Field(description="mean -ln p(realised label), natural log, p clipped at 1e-15")
    calibration: list[CalibrationBucket]
    trades: int = Field(description="settled BUY or SELL signals (HOLD takes no position)")
    profit_factor: float | None = Field(
        description="sum of winning trades' pnl / |sum of losing trades' pnl|; null without a losing trade"
    )
    return_after_costs: float = Field(
        description="sum of settled pnl: log returns from the next bar's open to the horizon bar's close, after "
        "the round-trip cost"
    )
    external_outcomes: int = Field(description="outcomes recorded with POST /v1/outcomes")
    external_pnl: float | None = Field(description="sum of their pnl (those that gave one)")


class PerformanceOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "since": None,
                    "versions": [
                        {
                            "model_version": "20240301T100512Z",
                            "variant": "production",
                            "predictions": 1532,
                            "settled_bars": 212,
                            "first_bar": "2024-03-01T09:00:00Z",
                            "last_bar": "2024-03-12T16:00:00Z",
                            "hits": 109,
                            "hit_rate": 0.514,
                            "hit_rate_ci_low": 0.448,
                            "hit_rate_ci_high": 0.580,
                            "brier": 0.641,
                            "log_loss": 1.071,
                            "calibration": [
                                {
                                    "confidence_low": 0.5,
                                    "confidence_high": 0.6,
                                    "bars": 121,
                                    "mean_confidence": 0.55,
                                    "hit_rate": 0.53,
                                }
                            ],
                            "trades": 164,
                            "profit_factor": 1.07,
                            "return_after_costs": 0.0061,
                            "external_outcomes": 3,
                            "external_pnl": 0.0042,
                        }
                    ],
                }
            ]
        }
    )

    symbol: str
    timeframe: str
    since: datetime | None
    versions: list[VariantPerformance]


# Parameters the routes check themselves (stream_routes.parse_series, webhooks._webhook_id), as schemas for the
# OpenAPI document (shared.errors.handler_checked).
_SERIES_ITEM = rf"\s*[A-Z0-9._-]{{1,20}}:({'|'.join(t.value for t in Timeframe)})\s*"
SERIES_LIST_SCHEMA: dict[str, Any] = {"type": "string", "pattern": rf"^{_SERIES_ITEM}(,{_SERIES_ITEM})*$"}
WEBHOOK_ID_SCHEMA: dict[str, Any] = {"type": "string", "pattern": r"^[0-9]{1,18}$"}


class FeatureDriftOut(BaseModel):
    feature: str
    psi: float = Field(description="population stability index of the live window against the training reference")
    ks: float = Field(description="Kolmogorov-Smirnov statistic on the same bins (a lower bound of the exact one)")
    drifted: bool = Field(description="PSI or KS above its threshold (the fixed one or the calibrated null one)")


class DriftOut(BaseModel):
    """The newest drift check of a series (docs/LIFECYCLE.md, "Drift"), with its model flag."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "model_version": "20240301T100512Z",
                    "checked_at": "2024-03-02T10:00:03Z",
                    "window_start": "2024-02-24T10:00:00Z",
                    "window_end": "2024-03-02T10:00:00Z",
                    "live_bars": 168,
                    "drifted_features": ["atr_14_pct"],
                    "features": [
                        {"feature": "atr_14_pct", "psi": 1.31, "ks": 0.41, "drifted": True},
                        {"feature": "rsi_14", "psi": 0.04, "ks": 0.07, "drifted": False},
                    ],
                    "flag": {"drift": True, "performance": False, "reason": "drift: atr_14_pct"},
                }
            ]
        },
    )

    symbol: str
    timeframe: str
    model_version: str = Field(description="the version whose training reference the window was compared with")
    checked_at: datetime
    window_start: datetime | None
    window_end: datetime | None
    live_bars: int = Field(description="bars in the live window")
    drifted_features: list[str]
    features: list[FeatureDriftOut] = Field(description="every feature of the check, largest PSI first")
    flag: dict[str, Any] | None = Field(
        description="the series' model_flags row (drift, performance, reason): set by a check that found drift, "
        "cleared by a promotion; null when never set"
    )
