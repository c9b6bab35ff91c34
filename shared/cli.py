"""`aicash`: the command line of AI Cash Evolution."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shared.settings import get_settings

app = typer.Typer(help="AI Cash Evolution: market bars to trading signals.", no_args_is_help=True)
db_app = typer.Typer(help="Database migrations, backups and restores.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console(stderr=True)

CHUNK_BARS = 50_000


def _api_key() -> dict[str, str]:
    key = os.environ.get("AICASH_API_KEY")
    return {"X-API-Key": key} if key else {}


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Apply migrations up to REVISION (default head) on DATABASE_URL."""
    from shared.migrate import upgrade

    url = get_settings().database_url
    if not url:
        console.print("[red]DATABASE_URL is not set[/red]")
        raise typer.Exit(2)
    upgrade(url, revision)
    console.print(f"database at revision {revision}")


@db_app.command("backup")
def db_backup(
    dump_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="upload this pg_dump --format=custom file instead of dumping"),
    ] = None,
    prune: Annotated[bool, typer.Option(help="delete backups outside BACKUP_KEEP_DAILY / BACKUP_KEEP_WEEKLY")] = True,
) -> None:
    """Back up DATABASE_URL to BACKUP_URL: pg_dump (custom format), a timestamped key with its sha256, then
    prune by retention. What the backup CronJob and the compose `backup` service run."""
    from shared.backup import BackupError, BackupSettings, open_backup_store, take_backup
    from shared.backup import prune as prune_backups

    settings = BackupSettings()
    try:
        if not settings.database_url and dump_file is None:
            raise BackupError("DATABASE_URL is not set: it names the database to back up")
        store = open_backup_store(settings)
        key = take_backup(settings.database_url or "", store, dump_file)
        console.print(f"backed up to {store.uri(key)}")
        if prune:
            for gone in prune_backups(store, settings.backup_keep_daily, settings.backup_keep_weekly):
                console.print(f"pruned {gone}")
    except BackupError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


@db_app.command("backups")
def db_backups() -> None:
    """List the complete backups under BACKUP_URL, oldest first (key and time, UTC)."""
    from shared.backup import BackupError, BackupSettings, list_backups, open_backup_store

    try:
        backups = list_backups(open_backup_store(BackupSettings()))
    except BackupError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    for b in backups:
        typer.echo(f"{b.key}\t{b.taken_at.isoformat()}")


@db_app.command("restore")
def db_restore(
    key: Annotated[str, typer.Argument(help="backup key, e.g. aicash-20261201T200000Z.dump (see `aicash db backups`)")],
    into: Annotated[str, typer.Option("--into", help="postgresql:// URL of the database to restore into")],
    force: Annotated[
        bool, typer.Option(help="restore into a database that has tables (drops what the dump contains)")
    ] = False,
) -> None:
    """Restore backup KEY from BACKUP_URL into --into. Refuses a checksum mismatch, and a non-empty target
    unless --force."""
    from shared.backup import BackupError, BackupSettings, open_backup_store, restore

    try:
        restore(open_backup_store(BackupSettings()), key, into, force=force)
    except BackupError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    console.print(f"restored {key}")


