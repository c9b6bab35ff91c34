"""`aicash train`, `validate`, `backtest`, `optimize-weights`, `report`, `models list|show|promote|rollback`,
`rollout show|set` and `audit`; shared/cli.py calls `register(app)`.

The job commands create the job row and send the Celery message directly (the same code path as
POST /v1/jobs, without the HTTP hop: the CLI runs where DATABASE_URL and the broker are reachable).
`--local` runs the job in this process instead, without a broker; `backtest` always runs in this process
(it takes well under a second) and stores its result like the worker would. The lifecycle commands call
services.trainer.lifecycle on the database too (the code behind the API's routes), and audit as `cli:<user>`.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.trainer import repository as repo
from services.trainer.schemas import Job, ModelVersion
from services.trainer.settings import get_trainer_settings
from shared.db import require_database_url
from shared.errors import AppError
from shared.timeframes import Timeframe, parse_timeframe

console = Console()


async def _connect() -> asyncpg.Connection:
    return await asyncpg.connect(
        require_database_url(get_trainer_settings()), timeout=10, server_settings={"application_name": "aicash-cli"}
    )


async def _with_conn(fn: Any) -> Any:
    conn = await _connect()
    try:
        return await fn(conn)
    finally:
        await conn.close()


def _get_job(job_id: str) -> Job:
    job = asyncio.run(_with_conn(lambda c: repo.get_job(c, job_id)))
    assert job is not None
    return job  # type: ignore[no-any-return]


def _follow_quietly(job_id: str, worker: threading.Thread | None = None, poll_s: float = 0.5) -> Job:
    """Wait for a job without epochs (validation, weights, backtest), with a progress bar of its progress."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=console, transient=True
    ) as progress:
        bar = progress.add_task("queued", total=1.0)
        while True:
            job = _get_job(job_id)
            progress.update(bar, description=f"{job.kind} {job.status}", completed=job.progress)
            if job.status in ("succeeded", "failed") or (worker is not None and not worker.is_alive()):
                return _get_job(job_id)
            time.sleep(poll_s)


def _run_here(job_id: str, follow: Any) -> Job:
    """Run a job in this process (no broker: an error worth retrying fails it) while `follow` watches it."""
    from services.trainer.jobs import run_job

    errors: list[BaseException] = []

    def work() -> None:
        try:
            run_job(job_id, settings=get_trainer_settings(), retry=False)
        except Exception as exc:  # reported below (e.g. PostgreSQL unreachable)
            errors.append(exc)

    thread = threading.Thread(target=work, name=f"job-{job_id[:6]}")
    thread.start()
    follow(thread)
    thread.join()
    if errors:
        console.print(f"[red]job {job_id} not finished[/]: {type(errors[0]).__name__}: {errors[0]}")
        raise typer.Exit(1)
    return _get_job(job_id)


def _actor() -> str:
    """Who the audit trail names for a CLI action: the CLI reaches PostgreSQL directly, without an API key, so
    the operating-system user it runs as."""
    return f"cli:{getpass.getuser()}"


def _submit(kind: str, symbol: str, tf: Timeframe, params: dict[str, Any], *, local: bool) -> str:
    """Create the job (and send it unless local); a refused job exits 2 with the reason."""
    from services.trainer.celery_app import create_celery
    from services.trainer.service import create_job, enqueue_job

    settings = get_trainer_settings()
    actor = _actor()
    try:
        if local:
            return str(
                asyncio.run(_with_conn(lambda c: create_job(c, kind, symbol, tf, params, settings, actor=actor)))
            )
        app = create_celery(settings)
        try:
            return str(
                asyncio.run(_with_conn(lambda c: enqueue_job(c, kind, symbol, tf, params, settings, app, actor=actor)))
            )
        finally:
            app.close()
    except AppError as exc:
        console.print(f"[red]{exc.code}[/]: {exc.message}")
        raise typer.Exit(2) from None


def _finish(job_id: str, local: bool) -> Job:
    if local:
        job = _run_here(job_id, lambda thread: _follow_quietly(job_id, worker=thread))
    else:
        job = _follow_quietly(job_id)
    if job.status != "succeeded":
        console.print(f"[red]job {job.id} {job.status}[/]: {job.error or ''}")
        raise typer.Exit(1)
    return job


