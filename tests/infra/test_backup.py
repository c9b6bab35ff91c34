"""Backups for real: `aicash db backup` dumps a populated database (bars, jobs, the append-only audit_log)
to a real S3-compatible server, `aicash db restore` loads it into a fresh database, and every table's row
count and content hash match. Restore refuses a tampered dump and a non-empty target unless told."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import numpy as np
import pytest

from shared.audit import record
from shared.backup import Backup, backup_key, list_backups, prune, to_prune, upload
from shared.local_services import scratch_database
from shared.market_repository import upsert_bars
from shared.storage import ObjectStore, store_from_url
from shared.timeframes import Timeframe
from tests.data import generate_bars
from tests.support import REPO
from tests.support.s3 import CREDENTIALS, seaweed_s3

BUCKET = "aicash-backups"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seaweed_s3(tmp_path_factory.mktemp("weed-backup"), BUCKET) as endpoint:
        yield endpoint


@pytest.fixture
def backup_url() -> str:
    return f"s3://{BUCKET}/run-{secrets.token_hex(4)}"


@pytest.fixture
def store(s3_endpoint: str, backup_url: str) -> ObjectStore:
    return store_from_url(backup_url, s3_endpoint)


async def populate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for i, symbol in enumerate(("BKPA", "BKPB")):  # one transaction per upsert (its staging table)
            bars = generate_bars("H1", 400, seed=i)
            async with conn.transaction():
                await upsert_bars(conn, symbol, Timeframe("H1"), bars, np.zeros(len(bars), dtype=np.int16))
        async with conn.transaction():
            for n in range(3):
                await record(
                    conn,
                    actor="ops",
                    action="rollout.update",
                    symbol="BKPA",
                    timeframe="H1",
                    target=f"model_version:{n}",
                    before={"state": "off"},
                    after={"state": "shadow", "n": n},
                    request_id=f"req-{n}",
                )
    finally:
        await conn.close()


async def table_digests(url: str) -> dict[str, tuple[int, str]]:
    """table -> (rows, md5 of every row's text in a fixed order), for every table in the public schema."""
    conn = await asyncpg.connect(url)
    try:
        tables = [
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        out = {}
        for t in sorted(tables):
            row = await conn.fetchrow(
                "SELECT count(*) AS n, md5(coalesce(string_agg(x::text, chr(10) ORDER BY x::text), '')) AS h "
                f'FROM "{t}" x'
            )
            out[t] = (row["n"], row["h"])
        return out
    finally:
        await conn.close()


async def admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def empty_database(server_url: str) -> Iterator[str]:
    name = f"aicash_restore_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(admin(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        asyncio.run(admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def aicash(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "db", *args],
        cwd=REPO,
        env={**os.environ, **CREDENTIALS, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_backup_and_restore_round_trip(
    tool: Callable[[str], str],
    server_url: str,
    s3_endpoint: str,
    backup_url: str,
    store: ObjectStore,
    empty_database: str,
) -> None:
    tool("pg_dump")
    tool("pg_restore")
    with scratch_database(server_url, "aicash_backup_src") as source:
        asyncio.run(populate(source))
        before = asyncio.run(table_digests(source))
        env = {"DATABASE_URL": source, "BACKUP_URL": backup_url, "S3_ENDPOINT_URL": s3_endpoint}
        out = aicash(["backup"], env)
        assert out.returncode == 0, out.stderr
    (backup,) = list_backups(store)
    assert re.fullmatch(r"aicash-\d{8}T\d{6}Z\.dump", backup.key)
    assert backup.key in out.stderr
    assert abs(backup.taken_at - datetime.now(UTC)) < timedelta(minutes=5)
    assert aicash(["backups"], env).stdout.startswith(backup.key)

    assert before["audit_log"][0] == 3 and before["bars"][0] == 800 and before["series"][0] == 2, before
    out = aicash(["restore", backup.key, "--into", empty_database], env)
    assert out.returncode == 0, out.stderr
    assert asyncio.run(table_digests(empty_database)) == before

    # The restored audit log is append-only again: its triggers came back after the data.
    async def try_update() -> None:
        conn = await asyncpg.connect(empty_database)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute("UPDATE audit_log SET actor = 'mallory'")
        finally:
            await conn.close()

    asyncio.run(try_update())

    # A second restore into the now non-empty database is refused, and replaces it with --force.
    refused = aicash(["restore", backup.key, "--into", empty_database], env)
    assert refused.returncode == 1 and "--force" in refused.stderr and "table(s)" in refused.stderr
    forced = aicash(["restore", backup.key, "--into", empty_database, "--force"], env)
    assert forced.returncode == 0, forced.stderr
    assert asyncio.run(table_digests(empty_database)) == before


def test_restore_refuses_a_tampered_dump(
    tool: Callable[[str], str], s3_endpoint: str, backup_url: str, store: ObjectStore, empty_database: str
) -> None:
    key = upload(store, b"PGDMP original bytes", datetime(2026, 1, 5, 3, 0, tzinfo=UTC))
    store.put(key, b"PGDMP tampered bytes")
    env = {"BACKUP_URL": backup_url, "S3_ENDPOINT_URL": s3_endpoint}
    out = aicash(["restore", key, "--into", empty_database], env)
    assert out.returncode == 1 and "checksum mismatch" in out.stderr
    missing = aicash(["restore", "aicash-20200101T000000Z.dump", "--into", empty_database], env)
    assert missing.returncode == 1 and "no backup" in missing.stderr
    assert asyncio.run(table_digests(empty_database)) == {}


def test_backup_without_a_target_says_what_to_set(tmp_path: Path) -> None:
    out = aicash(["backup"], {"DATABASE_URL": "postgresql://127.0.0.1/x", "BACKUP_URL": ""})
    assert out.returncode == 1 and "BACKUP_URL" in out.stderr
    bogus = tmp_path / "not-a-dump"
    bogus.write_bytes(b"hello")
    out = aicash(["backup", "--dump-file", str(bogus)], {"BACKUP_URL": f"file://{tmp_path / 'store'}"})
    assert out.returncode == 1 and "custom-format" in out.stderr


def hourly(start: datetime, hours: int) -> list[Backup]:
    return [Backup(backup_key(t), t) for t in (start + timedelta(hours=h) for h in range(hours))]


def test_retention_keeps_the_newest_per_day_and_per_week() -> None:
    # Hourly backups from Monday 2026-10-05 00:00 to Sunday 2026-11-01 23:00 (four ISO weeks, 28 days).
    backups = hourly(datetime(2026, 10, 5, tzinfo=UTC), 28 * 24)
    doomed = {b.key for b in to_prune(backups, keep_daily=7, keep_weekly=4)}
    kept = sorted(b.taken_at for b in backups if b.key not in doomed)
    last_of_day = [datetime(2026, 11, 1, 23, tzinfo=UTC) - timedelta(days=d) for d in range(7)]
    last_of_week = [datetime(2026, 11, 1, 23, tzinfo=UTC) - timedelta(weeks=w) for w in range(4)]
    assert kept == sorted(set(last_of_day) | set(last_of_week))
    assert backups[-1].key not in doomed
    # One backup on each of fewer days than the limit: nothing goes; two on one day: the older goes.
    assert to_prune(backups[:72:24], keep_daily=7, keep_weekly=4) == []
    assert to_prune(backups[:2], keep_daily=7, keep_weekly=4) == backups[:1]


def test_prune_deletes_from_the_store(store: ObjectStore) -> None:
    start = datetime(2026, 10, 5, tzinfo=UTC)
    for d in range(10):
        upload(store, b"PGDMP", start + timedelta(days=d, hours=1))
        upload(store, b"PGDMP", start + timedelta(days=d, hours=2))
    gone = prune(store, keep_daily=3, keep_weekly=2)
    left = [b.taken_at for b in list_backups(store)]
    # Days 7, 8, 9 (newest of each) and the newest of the previous ISO week (Sunday, day 6).
    assert left == [start + timedelta(days=d, hours=2) for d in (6, 7, 8, 9)]
    assert len(gone) == 20 - 4
    assert not [k for k in store.list("aicash-") if k.endswith(".sha256") and k[: -len(".sha256")] in gone]
