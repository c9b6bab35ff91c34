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
