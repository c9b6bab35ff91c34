"""`aicash train` and `aicash models list`; shared/cli.py calls `register(app)`.

`aicash train` creates the job row and sends the Celery message directly (the same code path as
POST /v1/jobs, without the HTTP hop: the CLI runs where DATABASE_URL and the broker are reachable).
`--local` runs the job in this process instead, without a broker.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.trainer import repository as repo
from services.trainer.schemas import Job
from services.trainer.settings import get_trainer_settings
from shared.db import require_database_url
from shared.errors import AppError
from shared.settings import get_settings
from shared.timeframes import parse_timeframe

console = Console()


async def _connect() -> asyncpg.Connection:
    return await asyncpg.connect(
        require_database_url(get_settings()), timeout=10, server_settings={"application_name": "aicash-cli"}
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
    """Train an LSTM model for one series and register it."""
    from services.trainer.config import TrainConfig
    from services.trainer.service import create_train_job, enqueue_train

    tf = parse_timeframe(timeframe)
    overrides: dict[str, Any] = json.loads(params) if params else {}
    if epochs is not None:
        overrides["epochs"] = epochs
    tsettings = get_trainer_settings()
    max_epochs = int(overrides.get("epochs", TrainConfig().epochs))
    try:
        if local:
            job_id = asyncio.run(_with_conn(lambda c: create_train_job(c, symbol, tf, overrides, tsettings)))
        else:
            job_id = asyncio.run(_with_conn(lambda c: enqueue_train(c, symbol, tf, overrides, tsettings)))
    except AppError as exc:
        console.print(f"[red]{exc.code}[/]: {exc.message}")
        raise typer.Exit(2) from None
    console.print(f"job {job_id}")
    if local:
        from services.trainer.jobs import run_job

        errors: list[BaseException] = []

        def work() -> None:
            try:
                # No broker to retry through: an error worth retrying fails the job (never left queued).
                run_job(job_id, retry=False)
            except Exception as exc:  # noqa: BLE001 - reported below (e.g. PostgreSQL unreachable)
                errors.append(exc)

        thread = threading.Thread(target=work, name=f"train-{job_id[:6]}")
        thread.start()
        job = _follow(job_id, max_epochs, worker=thread)
        thread.join()
        if errors:
            console.print(f"[red]job {job_id} not finished[/]: {type(errors[0]).__name__}: {errors[0]}")
            raise typer.Exit(1)
        job = _get_job(job_id)
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
    table = Table("symbol", "tf", "version", "status", "accuracy", "baseline", "macro-F1", "log-loss", "created")
    for v in versions:
        m = v.metrics

        def f(key: str, m: dict[str, Any] = m) -> str:
            return f"{m[key]:.3f}" if isinstance(m.get(key), float) else "-"

        table.add_row(
            v.symbol,
            v.timeframe,
            v.version,
            v.status,
            f("accuracy"),
            f("baseline_accuracy"),
            f("macro_f1"),
            f("log_loss"),
            v.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    models = typer.Typer(help="The model registry.", no_args_is_help=True)
    models.command("list")(list_models)
    app.add_typer(models, name="models")
