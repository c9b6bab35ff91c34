"""Request/response models of the trainer API and the rows of its tables."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.model_metadata import ModelQuality
from shared.timeframes import Timeframe

JobStatus = Literal["queued", "running", "succeeded", "failed"]
JobKind = Literal["train", "auto_retrain", "full_retrain", "validate", "backtest", "optimize_weights"]
QueueableKind = Literal["train", "validate", "backtest", "optimize_weights"]
ModelStatus = Literal["candidate", "production", "archived", "failed"]


class JobIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"kind": "train", "symbol": "EURUSD", "timeframe": "H1", "params": {"epochs": 20}},
                {"kind": "validate", "symbol": "EURUSD", "timeframe": "H1", "params": {"folds": 5}},
                {"kind": "backtest", "symbol": "EURUSD", "timeframe": "H1", "params": {"cost_bps": 2}},
                {"kind": "optimize_weights", "symbol": "EURUSD", "timeframe": "H1"},
            ]
        },
    )

    kind: QueueableKind = "train"
    symbol: str = Field(pattern=r"^[A-Z0-9._-]{1,20}$")
    timeframe: Timeframe
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="train: hyperparameter overrides (TrainConfig); validate: folds, model_version, "
        "hyperparameters; backtest: model_version or signals_csv, cost_bps, spread_bps, commission_bps, "
        "slippage_bps, long_only, max_position_fraction, sizing, stop_atr, take_profit_atr; optimize_weights: "
        "model_version (docs/TRAINER.md)",
    )


class JobCreated(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"job_id": "3f9a1c0e5b7d4e2fa1b2c3d4e5f60718"}})

    job_id: str


class EpochLog(BaseModel):
    epoch: int
    loss: float | None = None
    val_loss: float | None = None
    accuracy: float | None = None
    val_accuracy: float | None = None


class Job(BaseModel):
    id: str
    kind: JobKind
    symbol: str | None
    timeframe: str | None
    params: dict[str, Any]
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    history: list[EpochLog]
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


# The verdict model is the contract the predictor serves too: one definition, in shared.
Quality = ModelQuality


class ModelVersion(BaseModel):
    id: int
    symbol: str
    timeframe: str
    version: str
    status: ModelStatus
    metrics: dict[str, Any]
    artifact_uri: str
    sha256: str
    created_at: datetime
    training_job_id: str | None
    quality: Quality


class TargetResult(BaseModel):
    name: str
    metric: str = Field(description="the report's metric the target reads")
    value: float | None
    threshold: float
    comparison: Literal[">", "<"]
    passed: bool


class ModelDetail(ModelVersion):
    """A version with its latest validation's verdict and the design's business targets (pass or fail each)."""

    validation: dict[str, Any] | None = Field(
        description="summary of the latest walk-forward report: folds, data range, pooled metrics, comparisons"
    )
    business_targets: list[TargetResult] = Field(
        description="win rate > 55 %, profit factor > 1.2, max drawdown < 15 %, Sharpe > 0.8, accuracy > 65 %, "
        "out of sample over the walk-forward folds; empty until validated"
    )


class ValidationOut(BaseModel):
    id: int
    model_version_id: int | None
    symbol: str
    timeframe: str
    job_id: str | None
    folds: int
    data_start: datetime
    data_end: datetime
    created_at: datetime
    report: dict[str, Any]


class BacktestOut(BaseModel):
    id: int
    model_version_id: int | None
    symbol: str
    timeframe: str
    job_id: str | None
    params: dict[str, Any]
    metrics: dict[str, Any]
    trades: list[dict[str, Any]]
    equity: dict[str, Any]
    data_start: datetime
    data_end: datetime
    created_at: datetime


class ExplanationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: uuid.UUID = Field(description="id of a logged prediction")


class ExplanationOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    prediction_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    model_version: str | None = None
    contributions: list[dict[str, Any]] | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class RetrainDecision(BaseModel):
    symbol: str
    timeframe: str
    decided_at: datetime
    retrain: bool
    reasons: list[str]
    detail: dict[str, Any]
    source_job_id: str | None
    training_job_id: str | None


class ModelFlags(BaseModel):
    symbol: str
    timeframe: str
    drift: bool
    performance: bool
    reason: str | None
    updated_at: datetime
