"""Every request-scoped dependency of the indicators service, as `Annotated` aliases (one place to look)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from shared.app import PoolDep
from shared.auth import ReadKey, WriteKey
from shared.settings import Settings

__all__ = ["PoolDep", "ReadKey", "SettingsDep", "WriteKey"]


async def _settings(request: Request) -> Settings:
    # Typed once here: the app factory put this process's settings on app.state (shared.app.build_app).
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(_settings)]
