"""The contract between trainer and predictor: what a model version's metadata.json holds.

Artifacts of a version live under `{symbol}/{timeframe}/{version}/` in the object store:
`model.keras` (Keras 3), `model.onnx` (served by onnxruntime), `metadata.json` (this model). The registry row
(`model_versions`) stores the sha256 of metadata.json; metadata.json stores the sha256 of every other file.
A reader verifies metadata.json against the registry, then each file against metadata.json, before
loading anything (models are programs).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Output order of every model's softmax; metadata repeats it so a reader never guesses.
CLASSES: tuple[str, str, str] = ("SELL", "HOLD", "BUY")


def artifact_prefix(symbol: str, timeframe: str, version: str) -> str:
    return f"{symbol}/{timeframe}/{version}/"


# A file of a version is named by a bare file name inside its prefix: no folder, no "..", no absolute path, so
# a metadata.json can never point a reader at another version's (or anything else's) objects.
_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def artifact_name_error(name: str) -> str | None:
    """Why `name` may not name a file of a version (it would leave the version's prefix), or None."""
    if _ARTIFACT_NAME.fullmatch(name) and ".." not in name:
        return None
    return (
        f"artifact name {name!r} is not a bare file name inside the version's prefix "
        "(no '/', '\\', '..' or absolute path); refusing it"
    )


class Scaler(BaseModel):
    """Standardisation fitted on the training split only: x' = (x - mean) / scale, per feature."""

    mean: list[float]
    scale: list[float]


class Calibration(BaseModel):
    """Temperature scaling fitted on the validation split: p = softmax(logits / temperature)."""

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0)
    nll_before: float | None = None
    nll_after: float | None = None


class LabelDefinition(BaseModel):
    """BUY if the forward log return over `horizon` bars exceeds +dead_band, SELL below -dead_band, else HOLD;
    dead_band = dead_band_atr * ATR(14)/close at the bar."""

    classes: list[str] = Field(default_factory=lambda: list(CLASSES))
    horizon: int = Field(ge=1)
    dead_band_atr: float = Field(ge=0)
    description: str = ""


class ReferenceDistribution(BaseModel):
    """Training-split distribution of one feature for drift checks: quantile bin edges and their shares, and the
    null thresholds (shared/drift.py): how large PSI and KS get, without drift, on windows of `null_window_bars`
    consecutive training rows. None in models trained before them, or on splits too short to measure."""

    edges: list[float]
    shares: list[float]
    mean: float
    std: float
    null_window_bars: int | None = None  # window size the null thresholds were measured for
    null_quantile: float | None = None  # the quantile of the fitted null distribution they are
    null_windows: int | None = None  # training windows the fit used
    psi_null: float | None = None
    ks_null: float | None = None


class ModelMetadata(BaseModel):
    symbol: str
    timeframe: str
    version: str
    created_at: datetime
    training_job_id: str | None = None
    feature_names: list[str]
    sequence_length: int
    classes: list[str] = Field(default_factory=lambda: list(CLASSES))
    scaler: Scaler
    calibration: Calibration
    labels: LabelDefinition
    hyperparameters: dict[str, object]
    training_range: dict[str, datetime]  # {"start", "end"} bar-open times of the rows used
    splits: dict[str, dict[str, object]] = Field(default_factory=dict)  # rows and ranges of train/val/test
    reference_distributions: dict[str, ReferenceDistribution]
    metrics: dict[str, object]
    library_versions: dict[str, str]
    artifacts: dict[str, str]  # file name -> sha256 hex (model.keras, model.onnx)
    onnx_max_abs_diff: float | None = None
    input_name: str = "features"  # ONNX input name; input shape (batch, sequence_length, n_features), float32

    @field_validator("artifacts")
    @classmethod
    def _names_inside_the_prefix(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if (why := artifact_name_error(name)) is not None:
                raise ValueError(why)
        return value

    def identity_error(self, symbol: str, timeframe: str, version: str) -> str | None:
        """Why this metadata does not describe the version it was read for (it names another model), or None."""
        if (self.symbol, self.timeframe, self.version) == (symbol, timeframe, version):
            return None
        return (
            f"metadata.json describes {self.symbol}/{self.timeframe}/{self.version}, not the "
            f"{symbol}/{timeframe}/{version} it was read for; refusing it"
        )


GateVerdict = Literal["passed", "failed", "not_validated"]


class ModelQuality(BaseModel):
    """The promotion gate's verdict on a model version (`model_versions.quality`, written by the trainer, served by
    the trainer's registry and with every prediction)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "gate": "failed",
                "reasons": ["log loss 1.0712 does not beat gradient boosting's 1.0655 out of sample"],
                "validation_id": 12,
            }
        }
    )

    gate: GateVerdict = Field(
        description="passed: beat the baselines out of sample in walk-forward validation; failed: did not; "
        "not_validated: no validation has judged this version yet. Only 'passed' is a vetted model."
    )
    reasons: list[str] = Field(default_factory=list, description="why the gate decided so")
    validation_id: int | None = Field(default=None, description="the validation report behind the verdict")


QUALITY_DESCRIPTION = (
    "the promotion gate's verdict on the model version that served this answer, as it is now (a cached "
    "prediction carries the current verdict, not the one at computation time)"
)