def read_bars_csv(path: Path) -> list[dict[str, object]]:
    """Rows of a CSV with columns ts,open,high,low,close,volume (headers case-insensitive, any order)."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        first = next(reader, None)
        if first is None:
            raise typer.BadParameter(f"{path}: the file is empty; expected a header ts,open,high,low,close,volume")
        header = [h.strip().lower() for h in first]
        need = ["ts", "open", "high", "low", "close", "volume"]
        missing = [c for c in need if c not in header]
        if missing:
            raise typer.BadParameter(f"{path}: missing column(s) {', '.join(missing)}; have {', '.join(header)}")
        idx = [header.index(c) for c in need]
        out: list[dict[str, object]] = []
        for line_no, row in enumerate(reader, start=2):
            try:
                ts_raw = row[idx[0]].strip()
                ts: object = int(ts_raw) if ts_raw.lstrip("-").isdigit() else ts_raw
                vals = [float(row[i]) for i in idx[1:]]
            except (ValueError, IndexError) as exc:
                raise typer.BadParameter(f"{path}: line {line_no}: {exc}") from None
            out.append(dict(zip(need, [ts, *vals], strict=True)))
    return out


@app.command("import-bars")
def import_bars(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV: ts,open,high,low,close,volume")],
    symbol: Annotated[str, typer.Option("--symbol", "-s")],
    timeframe: Annotated[str, typer.Option("--timeframe", "-t")],
    url: Annotated[str | None, typer.Option(help="indicators service (default INDICATORS_URL)")] = None,
) -> None:
    """Upload bars from a CSV file through the indicators service's API, in chunks of 50,000.

    The whole file is checked by the API's own rules first, so a bad row stops the import before anything
    is written; errors name the CSV line.
    """
    from shared.bars import BarValidationError, bars_from_items
    from shared.errors import AppError
    from shared.timeframes import check_symbol, parse_timeframe

    rows = read_bars_csv(file)
    if not rows:
        console.print(f"[red]{file}: no bars[/red]")
        raise typer.Exit(1)
    try:
        check_symbol(symbol)
        bars_from_items(rows, parse_timeframe(timeframe))
    except BarValidationError as exc:
        console.print(f"[red]{file}: nothing imported: {_csv_lines(exc.message)}[/red]")
        raise typer.Exit(1) from None
    except AppError as exc:
        console.print(f"[red]nothing imported: {exc.message}[/red]")
        raise typer.Exit(1) from None
    base = (url or get_settings().indicators_url).rstrip("/")
    inserted = updated = flagged = 0
    with (
        httpx.Client(base_url=base, headers=_api_key(), timeout=120) as client,
        Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
        ) as progress,
    ):
        task = progress.add_task(f"{symbol} {timeframe}", total=len(rows))
        for start in range(0, len(rows), CHUNK_BARS):
            chunk = rows[start : start + CHUNK_BARS]
            r = client.post(f"/v1/bars/{symbol}/{timeframe}", json={"bars": chunk})
            if r.status_code != 200:
                detail = (
                    r.json().get("detail")
                    if r.headers.get("content-type", "").startswith("application/json")
                    else r.text
                )
                done = f"lines 2 to {start + 1} were imported, the rest was not" if start else "nothing was imported"
                console.print(
                    f"[red]chunk from CSV line {start + 2}: {r.status_code} {detail}; {done} "
                    "(importing again is safe: it is an upsert)[/red]"
                )
                raise typer.Exit(1)
            body = r.json()
            inserted += body["inserted"]
            updated += body["updated"]
            flagged += body.get("flagged", 0)
            progress.advance(task, len(chunk))
    console.print(f"{symbol} {timeframe}: {inserted} inserted, {updated} updated, {flagged} flagged")


def _csv_lines(message: str) -> str:
    """`bar 17: ...` -> `line 19: ...` (the header is line 1)."""
    return re.sub(r"\bbar (\d+)", lambda m: f"line {int(m.group(1)) + 2}", message)


def _register_service_commands() -> None:
    # Each service adds its commands; a container without a service's extra simply lacks them.
    import importlib

    for module in ("services.trainer.cli", "services.predictor.cli"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        register = getattr(mod, "register", None)
        if register is not None:
            register(app)


@app.command("up")
def up(
    smoke: Annotated[bool, typer.Option("--smoke", help="start, check one request, stop (for tests)")] = False,
    no_train: Annotated[bool, typer.Option("--no-train", help="do not train the first model")] = False,
    epochs: Annotated[int | None, typer.Option(min=1, help="maximum epochs of the first model")] = None,
    verdict_timeout: Annotated[float, typer.Option(help="seconds to wait for the first model's validation")] = 900.0,
) -> None:
    """Run the whole system locally: what `make up` runs, with the same options."""
    from shared.devstack import main

    argv = [*(["--smoke"] if smoke else []), *(["--no-train"] if no_train else [])]
    argv += [*(["--epochs", str(epochs)] if epochs else []), "--verdict-timeout", str(verdict_timeout)]
    main(argv)


_register_service_commands()

if __name__ == "__main__":
    app()