def _follow(job_id: str, epochs: int, worker: threading.Thread | None = None, poll_s: float = 0.5) -> Job:
    """Progress bar per epoch until the job ends (or the in-process worker thread returns)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} epochs"),
        TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("queued", total=epochs, losses="")
        while True:
            job = _get_job(job_id)
            last = job.history[-1] if job.history else None
            losses = (
                f"loss {last.loss:.4f} val_loss {last.val_loss:.4f}"
                if last and last.loss is not None and last.val_loss is not None
                else ""
            )
            progress.update(bar, description=job.status, completed=len(job.history), losses=losses)
            if job.status in ("succeeded", "failed") or (worker is not None and not worker.is_alive()):
                return _get_job(job_id)
            time.sleep(poll_s)


def _report(job: Job) -> None:
    if job.status == "succeeded" and job.result:
        r = job.result
        m = r.get("metrics", {})
        console.print(
            f"[green]registered[/] {r['symbol']}/{r['timeframe']}/{r['version']} as [bold]{r['status']}[/]: "
            f"test accuracy {m.get('accuracy', float('nan')):.3f} (majority baseline "
            f"{m.get('baseline_accuracy', float('nan')):.3f}), macro-F1 {m.get('macro_f1', float('nan')):.3f}, "
            f"log-loss {m.get('log_loss', float('nan')):.4f}"
        )
    else:
        console.print(f"[red]job {job.id} {job.status}[/]: {job.error or ''}")


def train(
    symbol: Annotated[str, typer.Option(help="symbol with stored bars, e.g. EURUSD")],
    timeframe: Annotated[str, typer.Option(help="M1 ... W1; resampled from a lower stored timeframe if needed")],
    epochs: Annotated[int | None, typer.Option(min=1, help="maximum epochs (early stopping may end sooner)")] = None,
    params: Annotated[
        str | None, typer.Option(help="more hyperparameters as JSON, e.g. '{\"lstm_units\": [32, 16]}'")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job with a progress bar per epoch")] = False,
    local: Annotated[bool, typer.Option("--local", help="train in this process (no broker needed)")] = False,
) -> None:
    """Train an LSTM model for one series and register it (then, on the worker, validate it)."""
    from services.trainer.hyperparameters import TrainConfig

    tf = parse_timeframe(timeframe)
    overrides: dict[str, Any] = json.loads(params) if params else {}
    if epochs is not None:
        overrides["epochs"] = epochs
    max_epochs = int(overrides.get("epochs", TrainConfig().epochs))
    job_id = _submit("train", symbol, tf, overrides, local=local)
    console.print(f"job {job_id}")
    if local:
        job = _run_here(job_id, lambda thread: _follow(job_id, max_epochs, worker=thread))
    elif wait:
        job = _follow(job_id, max_epochs)
    else:
        return
    _report(job)
    if job.status != "succeeded":
        raise typer.Exit(1)


def list_models(
    symbol: Annotated[str | None, typer.Option(help="only this symbol")] = None,
    timeframe: Annotated[str | None, typer.Option(help="only this timeframe")] = None,
    status: Annotated[str | None, typer.Option(help="candidate, production, archived or failed")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """List the model registry, newest first per series."""
    versions = asyncio.run(_with_conn(lambda c: repo.list_versions(c, symbol, timeframe, status)))
    if as_json:
        for v in versions:
            console.print_json(v.model_dump_json())
        return
    table = Table(
        "id", "symbol", "tf", "version", "status", "gate", "accuracy", "baseline", "macro-F1", "log-loss", "created"
    )
    for v in versions:
        m = v.metrics

        def f(key: str, m: dict[str, Any] = m) -> str:
            return f"{m[key]:.3f}" if isinstance(m.get(key), float) else "-"

        table.add_row(
            str(v.id),
            v.symbol,
            v.timeframe,
            v.version,
            v.status,
            _gate(v),
            f("accuracy"),
            f("baseline_accuracy"),
            f("macro_f1"),
            f("log_loss"),
            v.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


def _gate(v: ModelVersion) -> str:
    colour = {"passed": "green", "failed": "red"}.get(v.quality.gate, "yellow")
    return f"[{colour}]{v.quality.gate}[/]"


def _find(symbol: str, timeframe: str, version: str | None) -> ModelVersion:
    async def go(c: asyncpg.Connection) -> ModelVersion | None:
        if version is None:
            return await repo.production_version(c, symbol, timeframe) or await repo.newest_version(
                c, symbol, timeframe
            )
        return await repo.find_version(c, symbol, timeframe, version)

    found: ModelVersion | None = asyncio.run(_with_conn(go))
    if found is None:
        console.print(
            f"[red]not_found[/]: no model version {version or ''} for {symbol} {timeframe}".replace("  ", " ")
        )
        raise typer.Exit(2)
    return found


def show_model(
    symbol: Annotated[str, typer.Option(help="symbol")],
    timeframe: Annotated[str, typer.Option(help="timeframe")],
    version: Annotated[str | None, typer.Option("--model", help="version (default: production, else newest)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of tables")] = False,
) -> None:
    """One version: its gate verdict and reasons, and the design's business targets, pass or fail each."""
    from services.trainer.report import render_targets

    v = _find(symbol, parse_timeframe(timeframe).value, version)
    latest = asyncio.run(_with_conn(lambda c: repo.latest_validation(c, v.id)))
    targets = (latest or {}).get("report", {}).get("business_targets", [])
    if as_json:
        console.print_json(json.dumps({"version": v.model_dump(mode="json"), "business_targets": targets}))
        return
    console.print(f"{v.symbol}/{v.timeframe}/{v.version} (id {v.id}): {v.status}, gate {_gate(v)}")
    for reason in v.quality.reasons:
        console.print(f"  - {reason}")
    if targets:
        console.print(render_targets(targets))
    else:
        console.print("business targets: not validated yet (aicash validate)")


