"""Outcome settlement: each logged prediction against what the market did next, once per (model version, variant,
bar), and the live performance check that raises a series' performance flag (docs/LIFECYCLE.md, "Outcomes").

Run by the periodic Celery task `trainer.settle_outcomes` (every TRAINER_SETTLE_INTERVAL_SECONDS), not on ingest:
ingest is the indicators service's hot path and must not wait on the prediction log; a minute's delay is nothing
against an H1 horizon; and a periodic run also settles the bars that arrived while the task was down.

The rule, for the earliest logged prediction of each (symbol, timeframe, model_version, variant, bar_ts = t) whose
bar t is stored and has `horizon` later closed bars stored on the same series (the bars the predictor read: it
computes a prediction's features from the stored bars of the request's own timeframe):

- realised_log_return = ln(close[t+h] / close[t]);
- realised_label = the model's own label rule (`services.trainer.dataset.labels`) with the horizon and dead band of
  the version's metadata.json and atr_14_pct at t taken from the logged input window (its last row);
- hit = signal == realised_label;
- pnl = direction * ln(close[t+h] / open[t+1]) - cost (TRAINER_OUTCOME_COST_BPS round trip, 0 for HOLD): a position
  opened at the next bar's open, as the backtester fills a signal, and held to the horizon bar's close.

Only bars t .. t+h enter an outcome, so bars stored later never change it (no look-ahead beyond the horizon).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from services.trainer import repository as repo
from services.trainer.artifacts import fetch_verified
from services.trainer.dataset import labels
from services.trainer.settings import TrainerSettings
from services.trainer.weights import LiveRows
from shared.db import require_database_url
from shared.features import FEATURE_NAMES
from shared.model_metadata import CLASSES
from shared.storage import ObjectStore, open_store
from shared.timeframes import Timeframe

log = logging.getLogger("trainer.settlement")

# Distinct (version, variant, bar) keys settled per series per run: a run after a long outage catches up over
# several runs instead of holding one transaction for hours of log.
SETTLE_BATCH = 5000
# The scan starts this many bars (plus the longest horizon) before the newest settled bar of the series: a
# predictor that buffered its log while PostgreSQL was down writes rows of older bars late, and these are still
# found.
GRACE_BARS = 3
# One settlement run at a time (a second one returns at once; ON CONFLICT DO NOTHING keeps two safe anyway).
_LOCK_KEY = 7331009
VARIANTS = ("production", "candidate", "shadow")
DIRECTION = {"SELL": -1, "HOLD": 0, "BUY": 1}
_BPS = 1e-4


@dataclass(frozen=True)
class LabelRule:
    """What settles a version's predictions, from its metadata.json."""

    horizon: int
    dead_band_atr: float
    atr_column: int  # index of atr_14_pct in the version's feature_names (the logged window's columns)


@dataclass(frozen=True)
class Outcome:
    prediction_id: Any
    model_version: str
    variant: str
    bar_ts: datetime
    probabilities: list[float]
    signal: str
    confidence: float
    horizon: int
    realised_log_return: float
    realised_label: str
    hit: bool
    pnl: float


# Per worker process: a version's label rule never changes (metadata.json is checked against the registry's sha256).
_rules: dict[tuple[str, str, str, str], LabelRule] = {}


def label_rule(store: ObjectStore, symbol: str, timeframe: str, version: str, sha256: str) -> LabelRule:
    key = (symbol, timeframe, version, sha256)
    rule = _rules.get(key)
    if rule is None:
        metadata, _ = fetch_verified(store, symbol, timeframe, version, sha256, ())
        rule = LabelRule(
            metadata.labels.horizon, metadata.labels.dead_band_atr, metadata.feature_names.index("atr_14_pct")
        )
        _rules[key] = rule
    return rule


