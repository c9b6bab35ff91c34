"""The predictor as deployed: a uvicorn process, the CLI against it, and no TensorFlow in its memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from typer import Typer
from typer.testing import CliRunner

from services.predictor import cli
from tests.support import REPO
from tests.support.keys import READ_KEY
from tests.support.net import free_port, start_uvicorn, stop
from tests.support.predictor import SYMBOL, predictor_env


@pytest.fixture(scope="module")
def predictor_url(
    database_url: str,
    redis_url: str,
    indicators_url: str,
    store_url: str,
    models: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("predictor") / "predictor.log"
    proc = start_uvicorn(
        "services.predictor.main:app", port, predictor_env(database_url, redis_url, indicators_url, store_url), log
    )
    yield f"http://127.0.0.1:{port}"
    stop(proc)


def test_cli_prints_the_signal_as_a_table(predictor_url: str) -> None:
    app = Typer()
    cli.register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps `predict` a subcommand, as in shared/cli.py
        pass

    env = {"PREDICTOR_URL": predictor_url, "AICASH_API_KEY": READ_KEY, "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["predict", "--symbol", SYMBOL, "--timeframe", "H1"], env=env)
    assert result.exit_code == 0, result.output
    assert f"{SYMBOL} H1" in result.output and "model version" in result.output and "stop loss" in result.output
    missing = CliRunner().invoke(app, ["predict", "--symbol", "PRED2", "--timeframe", "H1"], env=env)
    assert missing.exit_code == 1 and "404" in missing.output


SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import httpx
    from services.predictor.main import create_app
    from services.predictor.settings import PredictorSettings

    async def main():
        app = create_app(PredictorSettings())
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                         headers={"X-API-Key": sys.argv[1]}) as c:
                r = await c.post("/v1/predictions", json={"symbol": sys.argv[2], "timeframe": "H1"},
                                 headers={"Cache-Control": "no-cache"})
                assert r.status_code == 200, r.text
        bad = sorted(m for m in ("tensorflow", "keras", "pandas_ta", "talib", "tf2onnx") if m in sys.modules)
        print("FORBIDDEN=" + ",".join(bad))

    asyncio.run(main())
    """
)


def test_serving_never_imports_tensorflow(
    database_url: str, redis_url: str, indicators_url: str, store_url: str, models: dict[str, str]
) -> None:
    env = {**os.environ, **predictor_env(database_url, redis_url, indicators_url, store_url)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, READ_KEY, SYMBOL],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FORBIDDEN=\n" in out.stdout, out.stdout
