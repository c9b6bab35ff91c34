"""Request/response models of the trainer API and the rows of its tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.timeframes import Timeframe

JobStatus = Literal["queued", "running", "succeeded", "failed"]
JobKind = Literal["train", "auto_retrain", "full_retrain"]
ModelStatus = Literal["candidate", "production", "archived", "failed"]


class JobIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {"kind": "train", "symbol": "EURUSD", "timeframe": "H1", "params": {"epochs": 20}}
        },
    )

    kind: Literal["train"] = "train"
    symbol: str = Field(pattern=r"^[A-Z0-9._-]{1,20}$")
    timeframe: Timeframe
    params: dict[str, Any] = Field(
        default_factory=dict, description="hyperparameter overrides (see docs/TRAINER.md, TrainConfig)"
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


class ModelFlags(BaseModel):
    symbol: str
    timeframe: str
    drift: bool
    performance: bool
    reason: str | None
    updated_at: datetime
