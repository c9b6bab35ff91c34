"""`aicash predict`: ask the running predictor for a signal and print it as a table."""

from __future__ import annotations

import os
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def render(body: dict[str, Any]) -> Table:
    table = Table(title=f"{body['symbol']} {body['timeframe']}: {body['signal']} ({body['confidence']:.1%})")
    table.add_column("field")
    table.add_column("value")
    rows: list[tuple[str, Any]] = [
        ("signal", body["signal"]),
        ("confidence", body["confidence"]),
        *((f"p({c})", body["probabilities"][c]) for c in ("BUY", "HOLD", "SELL")),
        ("model version", body["model_version"]),
        ("variant", body["variant"]),
        ("consensus", f"{body['consensus']['signal']} (agreement {body['consensus']['agreement']:.0%})"),
        ("indicator score", body["indicator_score"]),
        ("position (of equity)", body["risk"]["position_fraction"]),
        ("stop loss", body["risk"]["stop_loss"]),
        ("take profit", body["risk"]["take_profit"]),
        ("bar", body["bar_ts"]),
        ("cached", body["cached"]),
        ("prediction id", body["prediction_id"]),
        # The promotion gate's verdict on the model that answered: an unvetted model says so.
        ("model quality", _quality(body.get("quality"))),
    ]
    for tf, s in body["timeframes"].items():
        rows.append(
            (f"timeframe {tf}", f"{s['signal'] or s['status']} {_fmt(s['confidence'])} {_fmt(s['model_version'])}")
        )
    for name, value in rows:
        table.add_row(name, _fmt(value))
    return table


def _quality(q: dict[str, Any] | None) -> str:
    if not q:
        return "-"
    reasons = "; ".join(q.get("reasons") or [])
    return f"{q['gate']}" + (f" ({reasons})" if reasons else "")


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        symbol: Annotated[str, typer.Option(help="e.g. EURUSD")],
        timeframe: Annotated[str, typer.Option(help="M1 M5 M15 M30 H1 H4 D1 W1")],
        timeframes: Annotated[list[str] | None, typer.Option("--timeframes", help="extra timeframes")] = None,
        url: Annotated[str, typer.Option(envvar="PREDICTOR_URL")] = "http://127.0.0.1:8080",
        timeout: Annotated[float, typer.Option(help="seconds")] = 10.0,
    ) -> None:
        """Signal of a series from its stored bars, by the running predictor (key from AICASH_API_KEY)."""
        key = os.environ.get("AICASH_API_KEY", "")
        body: dict[str, Any] = {"symbol": symbol, "timeframe": timeframe}
        if timeframes:
            body["timeframes"] = timeframes
        console = Console()
        try:
            r = httpx.post(f"{url.rstrip('/')}/v1/predictions", json=body, headers={"X-API-Key": key}, timeout=timeout)
        except httpx.HTTPError as exc:
            console.print(f"[red]predictor at {url} is unreachable: {exc}[/red]")
            raise typer.Exit(2) from None
        if r.status_code != 200:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            console.print(f"[red]{r.status_code}: {detail}[/red]")
            raise typer.Exit(1)
        console.print(render(r.json()))
