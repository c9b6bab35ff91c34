"""`aicash train --local` and `aicash models list`, through typer's runner."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from services.trainer.cli import register
from shared.settings import Settings


@pytest.fixture(scope="module")
def cli(trainer_settings: Settings, monkeypatch_module: pytest.MonkeyPatch) -> typer.Typer:
    assert trainer_settings.database_url and trainer_settings.s3_endpoint_url
    from shared.settings import get_settings

    monkeypatch_module.setenv("DATABASE_URL", trainer_settings.database_url)
    monkeypatch_module.setenv("MODEL_STORE_URL", trainer_settings.model_store_url)
    monkeypatch_module.setenv("S3_ENDPOINT_URL", trainer_settings.s3_endpoint_url)
    get_settings.cache_clear()
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """aicash"""

    register(app)
    yield app
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def monkeypatch_module() -> pytest.MonkeyPatch:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_train_local_on_a_resampled_timeframe_then_list(cli: typer.Typer, spx_bars: str) -> None:
    # W1 is not stored: it is built from the stored D1 bars (completed weeks only).
    params = json.dumps({"lstm_units": [8], "batch_size": 64})
    r = CliRunner().invoke(
        cli, ["train", "--symbol", spx_bars, "--timeframe", "W1", "--epochs", "2", "--params", params, "--local"]
    )
    assert r.exit_code == 0, r.output
    assert "registered SPXTRAIN/W1/" in r.output and "production" in r.output
    r = CliRunner().invoke(cli, ["models", "list", "--symbol", spx_bars, "--timeframe", "W1", "--json"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.replace("\n}", "}").split("}\n{")] if r.output.strip() else []
    assert r.output.count('"version"') == 1 and rows
    assert '"base_timeframe": "D1"' in r.output


def test_train_unknown_series_exits_with_the_reason(cli: typer.Typer) -> None:
    r = CliRunner().invoke(cli, ["train", "--symbol", "NOSUCH", "--timeframe", "H1", "--local"])
    assert r.exit_code == 2
    assert "not_found" in r.output and "NOSUCH" in r.output


def test_train_local_never_leaves_a_retryable_failure_queued(
    cli: typer.Typer, spx_bars: str, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    import asyncio
    import re

    import asyncpg

    from services.trainer import repository as repo
    from services.trainer.settings import get_trainer_settings

    # An error worth retrying (an ordinary exception); in-process there is no broker to retry through.
    monkeypatch.setenv("TRAINER_FAULT_INJECTION", "true")
    get_trainer_settings.cache_clear()
    try:
        params = json.dumps({"lstm_units": [8], "fault": "raise"})
        r = CliRunner().invoke(
            cli, ["train", "--symbol", spx_bars, "--timeframe", "D1", "--epochs", "1", "--params", params, "--local"]
        )
    finally:
        monkeypatch.delenv("TRAINER_FAULT_INJECTION")
        get_trainer_settings.cache_clear()
    assert r.exit_code == 1, r.output
    found = re.search(r"job ([0-9a-f]{32})", r.output)
    assert found, r.output

    async def read() -> object:
        conn = await asyncpg.connect(database_url)
        try:
            return await repo.get_job(conn, found.group(1))
        finally:
            await conn.close()

    job = asyncio.run(read())
    assert job is not None and job.status == "failed" and job.attempts == 1  # type: ignore[attr-defined]
    assert job.error == "failed (in-process run, not retried): RuntimeError: injected fault"  # type: ignore[attr-defined]
    assert "injected fault" in " ".join(r.output.split())
