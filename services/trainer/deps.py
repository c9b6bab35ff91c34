"""Every request-scoped dependency of the trainer API, as `Annotated` aliases (one place to look)."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from services.trainer.settings import TrainerSettings
from shared.app import PoolDep
from shared.auth import AdminKey, ReadKey, WriteKey

__all__ = ["AdminKey", "PoolDep", "PublisherDep", "ReadKey", "TrainerSettingsDep", "WriteKey"]


async def _trainer_settings(request: Request) -> TrainerSettings:
    tsettings: TrainerSettings = request.app.state.trainer_settings
    return tsettings


async def _publisher(request: Request) -> Celery:
    app: Celery = request.app.state.celery
    return app


TrainerSettingsDep = Annotated[TrainerSettings, Depends(_trainer_settings)]
PublisherDep = Annotated[Celery, Depends(_publisher)]