def settle_one(
    ts: npt.NDArray[np.int64],
    open_: npt.NDArray[np.float64],
    close: npt.NDArray[np.float64],
    bar_ts: int,
    window_last_row: npt.NDArray[np.float64],
    signal: str,
    rule: LabelRule,
    cost_bps: float,
) -> tuple[float, str, bool, float] | None:
    """(realised log return, realised label, hit, pnl) of a prediction on bar `bar_ts` from the series' bars
    (ascending `ts`); None while fewer than `horizon` bars follow it (or the bar itself is not stored)."""
    i = int(np.searchsorted(ts, bar_ts))
    h = rule.horizon
    if i >= len(ts) or int(ts[i]) != bar_ts or i + h >= len(ts):
        return None
    j = i + h
    atr = np.full(h + 1, np.nan)
    atr[0] = float(window_last_row[rule.atr_column])
    # The trainer's own rule on bars t..t+h: one label, the one of bar t.
    y = int(labels(close[i : j + 1], atr, h, rule.dead_band_atr)[0])
    realised = CLASSES[y]
    log_return = math.log(float(close[j]) / float(close[i]))
    direction = DIRECTION[signal]
    pnl = 0.0 if direction == 0 else direction * math.log(float(close[j]) / float(open_[i + 1])) - cost_bps * _BPS
    return log_return, realised, signal == realised, pnl


# --- SQL (this module's own tables: bar_outcomes is written here only) -----------------------------------------

_CANDIDATES = """
SELECT c.id, c.bar_ts, extract(epoch FROM c.bar_ts)::bigint AS t, c.model_version, c.variant, c.probabilities,
       c.signal, c.confidence, w.features, w.feature_shape
  FROM (SELECT DISTINCT ON (p.bar_ts, p.model_version, p.variant)
               p.id, p.bar_ts, p.model_version, p.variant, p.probabilities, p.signal, p.confidence, p.window_hash
          FROM predictions p
         WHERE p.symbol = $1 AND p.timeframe = $2 AND p.created_at >= $3
           AND ($4::timestamptz IS NULL OR p.bar_ts >= $4)
           AND p.variant = ANY($5::text[])
           AND p.model_version <> ALL($6::text[])
           AND EXISTS (SELECT 1 FROM bars b WHERE b.symbol = p.symbol AND b.timeframe = p.timeframe
                                              AND b.ts = p.bar_ts)
           AND NOT EXISTS (SELECT 1 FROM bar_outcomes o
                            WHERE o.symbol = p.symbol AND o.timeframe = p.timeframe
                              AND o.model_version = p.model_version AND o.variant = p.variant
                              AND o.bar_ts = p.bar_ts)
         ORDER BY p.bar_ts, p.model_version, p.variant, p.created_at, p.id
         LIMIT $7) c
  JOIN prediction_windows w ON w.window_hash = c.window_hash
 ORDER BY c.bar_ts, c.model_version, c.variant
"""

_STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS bar_outcomes_staging (
    model_version text, variant text, bar_ts timestamptz, prediction_id uuid, probabilities real[], signal text,
    confidence real, horizon integer, realised_log_return float8, realised_label text, hit boolean, pnl float8
) ON COMMIT DELETE ROWS
"""
_STAGING_COLUMNS = (
    "model_version",
    "variant",
    "bar_ts",
    "prediction_id",
    "probabilities",
    "signal",
    "confidence",
    "horizon",
    "realised_log_return",
    "realised_label",
    "hit",
    "pnl",
)


async def scan_start(
    conn: asyncpg.Connection, symbol: str, timeframe: Timeframe, bars_back: int
) -> tuple[datetime, datetime | None] | None:
    """(created_at lower bound, bar_ts lower bound) of this run's scan of the series' log; None when nothing was
    logged for it or no bars are stored.

    Incremental: from `bars_back` stored bars before the newest settled bar of the series on. `bars_back` is the
    longest horizon of the versions that may still have unsettled predictions plus GRACE_BARS: a version with a
    longer horizon settles its bar t only when bar t+h arrives, by when a shorter-horizon version has settled
    bars up to t+h-h_short. A prediction is made after its bar opened, so its created_at is past its bar_ts and
    the predictions_series index (symbol, timeframe, created_at) serves the scan."""
    newest: datetime | None = await conn.fetchval(
        "SELECT max(bar_ts) FROM bar_outcomes WHERE symbol = $1 AND timeframe = $2", symbol, timeframe.value
    )
    if newest is not None:
        start: datetime | None = await conn.fetchval(
            "SELECT ts FROM bars WHERE symbol = $1 AND timeframe = $2 AND ts <= $3 ORDER BY ts DESC OFFSET $4 LIMIT 1",
            symbol,
            timeframe.value,
            newest,
            bars_back,
        )
        if start is not None:
            return start, start
    first_bar: datetime | None = await conn.fetchval(
        "SELECT ts FROM bars WHERE symbol = $1 AND timeframe = $2 ORDER BY ts LIMIT 1", symbol, timeframe.value
    )
    if first_bar is None:
        return None  # no stored bars: nothing can settle (predictions on sent bars settle once such bars are stored)
    first: datetime | None = await conn.fetchval(
        "SELECT created_at FROM predictions WHERE symbol = $1 AND timeframe = $2 AND created_at >= $3 "
        "ORDER BY created_at LIMIT 1",
        symbol,
        timeframe.value,
        first_bar,
    )
    if first is None:
        return None
    # First settlement of the series (or fewer stored bars than bars_back): every stored bar ever logged (once).
    return first, first_bar


# A version that served (or was created) this long before the newest settled bar has no predictions left to settle:
# its last ones settled `horizon` bars after it stopped serving. Its horizon no longer widens the scan.
RECENT_VERSION_DAYS = 30


async def series_bars(
    conn: asyncpg.Connection, symbol: str, timeframe: Timeframe, first: datetime, last: datetime, after: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(ts, open, close) of the closed stored bars from `first` to `last` and the `after` bars that follow."""
    closed = "ts <= now() - make_interval(secs => $3::float8)"
    rows = await conn.fetch(
        f"(SELECT extract(epoch FROM ts)::bigint, open, close FROM bars "  # noqa: S608
        f" WHERE symbol = $1 AND timeframe = $2 AND {closed} AND ts >= $4 AND ts <= $5)"
        f" UNION ALL "
        f"(SELECT extract(epoch FROM ts)::bigint, open, close FROM bars "
        f" WHERE symbol = $1 AND timeframe = $2 AND {closed} AND ts > $5 ORDER BY ts LIMIT $6) ORDER BY 1",
        symbol,
        timeframe.value,
        float(timeframe.seconds),
        first,
        last,
        after,
    )
    if not rows:
        return np.empty(0, np.int64), np.empty(0), np.empty(0)
    return (
        np.fromiter((r[0] for r in rows), np.int64, len(rows)),
        np.fromiter((r[1] for r in rows), np.float64, len(rows)),
        np.fromiter((r[2] for r in rows), np.float64, len(rows)),
    )


async def insert_outcomes(conn: asyncpg.Connection, symbol: str, timeframe: str, outcomes: list[Outcome]) -> int:
    """COPY into a staging table, then INSERT ... ON CONFLICT DO NOTHING: a key settled by a concurrent run (or a
    rerun) is kept as it was. Returns the rows inserted."""
    if not outcomes:
        return 0
    async with conn.transaction():
        await conn.execute(_STAGING_DDL)
        await conn.copy_records_to_table(
            "bar_outcomes_staging",
            records=[
                (
                    o.model_version,
                    o.variant,
                    o.bar_ts,
                    o.prediction_id,
                    o.probabilities,
                    o.signal,
                    o.confidence,
                    o.horizon,
                    o.realised_log_return,
                    o.realised_label,
                    o.hit,
                    o.pnl,
                )
                for o in outcomes
            ],
            columns=_STAGING_COLUMNS,
        )
        status = await conn.execute(
            "INSERT INTO bar_outcomes (symbol, timeframe, model_version, variant, bar_ts, prediction_id, "
            "probabilities, signal, confidence, horizon, realised_log_return, realised_label, hit, pnl) "
            "SELECT $1, $2, model_version, variant, bar_ts, prediction_id, probabilities, signal, confidence, horizon, "
            "realised_log_return, realised_label, hit, pnl FROM bar_outcomes_staging ON CONFLICT DO NOTHING",
            symbol,
            timeframe,
        )
    return int(status.split()[-1])


