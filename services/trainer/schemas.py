"""Request/response models of the trainer API and the rows of its tables."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from shared.model_metadata import ModelQuality
from shared.rollouts import Rollout, RolloutPolicy
from shared.timeframes import Timeframe

JobStatus = Literal["queued", "running", "succeeded", "failed"]
JobKind = Literal["train", "auto_retrain", "full_retrain", "validate", "backtest", "optimize_weights"]
QueueableKind = Literal["train", "validate", "backtest", "optimize_weights"]
ModelStatus = Literal["candidate", "production", "archived", "failed"]


def _job_in_schema(schema: dict[str, Any]) -> None:
    """JobIn's OpenAPI schema: `params` as each kind takes them (services.trainer.job_params checks the same
    models when the job is queued); without `kind`, a train job's."""
    from services.trainer.hyperparameters import TrainConfig
    from services.trainer.job_params import BacktestJobParams, ValidateParams, WeightsParams

    schema["examples"] = [
        {"kind": "train", "symbol": "EURUSD", "timeframe": "H1", "params": {"epochs": 20}},
        {"kind": "validate", "symbol": "EURUSD", "timeframe": "H1", "params": {"folds": 5}},
        {"kind": "backtest", "symbol": "EURUSD", "timeframe": "H1", "params": {"cost_bps": 2}},
        {"kind": "optimize_weights", "symbol": "EURUSD", "timeframe": "H1"},
    ]
    backtest = BacktestJobParams.model_json_schema()
    backtest["not"] = {"required": ["model_version", "signals_csv"]}  # one source of signals, not both
    kinds: dict[str, dict[str, Any]] = {
        "train": TrainConfig.model_json_schema(),
        "validate": ValidateParams.model_json_schema(),
        "backtest": backtest,
        "optimize_weights": WeightsParams.model_json_schema(),
    }
    schema["anyOf"] = [
        {
            "properties": {"kind": {"const": kind}, "params": params},
            **({} if kind == "train" else {"required": ["kind"]}),
        }
        for kind, params in kinds.items()
    ]


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_job_in_schema)

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


JOB_EXAMPLE: dict[str, Any] = {
    "id": "3f9a1c0e5b7d4e2fa1b2c3d4e5f60718",
    "kind": "train",
    "symbol": "EURUSD",
    "timeframe": "H1",
    "params": {"epochs": 20},
    "status": "succeeded",
    "progress": 1.0,
    "history": [
        {"epoch": 1, "loss": 1.0921, "val_loss": 1.0874, "accuracy": 0.371, "val_accuracy": 0.384},
        {"epoch": 2, "loss": 1.0815, "val_loss": 1.0842, "accuracy": 0.392, "val_accuracy": 0.397},
    ],
    "result": {"model_version_id": 12, "version": "20240301T100512Z"},
    "error": None,
    "attempts": 1,
    "created_at": "2024-03-01T10:00:00Z",
    "started_at": "2024-03-01T10:00:01Z",
    "finished_at": "2024-03-01T10:05:12Z",
}


class Job(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

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


MODEL_VERSION_EXAMPLE: dict[str, Any] = {
    "id": 12,
    "symbol": "EURUSD",
    "timeframe": "H1",
    "version": "20240301T100512Z",
    "status": "production",
    "metrics": {"val_loss": 1.0842, "val_accuracy": 0.397},
    "artifact_uri": "s3://aicash-models/EURUSD/H1/20240301T100512Z/",
    "sha256": "9c1185a5c5e9fc54612808977ee8f548b2258d31f2f6b1fcb1b5d1e1c8f0a4d2",
    "created_at": "2024-03-01T10:05:12Z",
    "training_job_id": "3f9a1c0e5b7d4e2fa1b2c3d4e5f60718",
    "quality": {
        "gate": "failed",
        "reasons": [
            "log_loss: the LSTM does not beat the best baseline, the training class prior: pooled 1.0988 against "
            "1.0973; LSTM minus it over 5 folds +0.0015, 95% CI [-0.0055, +0.0084] (the upper bound must be below 0)"
        ],
        "validation_id": 7,
    },
    "promoted_at": "2024-03-01T11:00:00Z",
    "retired_at": None,
    "rolled_back_at": None,
}


class ModelVersion(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [MODEL_VERSION_EXAMPLE]})

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
    promoted_at: datetime | None = Field(
        default=None, description="when the version last became production (none if it never served)"
    )
    retired_at: datetime | None = Field(
        default=None, description="when it last stopped being production (none while it serves or if it never did)"
    )
    rolled_back_at: datetime | None = Field(
        default=None,
        description="when it was rolled back (as production) or rejected (as candidate); such a version is never "
        "a rollback target again",
    )


