"""The trainer's one settings object: shared and trainer knobs, read under the environment names deployments set."""

from __future__ import annotations

import pydantic
import pytest

from services.trainer.settings import TrainerSettings
from shared.settings import Settings


def test_one_object_reads_shared_and_trainer_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db:5432/aicash")
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://guest@mq//")
    monkeypatch.setenv("TRAINER_QUEUE", "training-eu")
    monkeypatch.setenv("TRAINER_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("trainer_scheduled_epochs", "7")  # case-insensitive, like the shared settings
    monkeypatch.setenv("TRAINER_VALIDATE_AFTER_TRAIN", "false")
    s = TrainerSettings()
    assert isinstance(s, Settings)
    assert (s.database_url, s.celery_broker_url) == ("postgresql://u@db:5432/aicash", "amqp://guest@mq//")
    assert (s.trainer_queue, s.trainer_max_attempts, s.trainer_scheduled_epochs) == ("training-eu", 5, 7)
    assert s.trainer_validate_after_train is False


def test_every_trainer_field_has_a_trainer_env_name() -> None:
    # The env name of a field is its upper-cased name (no prefix): each trainer knob must start with
    # trainer_ so it reads TRAINER_* and cannot shadow or be shadowed by a shared name.
    own = set(TrainerSettings.model_fields) - set(Settings.model_fields)
    assert own and all(name.startswith("trainer_") for name in own), sorted(own)
    assert TrainerSettings.model_config.get("env_prefix", "") == ""


def test_bounds_still_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER_MAX_ATTEMPTS", "0")
    with pytest.raises(pydantic.ValidationError, match="trainer_max_attempts"):
        TrainerSettings()