# --- one series -----------------------------------------------------------------------------------------------


async def settle_series(
    conn: asyncpg.Connection,
    store: ObjectStore,
    symbol: str,
    timeframe: Timeframe,
    settings: TrainerSettings,
    *,
    batch: int = SETTLE_BATCH,
) -> dict[str, Any]:
    """Settle what is due on one series (at most `batch` keys); returns counts and the versions left out."""
    result: dict[str, Any] = {"symbol": symbol, "timeframe": timeframe.value, "settled": 0, "pending": 0}
    registered = await conn.fetch(
        "SELECT version, sha256, greatest(created_at, retired_at, rolled_back_at) > "
        "coalesce((SELECT max(bar_ts) FROM bar_outcomes WHERE symbol = $1 AND timeframe = $2), '-infinity') "
        "- make_interval(days => $3) OR status IN ('production', 'candidate') AS recent "
        "FROM model_versions WHERE symbol = $1 AND timeframe = $2",
        symbol,
        timeframe.value,
        RECENT_VERSION_DAYS,
    )
    versions = {r["version"]: r["sha256"] for r in registered}
    rules: dict[str, LabelRule] = {}
    skipped: dict[str, str] = {}

    async def load_rule(version: str) -> None:
        sha = versions.get(version)
        if sha is None:
            skipped[version] = "not in the model registry"
            return
        try:
            rules[version] = await asyncio.to_thread(label_rule, store, symbol, timeframe.value, version, sha)
        except Exception as exc:  # missing/corrupt artifact: say so, settle the others
            skipped[version] = f"{type(exc).__name__}: {exc}"

    for r in registered:
        if r["recent"]:
            await load_rule(r["version"])
    longest = max((rule.horizon for rule in rules.values()), default=0)
    start = await scan_start(conn, symbol, timeframe, GRACE_BARS + longest)
    if start is None:
        return result
    rows: list[asyncpg.Record] = []
    # A version whose metadata cannot be read is left out and the batch read again without it, so its rows never
    # fill the batch run after run; at most a few versions of one series can be unreadable.
    for _attempt in range(5):
        rows = await conn.fetch(
            _CANDIDATES, symbol, timeframe.value, start[0], start[1], list(VARIANTS), list(skipped), batch
        )
        unknown = {r["model_version"] for r in rows} - rules.keys() - skipped.keys()
        for version in sorted(unknown):
            await load_rule(version)
        if not any(r["model_version"] in skipped for r in rows):
            break
    rows = [r for r in rows if r["model_version"] in rules]
    if skipped:
        result["skipped_versions"] = skipped
        log.warning("%s %s: versions not settled: %s", symbol, timeframe.value, skipped)
    if not rows:
        return result
    horizon = max(rules[r["model_version"]].horizon for r in rows)
    ts, open_, close = await series_bars(conn, symbol, timeframe, rows[0]["bar_ts"], rows[-1]["bar_ts"], horizon)
    outcomes: list[Outcome] = []
    for r in rows:
        rule = rules[r["model_version"]]
        shape = tuple(r["feature_shape"])
        last_row = np.asarray(r["features"], dtype=np.float64).reshape(shape)[-1]
        got = settle_one(ts, open_, close, int(r["t"]), last_row, r["signal"], rule, settings.trainer_outcome_cost_bps)
        if got is None:
            result["pending"] += 1
            continue
        log_return, realised, hit, pnl = got
        outcomes.append(
            Outcome(
                r["id"],
                r["model_version"],
                r["variant"],
                r["bar_ts"],
                list(r["probabilities"]),
                r["signal"],
                float(r["confidence"]),
                rule.horizon,
                log_return,
                realised,
                hit,
                pnl,
            )
        )
    result["settled"] = await insert_outcomes(conn, symbol, timeframe.value, outcomes)
    return result


