"""Query times are read as their schema says: ISO 8601 or whole epoch seconds, never a fraction."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import TypeAdapter, ValidationError

from services.trainer.hyperparameters import TrainConfig
from shared.query import QueryTime

ADAPTER: TypeAdapter[datetime] = TypeAdapter(QueryTime)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-01-02T00:00:00Z", datetime(2024, 1, 2, tzinfo=UTC)),
        ("1704153600", datetime(2024, 1, 2, tzinfo=UTC)),
    ],
)
def test_iso_and_whole_epoch_seconds_are_read(raw: str, expected: datetime) -> None:
    assert ADAPTER.validate_python(raw) == expected


@pytest.mark.parametrize("raw", ["0.5", "1704153600.5", "1e3", ".5", "-2.0"])
def test_fractions_and_exponents_are_refused_with_a_message(raw: str) -> None:
    with pytest.raises(ValidationError, match="whole epoch seconds"):
        ADAPTER.validate_python(raw)


@pytest.mark.parametrize("field", ["dropout", "epochs", "dead_band_atr", "batch_size"])
def test_train_config_numbers_refuse_booleans(field: str) -> None:
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({field: False})
    assert TrainConfig.model_validate({"dropout": 0, "epochs": 3}).dropout == 0.0
