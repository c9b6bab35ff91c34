"""PostgreSQL backups to the object store: `pg_dump` in custom format, a sha256 beside each dump,
retention by day and ISO week, and a restore that checks both before it writes.

Keys under `BACKUP_URL` (s3://bucket/prefix or file://path; same store code as the models):
`aicash-20261201T200000Z.dump` and `aicash-20261201T200000Z.dump.sha256` (sha256sum's format).
`pg_dump` and `pg_restore` are the PostgreSQL client programs; they must be of the server's major version
or newer (pg_dump refuses an older client). The dump is held in memory for the upload and the checksum:
the store interface takes bytes; databases of several GB need the Job's memory limit raised.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.storage import ObjectNotFound, ObjectStore, sha256_hex, store_from_url

KEY_PREFIX = "aicash-"
KEY_RE = re.compile(r"^aicash-(\d{8}T\d{6}Z)\.dump$")
TIMESTAMP = "%Y%m%dT%H%M%SZ"


class BackupError(Exception):
    """A backup or restore that must not go on; the message says what to do instead."""


class BackupSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    database_url: str | None = None
    backup_url: str | None = None
    s3_endpoint_url: str | None = None
    # Retention: the newest backup of each of the last N days that have one, and of the last M ISO weeks.
    backup_keep_daily: int = 7
    backup_keep_weekly: int = 8


@dataclass(frozen=True)
class Backup:
    key: str
    taken_at: datetime


def open_backup_store(settings: BackupSettings) -> ObjectStore:
    if not settings.backup_url:
        raise BackupError("BACKUP_URL is not set: use s3://bucket/prefix (or file:///path) for the backups")
    return store_from_url(settings.backup_url, settings.s3_endpoint_url or None)


def backup_key(taken_at: datetime) -> str:
    return f"{KEY_PREFIX}{taken_at.astimezone(UTC).strftime(TIMESTAMP)}.dump"


def list_backups(store: ObjectStore) -> list[Backup]:
    """Complete backups (a dump with its .sha256), oldest first."""
    keys = set(store.list(KEY_PREFIX))
    out = []
    for key in keys:
        m = KEY_RE.match(key)
        if m and f"{key}.sha256" in keys:
            out.append(Backup(key, datetime.strptime(m.group(1), TIMESTAMP).replace(tzinfo=UTC)))
    return sorted(out, key=lambda b: b.taken_at)


def _client_env(database_url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password (which goes into PGPASSWORD, out of the process list) and the env."""
    parts = urlsplit(database_url)
    env = dict(os.environ)
    if parts.scheme not in ("postgresql", "postgres"):
        raise BackupError(f"DATABASE_URL must be a postgresql:// URL, got scheme {parts.scheme!r}")
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        user = f"{parts.username}@" if parts.username else ""
        netloc = f"{user}{host}{f':{parts.port}' if parts.port else ''}"
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts), env


def _program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found: install the PostgreSQL client (same major version as the server)")
    return found


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # noqa: S603 (argument list)
    if proc.returncode != 0:
        raise BackupError(f"{Path(cmd[0]).name} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")