# --- live rows for the indicator weights -----------------------------------------------------------------------


async def live_rows(
    conn: asyncpg.Connection, symbol: str, timeframe: str, version: str, feature_names: Sequence[str]
) -> LiveRows:
    """The settled bars of a version, once per bar (its production row first, then candidate, then shadow): the
    newest row of each bar's logged window, in FEATURE_NAMES order, and the realised label. The indicator
    weights take their historical-performance term from these (services.trainer.weights.optimize_weights)."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (o.bar_ts) o.realised_label, w.features, w.feature_shape FROM bar_outcomes o "
        "JOIN predictions p ON p.id = o.prediction_id JOIN prediction_windows w ON w.window_hash = p.window_hash "
        "WHERE o.symbol = $1 AND o.timeframe = $2 AND o.model_version = $3 "
        "ORDER BY o.bar_ts, array_position(ARRAY['production', 'candidate', 'shadow'], o.variant)",
        symbol,
        timeframe,
        version,
    )
    order = [list(feature_names).index(name) for name in FEATURE_NAMES]
    raw = np.empty((len(rows), len(FEATURE_NAMES)))
    for k, r in enumerate(rows):
        raw[k] = np.asarray(r["features"], dtype=np.float64).reshape(tuple(r["feature_shape"]))[-1, order]
    y = np.fromiter((CLASSES.index(r["realised_label"]) for r in rows), dtype=np.int64, count=len(rows))
    return LiveRows(raw=raw, y=y)


# --- live performance drift -----------------------------------------------------------------------------------


def wilson_interval(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a hit rate (scipy's binomtest; the trainer's extra has scipy)."""
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def validation_accuracy(version_metrics: dict[str, Any], report: dict[str, Any] | None) -> tuple[float, str] | None:
    """The accuracy live hits are held to, and where it comes from: the pooled out-of-sample accuracy of the
    version's latest walk-forward validation, else its test-split accuracy from training (registry metrics)."""
    if report is not None:
        pooled = (((report.get("models") or {}).get("lstm") or {}).get("pooled") or {}).get("metrics") or {}
        value = pooled.get("accuracy")
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value), "walk-forward validation, pooled accuracy"
    test = version_metrics.get("test")
    value = test.get("accuracy") if isinstance(test, dict) else version_metrics.get("accuracy")
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value), "test-split accuracy at training"
    return None


