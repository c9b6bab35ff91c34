from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import typer

from shared.cli import read_bars_csv
from shared.logging import JsonFormatter, request_id_var


def test_csv_headers_are_case_insensitive_and_in_any_order(tmp_path: Path) -> None:
    p = tmp_path / "bars.csv"
    p.write_text("Volume,TS,Open,HIGH,low,Close\n10,2024-01-01T00:00:00Z,1,2,0.5,1.5\n20,1704070800,1.5,2,1,1.2\n")
    rows = read_bars_csv(p)
    assert rows == [
        {"ts": "2024-01-01T00:00:00Z", "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5, "volume": 10.0},
        {"ts": 1704070800, "open": 1.5, "high": 2.0, "low": 1.0, "close": 1.2, "volume": 20.0},
    ]


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bars.csv"
    p.write_text("ts,open,high,low,close,volume\n2024-01-01T00:00:00Z,1,2,x,1.5,10\n")
    with pytest.raises(typer.BadParameter, match="line 2"):
        read_bars_csv(p)
    p.write_text("ts,open,high,low,close\n")
    with pytest.raises(typer.BadParameter, match="missing column"):
        read_bars_csv(p)


def test_log_lines_are_json_with_the_request_id() -> None:
    fmt = JsonFormatter("indicators")
    token = request_id_var.set("rid-1")
    try:
        record = logging.makeLogRecord({"msg": "hello %s", "args": ("x",), "levelname": "INFO", "extra_field": 3})
        doc = json.loads(fmt.format(record))
    finally:
        request_id_var.reset(token)
    assert doc["msg"] == "hello x"
    assert doc["request_id"] == "rid-1"
    assert doc["service"] == "indicators"
    assert doc["extra_field"] == 3


def test_import_bars_checks_the_whole_file_before_writing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from shared.cli import app

    p = tmp_path / "bars.csv"
    p.write_text(
        "ts,open,high,low,close,volume\n2024-01-01T00:00:00Z,1,2,0.5,1.5,10\n2024-01-01T01:00:00Z,1,2,0.5,nan,10\n"
    )
    # nothing listens on this URL: the file is refused before any request
    result = CliRunner().invoke(
        app, ["import-bars", str(p), "--symbol", "CSV", "--timeframe", "H1", "--url", "http://127.0.0.1:9"]
    )
    assert result.exit_code == 1
    output = " ".join(result.output.split())  # rich wraps lines
    assert "nothing imported" in output
    assert "line 3: close is nan" in output


def test_aicash_up_offers_exactly_the_options_of_make_up() -> None:
    from shared.cli import app
    from shared.devstack import build_parser

    make_up = {o for a in build_parser()._actions for o in a.option_strings if o not in ("-h", "--help")}
    up = typer.main.get_command(app).commands["up"]  # type: ignore[attr-defined]
    aicash_up = {o for p in up.params for o in p.opts if o.startswith("--")}
    assert aicash_up == make_up


def test_aicash_up_passes_its_options_to_make_ups_program(monkeypatch: pytest.MonkeyPatch) -> None:
    # `aicash up` used to hand sys.argv (["aicash", "up", ...]) to argparse, which refused "up".
    from typer.testing import CliRunner

    import shared.devstack
    from shared.cli import app

    seen: list[object] = []
    monkeypatch.setattr(
        shared.devstack, "main", lambda argv: seen.append(shared.devstack.build_parser().parse_args(argv))
    )
    result = CliRunner().invoke(app, ["up", "--smoke", "--epochs", "3", "--no-train"])
    assert result.exit_code == 0, result.output
    (args,) = seen
    assert args.smoke and args.no_train and args.epochs == 3 and args.verdict_timeout == 900.0


def test_import_bars_refused_at_the_first_chunk_says_nothing_was_imported(tmp_path: Path, database_url: str) -> None:
    from typer.testing import CliRunner

    from shared.cli import app
    from tests.support.keys import API_KEYS
    from tests.support.net import free_port, start_uvicorn, stop

    p = tmp_path / "bars.csv"
    p.write_text("ts,open,high,low,close,volume\n2024-01-01T00:00:00Z,1,2,0.5,1.5,10\n")
    port = free_port()
    proc = start_uvicorn(
        "services.indicators.main:app", port, {"DATABASE_URL": database_url, "API_KEYS": API_KEYS}, tmp_path / "log"
    )
    try:
        result = CliRunner(env={"AICASH_API_KEY": "not-a-key-of-this-deployment"}).invoke(
            app, ["import-bars", str(p), "--symbol", "CSV", "--timeframe", "H1", "--url", f"http://127.0.0.1:{port}"]
        )
    finally:
        stop(proc)
    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "401" in output and "nothing was imported" in output
    assert "lines 2 to 1" not in output
