"""The `params` of each job kind, checked when the job is queued (a 422 naming the field) and again when it runs.

Training takes hyperparameter overrides (services.trainer.hyperparameters.TrainConfig). The quality jobs take
the models below. Every model forbids unknown keys, so a typo is an error rather than a silent default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.trainer.backtest import BacktestParams
from services.trainer.hyperparameters import TrainConfig, parse_params
from shared.errors import ValidationFailed

MAX_FOLDS = 20


class ValidateParams(BaseModel):
    """`validate`: walk-forward validation of a model version's recipe (its hyperparameters, retrained per fold)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    folds: int = Field(default=5, ge=2, le=MAX_FOLDS, description="expanding-window folds")
    model_version: str | None = Field(
        default=None, description="version to validate (its training hyperparameters); default the newest one"
    )
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the validated recipe (TrainConfig fields)"
    )


class BacktestJobParams(BacktestParams):
    """`backtest`: follow a model version's signals (default: the production model) or uploaded signals."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)

    model_version: str | None = Field(default=None, description="version whose signals to follow")
    signals_csv: str | None = Field(
        default=None,
        max_length=50_000_000,
        description="`ts,signal` rows (BUY/SELL/HOLD or 1/-1/0) instead of a model's signals",
    )

    @model_validator(mode="after")
    def _one_source(self) -> BacktestJobParams:
        if self.model_version is not None and self.signals_csv is not None:
            raise ValueError("give model_version or signals_csv, not both")
        return self


class WeightsParams(BaseModel):
    """`optimize_weights`: SHAP weights of a model version (default: the production model)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_version: str | None = None


JobParams = TrainConfig | ValidateParams | BacktestJobParams | WeightsParams
_MODELS: dict[str, type[BaseModel]] = {
    "validate": ValidateParams,
    "backtest": BacktestJobParams,
    "optimize_weights": WeightsParams,
}


def _detail(exc: ValidationError) -> str:
    return "; ".join(
        f"params.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else f"params: {e['msg']}"
        for e in exc.errors()
    )


def parse_job_params(kind: str, params: dict[str, Any], *, fault_injection: bool) -> JobParams:
    """The typed params of a job of `kind`; ValidationFailed (422) naming the field otherwise."""
    if kind == "train":
        return parse_params(params, fault_injection=fault_injection)
    model = _MODELS.get(kind)
    if model is None:
        raise ValidationFailed(f"unknown job kind {kind!r}; use train, validate, backtest or optimize_weights")
    try:
        parsed = model.model_validate(params)
    except ValidationError as exc:
        raise ValidationFailed(_detail(exc)) from None
    if isinstance(parsed, ValidateParams) and parsed.hyperparameters:
        parse_params(parsed.hyperparameters, fault_injection=False)  # 422 on a bad override, before queueing
    if isinstance(parsed, BacktestJobParams) and parsed.signals_csv is not None:
        from services.trainer.backtest import parse_signals_csv

        parse_signals_csv(parsed.signals_csv)  # 422 naming the line, before queueing
    assert isinstance(parsed, ValidateParams | BacktestJobParams | WeightsParams)
    return parsed
