"""`aicash train --local` and `aicash models list`, through typer's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from services.trainer.cli import register
from services.trainer.settings import TrainerSettings


@pytest.fixture(scope="module")
def cli(trainer_settings: TrainerSettings, monkeypatch_module: pytest.MonkeyPatch) -> typer.Typer:
    assert trainer_settings.database_url and trainer_settings.s3_endpoint_url
    # The CLI reads the process's settings (get_trainer_settings, cached) from these variables.
    from services.trainer.settings import get_trainer_settings

    monkeypatch_module.setenv("DATABASE_URL", trainer_settings.database_url)
    monkeypatch_module.setenv("MODEL_STORE_URL", trainer_settings.model_store_url)
    monkeypatch_module.setenv("S3_ENDPOINT_URL", trainer_settings.s3_endpoint_url)
    get_trainer_settings.cache_clear()
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """aicash"""

    register(app)
    yield app
    get_trainer_settings.cache_clear()


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


@pytest.mark.slow
def test_validate_show_report_backtest_through_the_cli(
    cli: typer.Typer, trained: dict[str, object], sp500: object, tmp_path: Path
) -> None:
    runner = CliRunner()
    r = runner.invoke(
        cli, ["validate", "--symbol", "SPXTRAIN", "--timeframe", "D1", "--folds", "2", "--local", "--json"]
    )
    assert r.exit_code == 0, r.output
    body = json.loads(r.output.strip().splitlines()[-1])
    assert body["gate"] in ("passed", "failed")
    assert body["report"]["gate"]["gate"] == body["gate"]
    assert body["report"]["n_folds"] == 2 and body["reasons"]

    r = runner.invoke(cli, ["models", "show", "--symbol", "SPXTRAIN", "--timeframe", "D1"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert f"gate {body['gate']}" in out and "win rate above 55 %" in out and "accuracy above 65 %" in out

    md = tmp_path / "QUALITY.md"
    r = runner.invoke(cli, ["report", "--symbol", "SPXTRAIN", "--timeframe", "D1", "--out", str(md)])
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert "## Walk-forward folds (LSTM)" in text and "gradient boosting" in text and "## Business targets" in text
    assert (tmp_path / "img" / "equity-spxtrain-d1.png").read_bytes()[:4] == b"\x89PNG"

    signals = tmp_path / "signals.csv"
    ts = sp500.ts[-200:]  # type: ignore[attr-defined]
    signals.write_text(
        "ts,signal\n" + "\n".join(f"{int(t)},{'BUY' if i % 20 < 10 else 'SELL'}" for i, t in enumerate(ts))
    )
    png = tmp_path / "equity.png"
    r = runner.invoke(
        cli,
        [
            "backtest",
            "--symbol",
            "SPXTRAIN",
            "--timeframe",
            "D1",
            "--signals",
            str(signals),
            "--cost-bps",
            "2",
            "--plot",
            str(png),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    bt = json.loads(r.output.strip().splitlines()[-1])
    assert bt["metrics"]["trades"] == len(bt["trades"]) >= 9  # a flip every 10 bars
    assert all(t["entry_ts"] < t["exit_ts"] for t in bt["trades"])
    assert png.read_bytes()[:4] == b"\x89PNG"

    signals.write_text("ts,signal\n2018-12-27,BUY\n2018-12-28,LONG\n")
    r = runner.invoke(cli, ["backtest", "--symbol", "SPXTRAIN", "--timeframe", "D1", "--signals", str(signals)])
    assert r.exit_code == 2
    assert "line 3" in " ".join(r.output.split())
