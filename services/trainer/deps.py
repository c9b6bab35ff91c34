"""Every request-scoped dependency of the trainer API, as `Annotated` aliases (one place to look)."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from services.trainer.settings import TrainerSettings
from shared.app import PoolDep
from shared.auth import AdminKey, ReadKey, WriteKey

__all__ = ["AdminKey", "PoolDep", "PublisherDep", "ReadKey", "SettingsDep", "WriteKey"]


async def _settings(request: Request) -> TrainerSettings:
    # shared.app.build_app keeps the object create_app was given: the process's one TrainerSettings.
    settings: TrainerSettings = request.app.state.settings
    return settings


async def _publisher(request: Request) -> Celery:
    app: Celery = request.app.state.celery
    return app


SettingsDep = Annotated[TrainerSettings, Depends(_settings)]
PublisherDep = Annotated[Celery, Depends(_publisher)]
