"""Hyperparameters of a training run; every field can be overridden by a job's `params` and is recorded
in the model's metadata."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ValidationFailed

# Every bound is checked when the job is queued (a 422 naming the field), so nothing out of range reaches a
# worker: huge layers or sequences would exhaust its memory on every attempt, odd values would crash it.
MAX_LSTM_UNITS = 1024
MAX_LSTM_LAYERS = 4
# Fewest sequences each of train / validation / test must hold (checked on the data, when the job runs).
MIN_SPLIT_SEQUENCES = 10

# A job param that makes the worker crash on purpose; accepted only when TRAINER_FAULT_INJECTION is on.
FAULT_PARAM = "fault"

LstmUnits = Annotated[int, Field(strict=True, ge=1, le=MAX_LSTM_UNITS)]


class TrainConfig(BaseModel):
    # Numbers strict: lax mode would read `false` as 0 and `true` as 1 (schemathesis found it on POST /v1/jobs).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    sequence_length: int = Field(strict=True, default=20, ge=2, le=200, description="steps per input sequence")
    horizon: int = Field(strict=True, default=1, ge=1, le=200, description="bars ahead for the forward return label")
    dead_band_atr: float = Field(
        strict=True,
        default=0.25,
        ge=0,
        le=10,
        description="HOLD when |forward log return| <= dead_band_atr * ATR(14)/close",
    )
    lstm_units: tuple[LstmUnits, ...] = Field(
        default=(64, 32),
        min_length=1,
        max_length=MAX_LSTM_LAYERS,
        description=f"units per LSTM layer, 1..{MAX_LSTM_UNITS} each, at most {MAX_LSTM_LAYERS} layers",
    )
    dropout: float = Field(strict=True, default=0.2, ge=0, le=0.9)
    learning_rate: float = Field(strict=True, default=1e-3, ge=1e-6, le=1)
    batch_size: int = Field(strict=True, default=256, ge=1, le=16_384)
    epochs: int = Field(strict=True, default=30, ge=1, le=1000)
    patience: int = Field(strict=True, default=5, ge=1, le=1000, description="early stopping on validation loss")
    # numpy and Keras seeds are unsigned 32-bit.
    seed: int = Field(strict=True, default=42, ge=0, le=2**32 - 1)
    val_fraction: float = Field(strict=True, default=0.15, ge=0.05, le=0.4)
    test_fraction: float = Field(strict=True, default=0.15, ge=0.05, le=0.4)
    # Fewest sequences (all splits together) worth training on.
    min_sequences: int = Field(strict=True, default=300, ge=30, le=10_000_000)
    # Quantile bins of each feature's reference distribution (drift checks).
    reference_bins: int = Field(strict=True, default=10, ge=2, le=100)

    @model_validator(mode="after")
    def _fractions(self) -> TrainConfig:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self

    @property
    def purge_gap(self) -> int:
        """Sequences dropped between splits: no label window of one split overlaps inputs of the next."""
        return self.sequence_length + self.horizon


def parse_params(params: dict[str, Any], *, fault_injection: bool) -> TrainConfig:
    """Hyperparameter overrides as a TrainConfig; a bad one is a 422 naming the field."""
    clean = dict(params)
    fault = clean.pop(FAULT_PARAM, None)
    if fault is not None and not (fault_injection and fault in ("exit", "raise")):
        raise ValidationFailed(f"params.{FAULT_PARAM} is only accepted by test deployments (TRAINER_FAULT_INJECTION)")
    try:
        return TrainConfig.model_validate(clean)
    except ValidationError as exc:
        detail = "; ".join(f"params.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValidationFailed(detail) from None