def validate(
    symbol: Annotated[str, typer.Option(help="symbol with stored bars")],
    timeframe: Annotated[str, typer.Option(help="M1 ... W1")],
    folds: Annotated[int, typer.Option(min=2, max=20, help="expanding-window folds")] = 5,
    model: Annotated[str | None, typer.Option("--model", help="version to validate (default: the newest)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the whole report as JSON")] = False,
    local: Annotated[bool, typer.Option("--local", help="run in this process (no broker needed)")] = False,
) -> None:
    """Walk-forward validation of a model's recipe against baselines; applies the promotion gate."""
    from services.trainer.report import render_validation

    tf = parse_timeframe(timeframe)
    params: dict[str, Any] = {"folds": folds}
    if model is not None:
        params["model_version"] = model
    job_id = _submit("validate", symbol, tf, params, local=local)
    if not as_json:
        console.print(f"job {job_id}")
    job = _finish(job_id, local)
    assert job.result is not None
    stored = asyncio.run(_with_conn(lambda c: repo.get_validation(c, int(job.result["validation_id"]))))
    assert stored is not None
    if as_json:
        typer.echo(json.dumps({"validation_id": stored["id"], **job.result, "report": stored["report"]}, default=str))
        return
    console.print(render_validation(stored["report"]))
    verdict = job.result.get("gate")
    colour = "green" if verdict == "passed" else "red"
    placed = job.result.get("rollout")
    note = (
        " (promoted to production)"
        if job.result.get("promoted")
        else f" (now the rollout's {placed} candidate: aicash rollout show)"
        if placed in ("canary", "manual")
        else ""
    )
    console.print(f"gate: [{colour}]{verdict}[/]" + note)
    for reason in job.result.get("reasons", []):
        console.print(f"  - {reason}")