def dump(database_url: str, path: Path) -> None:
    """pg_dump in custom format (compressed, restorable table by table) into `path`."""
    url, env = _client_env(database_url)
    _run([_program("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", f"--file={path}", url], env)


def upload(store: ObjectStore, data: bytes, taken_at: datetime) -> str:
    """Put the dump and its checksum under a timestamped key; the .sha256 last, so a listed backup is whole."""
    key = backup_key(taken_at)
    if store.exists(key):
        raise BackupError(f"{key} exists already: one backup per second at most")
    store.put(key, data)
    store.put(f"{key}.sha256", f"{sha256_hex(data)}  {key}\n".encode())
    return key


def take_backup(database_url: str, store: ObjectStore, dump_file: Path | None = None) -> str:
    """Dump `database_url` (or take the custom-format dump already in `dump_file`) and upload it."""
    taken_at = datetime.now(UTC)
    if dump_file is not None:
        data = dump_file.read_bytes()
        if not data.startswith(b"PGDMP"):
            raise BackupError(f"{dump_file} is not a pg_dump custom-format file (run pg_dump --format=custom)")
        return upload(store, data, taken_at)
    with tempfile.TemporaryDirectory(prefix="aicash-backup-") as tmp:
        path = Path(tmp) / "aicash.dump"
        dump(database_url, path)
        return upload(store, path.read_bytes(), taken_at)


def to_prune(backups: list[Backup], keep_daily: int, keep_weekly: int) -> list[Backup]:
    """Backups outside the retention: kept are the newest of each of the last `keep_daily` days that have a
    backup and the newest of each of the last `keep_weekly` ISO weeks. The newest backup is always kept."""
    if keep_daily < 1:
        raise BackupError("BACKUP_KEEP_DAILY must be at least 1: the newest backup is always kept")
    newest_first = sorted(backups, key=lambda b: b.taken_at, reverse=True)
    keep: set[str] = set()
    by_day: list[object] = [b.taken_at.date() for b in newest_first]
    by_week: list[object] = [tuple(b.taken_at.isocalendar())[:2] for b in newest_first]
    for periods, limit in ((by_day, keep_daily), (by_week, keep_weekly)):
        seen: list[object] = []
        for b, p in zip(newest_first, periods, strict=True):
            if p not in seen:
                if len(seen) == limit:
                    break
                seen.append(p)
                keep.add(b.key)
    return [b for b in backups if b.key not in keep]


def prune(store: ObjectStore, keep_daily: int, keep_weekly: int) -> list[str]:
    doomed = to_prune(list_backups(store), keep_daily, keep_weekly)
    for b in doomed:
        store.delete(f"{b.key}.sha256")  # the checksum first: a half-deleted backup is never listed
        store.delete(b.key)
    return [b.key for b in doomed]


def fetch_verified(store: ObjectStore, key: str) -> bytes:
    """The dump under `key`, refused when it does not match its .sha256."""
    try:
        data = store.get(key)
        recorded = store.get(f"{key}.sha256").decode().split()[0]
    except ObjectNotFound as exc:
        raise BackupError(f"no backup {exc.args[0]!r} in the store: `aicash db backups` lists them") from None
    actual = sha256_hex(data)
    if actual != recorded:
        raise BackupError(f"{key}: checksum mismatch (recorded {recorded}, object {actual}); restore another backup")
    return data


def _user_tables(database_url: str, env: dict[str, str]) -> int:
    sql = (
        "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg_toast%'"
    )
    proc = subprocess.run(  # noqa: S603 (argument list)
        [_program("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, database_url],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BackupError(f"cannot read the target database: {proc.stderr.strip()}")
    return int(proc.stdout.strip())


def restore(store: ObjectStore, key: str, into_url: str, *, force: bool = False) -> None:
    """Restore backup `key` into `into_url`. Refuses a checksum mismatch, and a target that has tables
    unless `force` (then the dump's objects are dropped and re-created: `pg_restore --clean --if-exists`).

    The append-only audit_log loads like any table: pg_restore inserts with COPY, and its triggers refuse
    only UPDATE and DELETE. Triggers are created after the data (the dump's post-data section).
    """
    data = fetch_verified(store, key)
    url, env = _client_env(into_url)
    tables = _user_tables(url, env)
    if tables and not force:
        raise BackupError(
            f"the target database has {tables} table(s): restore into an empty database "
            "(createdb NAME), or pass --force to drop and replace what the backup contains"
        )
    with tempfile.TemporaryDirectory(prefix="aicash-restore-") as tmp:
        path = Path(tmp) / "restore.dump"
        path.write_bytes(data)
        cmd = [_program("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction"]
        if tables:
            cmd += ["--clean", "--if-exists"]
        _run([*cmd, f"--dbname={url}", str(path)], env)
