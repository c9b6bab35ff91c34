"""Hyperparameters of a training run; every field can be overridden by a job's `params` and is recorded
in the model's metadata."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sequence_length: int = Field(default=20, ge=2, le=500, description="steps per input sequence")
    horizon: int = Field(default=1, ge=1, le=500, description="bars ahead for the forward return label")
    dead_band_atr: float = Field(
        default=0.25, ge=0, le=10, description="HOLD when |forward log return| <= dead_band_atr * ATR(14)/close"
    )
    lstm_units: tuple[int, ...] = Field(default=(64, 32), min_length=1, max_length=4)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    batch_size: int = Field(default=256, ge=1, le=65_536)
    epochs: int = Field(default=30, ge=1, le=1000)
    patience: int = Field(default=5, ge=1, description="early stopping on validation loss")
    seed: int = 42
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    # Fewest sequences (all splits together) worth training on.
    min_sequences: int = Field(default=300, ge=30)
    # Quantile bins of each feature's reference distribution (drift checks).
    reference_bins: int = Field(default=10, ge=2, le=100)

    @model_validator(mode="after")
    def _fractions(self) -> TrainConfig:
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self

    @property
    def purge_gap(self) -> int:
        """Sequences dropped between splits: no label window of one split overlaps inputs of the next."""
        return self.sequence_length + self.horizon
