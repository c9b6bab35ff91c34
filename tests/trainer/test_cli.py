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