class TargetResult(BaseModel):
    name: str
    metric: str = Field(description="the report's metric the target reads")
    value: float | None
    threshold: float
    comparison: Literal[">", "<"]
    passed: bool


class ModelDetail(ModelVersion):
    """A version with its latest validation's verdict and the design's business targets (pass or fail each)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **MODEL_VERSION_EXAMPLE,
                    "validation": {
                        "id": 7,
                        "folds": 5,
                        "data_start": "2019-01-02T00:00:00Z",
                        "data_end": "2024-02-29T23:00:00Z",
                        "primary_metric": "log_loss",
                    },
                    "business_targets": [
                        {
                            "name": "win rate > 55 %",
                            "metric": "win_rate",
                            "value": 0.521,
                            "threshold": 0.55,
                            "comparison": ">",
                            "passed": False,
                        }
                    ],
                }
            ]
        }
    )

    validation: dict[str, Any] | None = Field(
        description="summary of the latest walk-forward report: folds, data range, pooled metrics, comparisons"
    )
    business_targets: list[TargetResult] = Field(
        description="win rate > 55 %, profit factor > 1.2, max drawdown < 15 %, Sharpe > 0.8, accuracy > 65 %, "
        "out of sample over the walk-forward folds; empty until validated"
    )


class ValidationOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "model_version_id": 12,
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "job_id": "5b7d4e2fa1b2c3d4e5f607183f9a1c0e",
                    "folds": 5,
                    "data_start": "2019-01-02T00:00:00Z",
                    "data_end": "2024-02-29T23:00:00Z",
                    "created_at": "2024-03-01T10:40:00Z",
                    "report": {"primary_metric": "log_loss", "folds": [], "gate": {"verdict": "failed"}},
                }
            ]
        }
    )

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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 3,
                    "model_version_id": 12,
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "job_id": "a1b2c3d4e5f607183f9a1c0e5b7d4e2f",
                    "params": {"cost_bps": 2},
                    "metrics": {"trades": 412, "win_rate": 0.521, "profit_factor": 1.08, "max_drawdown": 0.094},
                    "trades": [{"entry_ts": "2024-02-01T09:00:00Z", "exit_ts": "2024-02-01T13:00:00Z", "side": "long"}],
                    "equity": {"ts": ["2024-02-01T09:00:00Z", "2024-02-01T13:00:00Z"], "equity": [1.0, 1.0021]},
                    "data_start": "2023-03-01T00:00:00Z",
                    "data_end": "2024-02-29T23:00:00Z",
                    "created_at": "2024-03-01T10:50:00Z",
                }
            ]
        }
    )

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
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"prediction_id": "0192f3a4-5b6c-7d8e-9f00-112233445566"}]}
    )

    prediction_id: uuid.UUID = Field(description="id of a logged prediction")


class ExplanationOut(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "prediction_id": "0192f3a4-5b6c-7d8e-9f00-112233445566",
                    "status": "succeeded",
                    "model_version": "20240301T100512Z",
                    "contributions": [{"feature": "rsi_14", "step": 0, "value": 71.2, "contribution": 0.0412}],
                    "detail": {"class": "SELL", "method": "shap.GradientExplainer"},
                    "error": None,
                },
                {"prediction_id": "0192f3a4-5b6c-7d8e-9f00-112233445566", "status": "queued"},
            ]
        },
    )

    prediction_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    model_version: str | None = None
    contributions: list[dict[str, Any]] | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None


class RetrainDecision(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "decided_at": "2024-03-04T00:00:00Z",
                    "retrain": True,
                    "reasons": ["feature drift: rsi_14 PSI 0.31 > 0.25"],
                    "detail": {"psi": {"rsi_14": 0.31}},
                    "source_job_id": None,
                    "training_job_id": "c3d4e5f607183f9a1c0e5b7d4e2fa1b2",
                }
            ]
        }
    )

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


# --- the model lifecycle: rollouts, promotion, rollback, the audit trail (docs/LIFECYCLE.md) -------------------

# No NUL character: PostgreSQL's text refuses it.
UserId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
RolloutSymbol = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9._-]{1,20}$")]


def _rollout_in_schema(schema: dict[str, Any]) -> None:
    """RolloutIn's OpenAPI schema: null only for candidate_model_id (the validator below refuses it elsewhere)."""
    schema["examples"] = [
        {"candidate_model_id": 12, "candidate_traffic_percent": 10, "shadow": True},
        {"policy": "manual"},
        {"test_group_user_ids": ["alice", "bob"], "rollout_symbols": ["EURUSD"]},
        {"candidate_model_id": None},
    ]
    for name, prop in schema.get("properties", {}).items():
        branches = prop.get("anyOf")
        if name == "candidate_model_id" or not isinstance(branches, list):
            continue
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) == 1:
            del prop["anyOf"]
            prop.update(kept[0])
        else:
            prop["anyOf"] = kept
        prop.pop("default", None)