def backtest(
    symbol: Annotated[str, typer.Option(help="symbol with stored bars")],
    timeframe: Annotated[str, typer.Option(help="M1 ... W1")],
    model: Annotated[str | None, typer.Option("--model", help="version whose signals to follow")] = None,
    signals: Annotated[
        Path | None, typer.Option("--signals", exists=True, dir_okay=False, help="CSV of ts,signal rows")
    ] = None,
    long_only: Annotated[bool, typer.Option("--long-only", help="SELL goes flat instead of short")] = False,
    cost_bps: Annotated[float, typer.Option(min=0, max=1000, help="total round-trip cost in basis points")] = 0.0,
    spread_bps: Annotated[float, typer.Option(min=0, max=1000)] = 0.0,
    commission_bps: Annotated[float, typer.Option(min=0, max=1000)] = 0.0,
    slippage_bps: Annotated[float, typer.Option(min=0, max=1000)] = 0.0,
    max_position: Annotated[float | None, typer.Option(help="cap on |position|, fraction of equity (0, 1]")] = None,
    stop_atr: Annotated[float | None, typer.Option(help="ATR stop-loss multiple")] = None,
    take_profit_atr: Annotated[float | None, typer.Option(help="ATR take-profit multiple")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", dir_okay=False, help="write the equity curve PNG")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="metrics and the trade list as JSON")] = False,
) -> None:
    """Backtest a model's signals (default: production) on bars it never trained on, or signals from a CSV."""
    from services.trainer.report import render_metrics, stored_equity_png

    if model is not None and signals is not None:
        console.print("[red]validation_failed[/]: give --model or --signals, not both")
        raise typer.Exit(2)
    params: dict[str, Any] = {
        "long_only": long_only,
        "cost_bps": cost_bps,
        "spread_bps": spread_bps,
        "commission_bps": commission_bps,
        "slippage_bps": slippage_bps,
        "stop_atr": stop_atr,
        "take_profit_atr": take_profit_atr,
    }
    if max_position is not None:
        params["max_position_fraction"] = max_position
    if model is not None:
        params["model_version"] = model
    if signals is not None:
        params["signals_csv"] = signals.read_text()
    job = _finish(_submit("backtest", symbol, parse_timeframe(timeframe), params, local=True), True)
    assert job.result is not None
    stored = asyncio.run(_with_conn(lambda c: repo.get_backtest(c, int(job.result["backtest_id"]))))
    assert stored is not None
    if plot is not None:
        plot.write_bytes(stored_equity_png(stored, f"{symbol} {timeframe} backtest"))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "backtest_id": stored["id"],
                    "params": stored["params"],
                    "metrics": stored["metrics"],
                    "trades": stored["trades"],
                },
                default=str,
            )
        )
        return
    console.print(render_metrics(stored["metrics"], title=f"backtest {stored['id']} of {symbol} {timeframe}"))
    if plot is not None:
        console.print(f"equity curve: {plot}")


def optimize_weights(
    symbol: Annotated[str, typer.Option(help="symbol")],
    timeframe: Annotated[str, typer.Option(help="timeframe")],
    model: Annotated[str | None, typer.Option("--model", help="version (default: production)")] = None,
    local: Annotated[bool, typer.Option("--local", help="run in this process (no broker needed)")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", dir_okay=False, help="write the weights PNG")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the stored weights as JSON")] = False,
) -> None:
    """SHAP indicator weights of a model (17 weights, >= 0, summing to 1); the predictor serves them."""
    from services.trainer.report import render_weights

    params: dict[str, Any] = {"model_version": model} if model else {}
    job = _finish(_submit("optimize_weights", symbol, parse_timeframe(timeframe), params, local=local), local)
    assert job.result is not None
    stored = asyncio.run(_with_conn(lambda c: repo.get_weights(c, int(job.result["weights_id"]))))
    assert stored is not None
    if plot is not None:
        from services.trainer.report import plot_stored_weights

        plot.write_bytes(plot_stored_weights(stored))
    if as_json:
        typer.echo(json.dumps(stored, default=str))
        return
    console.print(render_weights(stored))


def report(
    symbol: Annotated[str, typer.Option(help="symbol")],
    timeframe: Annotated[str, typer.Option(help="timeframe")],
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="Markdown file to write")],
    model: Annotated[str | None, typer.Option("--model", help="version (default: production, else newest)")] = None,
) -> None:
    """Write the model-quality report (walk-forward table, baselines, business targets, equity curve PNG) of a
    version's latest validation, as Markdown with the PNG beside it."""
    from services.trainer.report import write_report

    v = _find(symbol, parse_timeframe(timeframe).value, model)
    latest = asyncio.run(_with_conn(lambda c: repo.latest_validation(c, v.id)))
    if latest is None:
        console.print(f"[red]not_found[/]: {v.version} has no validation; run aicash validate first")
        raise typer.Exit(2)
    written = write_report(v, latest, out)
    console.print(f"wrote {', '.join(str(p) for p in written)}")


# --- the lifecycle: promote, rollback, rollouts, the audit trail -----------------------------------------------


def _lifecycle_call(fn: Any) -> Any:
    """Run one lifecycle change on its own connection; a refused one (404, 409, 422) exits 2 with the reason."""
    try:
        return asyncio.run(_with_conn(fn))
    except AppError as exc:
        console.print(f"[red]{exc.code}[/]: {exc.message}")
        raise typer.Exit(2) from None