async def check_performance(
    conn: asyncpg.Connection, settings: TrainerSettings, symbols: Collection[str] | None = None
) -> list[dict[str, Any]]:
    """Per series' production version with at least TRAINER_PERFORMANCE_MIN_BARS settled production bars: when
    the upper end of the 95 % Wilson interval of its live hit rate is below its validation accuracy, the series'
    performance flag is set (the auto-retrain schedule reads it). The drift flag is left as it is."""
    checked: list[dict[str, Any]] = []
    for v in await repo.production_versions(conn):
        if symbols is not None and v.symbol not in symbols:
            continue
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(*) FILTER (WHERE hit) AS hits FROM bar_outcomes "
            "WHERE symbol = $1 AND timeframe = $2 AND model_version = $3 AND variant = 'production'",
            v.symbol,
            v.timeframe,
            v.version,
        )
        n, hits = int(row["n"]), int(row["hits"])
        entry: dict[str, Any] = {"symbol": v.symbol, "timeframe": v.timeframe, "model_version": v.version, "bars": n}
        checked.append(entry)
        if n < settings.trainer_performance_min_bars:
            entry["flagged"] = False
            continue
        report = await repo.latest_validation(conn, v.id)
        reference = validation_accuracy(v.metrics, report["report"] if report else None)
        low, high = wilson_interval(hits, n)
        entry.update(hit_rate=hits / n, ci_low=low, ci_high=high)
        if reference is None:
            entry["flagged"] = False
            entry["detail"] = "no validation or test accuracy recorded for this version"
            continue
        entry.update(reference=reference[0], reference_source=reference[1])
        entry["flagged"] = flagged = high < reference[0]
        if not flagged:
            continue
        reason = (
            f"live hit rate {hits / n:.3f} of {v.version} over {n} settled bars (95 % CI {low:.3f}-{high:.3f}) is "
            f"below its {reference[1]} {reference[0]:.3f}"
        )
        async with conn.transaction():
            # Row lock: a concurrent writer of the drift flag neither loses nor overwrites this one. The row is
            # made first (all flags off), so that there is a row to lock even for a series never flagged before.
            await conn.execute(
                "INSERT INTO model_flags (symbol, timeframe) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                v.symbol,
                v.timeframe,
            )
            await conn.execute(
                "SELECT 1 FROM model_flags WHERE symbol = $1 AND timeframe = $2 FOR UPDATE", v.symbol, v.timeframe
            )
            flags = await repo.get_flags(conn, v.symbol, v.timeframe)
            if flags is not None and flags.performance:
                continue
            drift = flags is not None and flags.drift
            combined = f"{flags.reason}; {reason}" if drift and flags is not None and flags.reason else reason
            await repo.set_flags(conn, v.symbol, v.timeframe, drift=drift, performance=True, reason=combined)
        log.warning("%s %s: performance flag set: %s", v.symbol, v.timeframe, reason)
    return checked


# --- the task's entry point -----------------------------------------------------------------------------------


async def settle(
    conn: asyncpg.Connection,
    settings: TrainerSettings,
    store: ObjectStore,
    *,
    batch: int = SETTLE_BATCH,
    symbols: Collection[str] | None = None,
) -> dict[str, Any]:
    """Settle every series (or those of `symbols`: tests), then check live performance. One run at a time."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
        return {"skipped": "another settlement run is in progress", "settled": 0}
    try:
        series = await conn.fetch("SELECT DISTINCT symbol, timeframe FROM model_versions ORDER BY symbol, timeframe")
        per_series = []
        for s in series:
            if symbols is not None and s["symbol"] not in symbols:
                continue
            try:
                per_series.append(
                    await settle_series(conn, store, s["symbol"], Timeframe(s["timeframe"]), settings, batch=batch)
                )
            except Exception as exc:  # one series' failure must not stop the others, run after run
                log.exception("settling %s %s failed; the other series go on", s["symbol"], s["timeframe"])
                per_series.append(
                    {"symbol": s["symbol"], "timeframe": s["timeframe"], "settled": 0, "pending": 0, "error": str(exc)}
                )
        performance = await check_performance(conn, settings, symbols)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return {
        "settled": sum(s["settled"] for s in per_series),
        "series": [
            s for s in per_series if s["settled"] or s["pending"] or s.get("skipped_versions") or s.get("error")
        ],
        "performance": performance,
    }


def run_settlement(
    *,
    settings: TrainerSettings,
    store: ObjectStore | None = None,
    batch: int = SETTLE_BATCH,
    symbols: Collection[str] | None = None,
) -> dict[str, Any]:
    """One settlement run (the `trainer.settle_outcomes` task): settle every series, then check live performance."""

    async def go() -> dict[str, Any]:
        conn = await asyncpg.connect(
            require_database_url(settings),
            timeout=10,
            command_timeout=300,
            server_settings={"application_name": "aicash-trainer-settlement"},
        )
        try:
            return await settle(conn, settings, store or open_store(settings), batch=batch, symbols=symbols)
        finally:
            await conn.close()

    return asyncio.run(go())
