from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.indicators.main import create_app
from shared.settings import Settings
from tests.support.clients import asgi_client
from tests.support.keys import API_KEYS


@pytest.fixture(scope="session")
def indicators_settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, api_keys=API_KEYS, environment="test")  # type: ignore[arg-type]


@pytest.fixture(scope="session")
async def indicators(indicators_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in asgi_client(create_app(indicators_settings)):
        yield client