def _print_version(v: ModelVersion, verb: str, as_json: bool) -> None:
    if as_json:
        typer.echo(v.model_dump_json())
        return
    console.print(f"{verb} {v.symbol}/{v.timeframe}/{v.version} (id {v.id}): now {v.status}, gate {_gate(v)}")


def promote_model(
    model_id: Annotated[int, typer.Argument(help="registry id of the version (aicash models list)")],
    reason: Annotated[str | None, typer.Option(help="why; stored in the audit row")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the promoted version as JSON")] = False,
) -> None:
    """Make a version production (the previous one is archived; a rollback can return to it)."""
    from services.trainer import lifecycle

    v = _lifecycle_call(lambda c: lifecycle.promote_by_admin(c, model_id, actor=_actor(), reason=reason))
    _print_version(v, "promoted", as_json)


def rollback_model(
    symbol: Annotated[str, typer.Option(help="symbol")],
    timeframe: Annotated[str, typer.Option(help="timeframe")],
    reason: Annotated[str | None, typer.Option(help="why; stored in the audit row")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the version that now serves, as JSON")] = False,
) -> None:
    """Put the previous production version back into production (the current one is marked rolled back)."""
    from services.trainer import lifecycle

    tf = parse_timeframe(timeframe).value
    v = _lifecycle_call(
        lambda c: lifecycle.rollback(c, symbol, tf, actor=_actor(), reason=reason or "rolled back by an admin")
    )
    _print_version(v, "rolled back to", as_json)


async def _rollout_view(c: asyncpg.Connection, symbol: str, tf: str, rollout: Any) -> dict[str, Any]:
    production = await repo.production_version(c, symbol, tf)
    candidate = await repo.get_version(c, rollout.candidate_model_id) if rollout.candidate_model_id else None
    return {
        **rollout.model_dump(mode="json"),
        "production_model_id": production.id if production else None,
        "production_version": production.version if production else None,
        "candidate_version": candidate.version if candidate else None,
    }


def _print_rollout(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(view))
        return
    table = Table("field", "value", title=f"rollout of {view['symbol']} {view['timeframe']}")
    production = (
        f"{view['production_version']} (id {view['production_model_id']})" if view["production_version"] else "-"
    )
    candidate = f"{view['candidate_version']} (id {view['candidate_model_id']})" if view["candidate_model_id"] else "-"
    rows = {
        "policy": view["policy"],
        "production": production,
        "candidate": candidate,
        "candidate traffic %": f"{view['candidate_traffic_percent']:g}",
        "test group": ", ".join(view["test_group_user_ids"]) or "-",
        "rollout symbols": ", ".join(view["rollout_symbols"]) or "-",
        "shadow": "on" if view["shadow"] else "off",
        "updated": f"{view['updated_at'] or 'never (defaults)'} by {view['updated_by'] or '-'}",
    }
    for k, v in rows.items():
        table.add_row(k, str(v))
    console.print(table)


def show_rollout(
    symbol: Annotated[str, typer.Option(help="symbol")],
    timeframe: Annotated[str, typer.Option(help="timeframe")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False,
) -> None:
    """A series' rollout: policy, production and candidate, traffic, test group, symbols, shadow."""
    from services.trainer import lifecycle

    tf = parse_timeframe(timeframe).value
    settings = get_trainer_settings()

    async def go(c: asyncpg.Connection) -> dict[str, Any]:
        return await _rollout_view(c, symbol, tf, await lifecycle.get_rollout(c, symbol, tf, settings))

    _print_rollout(_lifecycle_call(go), as_json)


def _csv_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def set_rollout(
    symbol: Annotated[str, typer.Option(help="symbol")],
    timeframe: Annotated[str, typer.Option(help="timeframe")],
    policy: Annotated[str | None, typer.Option(help="direct, canary or manual")] = None,
    candidate: Annotated[
        str | None, typer.Option(help="registry id of a candidate version of this series; 'none' clears it")
    ] = None,
    traffic: Annotated[float | None, typer.Option(help="candidate traffic percent, 0..100")] = None,
    test_users: Annotated[str | None, typer.Option(help="comma-separated user ids ('' clears)")] = None,
    rollout_symbols: Annotated[str | None, typer.Option(help="comma-separated symbols ('' clears)")] = None,
    shadow: Annotated[bool | None, typer.Option("--shadow/--no-shadow", help="candidate scores in shadow")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the rollout after the change, as JSON")] = False,
) -> None:
    """Change a series' rollout; options left out keep their value."""
    from services.trainer import lifecycle

    tf = parse_timeframe(timeframe).value
    changes: dict[str, Any] = {}
    if policy is not None:
        changes["policy"] = policy
    if candidate is not None:
        if candidate.strip().lower() == "none":
            changes["candidate_model_id"] = None
        elif candidate.strip().isdigit():
            changes["candidate_model_id"] = int(candidate)
        else:
            console.print(f"[red]validation_error[/]: --candidate {candidate!r}: give a registry id or 'none'")
            raise typer.Exit(2)
    if traffic is not None:
        changes["candidate_traffic_percent"] = traffic
    if test_users is not None:
        changes["test_group_user_ids"] = _csv_list(test_users)
    if rollout_symbols is not None:
        changes["rollout_symbols"] = _csv_list(rollout_symbols)
    if shadow is not None:
        changes["shadow"] = shadow
    if not changes:
        console.print("[red]validation_error[/]: nothing to change; give at least one option (see --help)")
        raise typer.Exit(2)
    settings = get_trainer_settings()

    async def go(c: asyncpg.Connection) -> dict[str, Any]:
        r = await lifecycle.update_rollout(c, symbol, tf, changes, actor=_actor(), settings=settings)
        return await _rollout_view(c, symbol, tf, r)

    _print_rollout(_lifecycle_call(go), as_json)


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        console.print(f"[red]validation_error[/]: --{name} {value!r} is not an ISO 8601 time, e.g. 2026-12-01T10:00Z")
        raise typer.Exit(2) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def audit_log(
    symbol: Annotated[str | None, typer.Option(help="only this symbol")] = None,
    timeframe: Annotated[str | None, typer.Option(help="only this timeframe")] = None,
    action: Annotated[str | None, typer.Option(help="e.g. model.promote, rollout.update, job.create")] = None,
    actor: Annotated[str | None, typer.Option(help="an API key id, system, or cli:<user>")] = None,
    since: Annotated[str | None, typer.Option(help="rows at or after this ISO 8601 time (UTC if no zone)")] = None,
    until: Annotated[str | None, typer.Option(help="rows before this ISO 8601 time")] = None,
    before_id: Annotated[int | None, typer.Option(min=1, help="only rows with a smaller id (paging)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="rows at most")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="the rows as one JSON array")] = False,
) -> None:
    """The audit trail, newest first: who changed what, before and after, and why."""
    tf = parse_timeframe(timeframe).value if timeframe else None
    start, end = _when(since, "since"), _when(until, "until")
    rows = _lifecycle_call(
        lambda c: repo.list_audit(
            c,
            symbol=symbol,
            timeframe=tf,
            action=action,
            actor=actor,
            since=start,
            until=end,
            before_id=before_id,
            limit=limit,
        )
    )
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in rows]))
        return
    table = Table("id", "at", "actor", "action", "series", "target", "evidence")
    for r in rows:
        evidence = json.dumps(r.evidence, default=str) if r.evidence is not None else "-"
        series = f"{r.symbol} {r.timeframe}" if r.symbol else "-"
        table.add_row(
            str(r.id),
            r.at.strftime("%Y-%m-%d %H:%M:%S"),
            r.actor,
            r.action,
            series,
            r.target or "-",
            evidence[:80] + ("..." if len(evidence) > 80 else ""),
        )
    console.print(table)
    if len(rows) == limit:
        console.print(f"older rows: --before-id {rows[-1].id}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("validate")(validate)
    app.command("backtest")(backtest)
    app.command("optimize-weights")(optimize_weights)
    app.command("report")(report)
    models = typer.Typer(help="The model registry.", no_args_is_help=True)
    models.command("list")(list_models)
    models.command("show")(show_model)
    models.command("promote")(promote_model)
    models.command("rollback")(rollback_model)
    app.add_typer(models, name="models")
    rollout = typer.Typer(help="Rollouts: who gets the candidate of a series.", no_args_is_help=True)
    rollout.command("show")(show_rollout)
    rollout.command("set")(set_rollout)
    app.add_typer(rollout, name="rollout")
    app.command("audit")(audit_log)
