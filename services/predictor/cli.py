"""`aicash predict` and `aicash performance`: ask the running predictor and print its answer as a table."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from services.predictor import watch


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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_performance(body: dict[str, Any]) -> list[Table]:
    """GET /v1/performance as tables: one row per model version and variant, then each one's calibration."""
    since = f" since {body['since']}" if body.get("since") else ""
    summary = Table(title=f"{body['symbol']} {body['timeframe']}: live performance{since}")
    for name in (
        "version",
        "variant",
        "predictions",
        "settled bars",
        "hit rate (95 % CI)",
        "Brier",
        "log loss",
        "trades",
        "profit factor",
        "return after costs",
        "external outcomes (pnl)",
    ):
        summary.add_column(name)
    tables = [summary]
    for v in body["versions"]:
        ci = (
            f"{_pct(v['hit_rate'])} ({_pct(v['hit_rate_ci_low'])}-{_pct(v['hit_rate_ci_high'])})"
            if v["hit_rate"] is not None
            else "-"
        )
        summary.add_row(
            v["model_version"],
            v["variant"],
            str(v["predictions"]),
            str(v["settled_bars"]),
            ci,
            _fmt(v["brier"]),
            _fmt(v["log_loss"]),
            str(v["trades"]),
            _fmt(v["profit_factor"]),
            _fmt(v["return_after_costs"]),
            f"{v['external_outcomes']} ({_fmt(v['external_pnl'])})",
        )
        if v["settled_bars"]:
            cal = Table(title=f"calibration of {v['model_version']} ({v['variant']})")
            for name in ("confidence", "bars", "mean confidence", "right"):
                cal.add_column(name)
            for b in v["calibration"]:
                cal.add_row(
                    f"{b['confidence_low']:.2f}-{b['confidence_high']:.2f}",
                    str(b["bars"]),
                    _pct(b["mean_confidence"]),
                    _pct(b["hit_rate"]),
                )
            tables.append(cal)
    return tables


def _call(
    method: str,
    url: str,
    path: str,
    timeout: float,
    console: Console,
    *,
    params: dict[str, Any] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One request to the predictor with the key from AICASH_API_KEY; exit 2 when it is unreachable, 1 on an
    error answer (its detail printed)."""
    key = os.environ.get("AICASH_API_KEY", "")
    try:
        r = httpx.request(
            method, f"{url.rstrip('/')}{path}", params=params, json=body, headers={"X-API-Key": key}, timeout=timeout
        )
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
    answer: dict[str, Any] = r.json()
    return answer


def register(app: typer.Typer) -> None:
    watch.register(app)  # `aicash watch` (services/predictor/watch.py)

    @app.command("predict")
    def predict(
        symbol: Annotated[str, typer.Option(help="e.g. EURUSD")],
        timeframe: Annotated[str, typer.Option(help="M1 M5 M15 M30 H1 H4 D1 W1")],
        timeframes: Annotated[list[str] | None, typer.Option("--timeframes", help="extra timeframes")] = None,
        url: Annotated[str, typer.Option(envvar="PREDICTOR_URL")] = "http://127.0.0.1:8080",
        timeout: Annotated[float, typer.Option(help="seconds")] = 10.0,
    ) -> None:
        """Signal of a series from its stored bars, by the running predictor (key from AICASH_API_KEY)."""
        body: dict[str, Any] = {"symbol": symbol, "timeframe": timeframe}
        if timeframes:
            body["timeframes"] = timeframes
        console = Console()
        console.print(render(_call("POST", url, "/v1/predictions", timeout, console, body=body)))

    @app.command("performance")
    def performance(
        symbol: Annotated[str, typer.Option(help="e.g. EURUSD")],
        timeframe: Annotated[str, typer.Option(help="M1 M5 M15 M30 H1 H4 D1 W1")],
        since: Annotated[str | None, typer.Option(help="ISO 8601 time: only bars and predictions from then on")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON instead of tables")] = False,
        url: Annotated[str, typer.Option(envvar="PREDICTOR_URL")] = "http://127.0.0.1:8080",
        timeout: Annotated[float, typer.Option(help="seconds")] = 30.0,
    ) -> None:
        """Live performance of each model version and variant of a series from settled outcomes: hit rate with
        its 95 % interval, Brier, log loss, calibration, profit factor, return after costs (key from
        AICASH_API_KEY)."""
        console = Console()
        params = {"symbol": symbol, "timeframe": timeframe, **({"since": since} if since else {})}
        body = _call("GET", url, "/v1/performance", timeout, console, params=params)
        if as_json:
            typer.echo(json.dumps(body, indent=2))
            return
        if not body["versions"]:
            console.print(f"no predictions of {symbol} {timeframe} in the period asked for")
        for table in render_performance(body):
            console.print(table)