class RolloutIn(BaseModel):
    """A change to a series' rollout: only the fields present change, absent ones keep their value."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_rollout_in_schema)

    policy: RolloutPolicy | None = Field(
        default=None,
        description="what a version that passes the promotion gate does: direct, canary or manual (null refused)",
    )
    candidate_model_id: int | None = Field(
        default=None,
        strict=True,
        description="registry id of a `candidate` version of this series; null clears the candidate",
    )
    candidate_traffic_percent: float | None = Field(
        default=None,
        strict=True,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="share (0..100) of the series' other traffic the candidate gets, split by a salted hash of the "
        "user id (null refused)",
    )
    test_group_user_ids: list[UserId] | None = Field(
        default=None, max_length=10_000, description="user ids that always get the candidate (replaces the list)"
    )
    rollout_symbols: list[RolloutSymbol] | None = Field(
        default=None, max_length=1_000, description="symbols whose every request gets the candidate (replaces the list)"
    )
    shadow: bool | None = Field(
        default=None, strict=True, description="the candidate also scores production traffic, logged as variant shadow"
    )

    @model_validator(mode="after")
    def _null_only_clears_the_candidate(self) -> Self:
        for name in sorted(self.model_fields_set - {"candidate_model_id"}):
            if getattr(self, name) is None:
                raise ValueError(f"{name} may not be null: leave it out to keep its value")
        return self

    def changes(self) -> dict[str, Any]:
        """The fields the client sent, with their values (what update_rollout changes)."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class RolloutOut(Rollout):
    """A series' rollout with the versions it routes between."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "symbol": "EURUSD",
                    "timeframe": "H1",
                    "policy": "canary",
                    "candidate_model_id": 13,
                    "candidate_traffic_percent": 10.0,
                    "test_group_user_ids": ["alice"],
                    "rollout_symbols": [],
                    "shadow": True,
                    "updated_at": "2024-03-02T08:00:00Z",
                    "updated_by": "admin-1",
                    "production_model_id": 12,
                    "production_version": "20240301T100512Z",
                    "candidate_version": "20240302T073000Z",
                }
            ]
        }
    )

    production_model_id: int | None = Field(description="registry id of the production version, if any")
    production_version: str | None = Field(description="version name of the production version")
    candidate_version: str | None = Field(description="version name of the candidate, if any")


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "canary looked good"}]})

    reason: str | None = Field(
        default=None, max_length=1000, pattern=r"^[^\x00]*$", description="why; stored in the audit row"
    )


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "live hit rate fell"}]})

    reason: str | None = Field(
        default=None, max_length=1000, pattern=r"^[^\x00]*$", description="why; stored in the audit row"
    )


class AuditEntry(BaseModel):
    id: int
    at: datetime
    actor: str = Field(description="API key id of the caller, `system` for an automatic decision, `cli:<user>`")
    action: str = Field(description="e.g. model.promote, model.rollback, rollout.update, rollout.candidate, job.create")
    symbol: str | None
    timeframe: str | None
    target: str | None = Field(description="what the action was about, e.g. `model_version:12`")
    before: Any = Field(description="the affected rows before the change (JSON)")
    after: Any = Field(description="the affected rows after the change (JSON)")
    evidence: Any = Field(description="why: the reason given, the gate's verdict, a test's statistics")
    request_id: str | None


class AuditPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "entries": [
                        {
                            "id": 41,
                            "at": "2024-03-02T08:00:00Z",
                            "actor": "admin-1",
                            "action": "model.promote",
                            "symbol": "EURUSD",
                            "timeframe": "H1",
                            "target": "model_version:12",
                            "before": {"status": "candidate"},
                            "after": {"status": "production"},
                            "evidence": {"reason": "canary looked good"},
                            "request_id": "9f1c2a7b3e4d5f60a1b2000000000001",
                        }
                    ],
                    "next_before_id": None,
                }
            ]
        }
    )

    entries: list[AuditEntry] = Field(description="newest first (by id, the order rows were appended)")
    next_before_id: int | None = Field(
        description="pass as `before_id` for the next (older) page; null when this page is the last"
    )
