"""Live performance of the served models from settled outcomes (`bar_outcomes`, written by the trainer's settlement
task), external outcomes recorded by clients (`POST /v1/outcomes`), and the Prometheus gauges built on them.

The statistics are a few lines of numpy on purpose: the predictor's extra has neither scipy nor scikit-learn
(together about 150 MB in an image that serves ONNX graphs). The Wilson interval, Brier score and log loss below
match scipy's `binomtest(...).proportion_ci(method="wilson")` and the trainer's (scikit-learn's) definitions;
tests/predictor/test_performance.py checks them against both.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt
import orjson

from services.predictor import repository
from services.predictor.metrics import MODEL_ACCURACY, MODEL_BRIER, MODEL_PNL, MODEL_SETTLED_BARS
from services.predictor.prediction_log import PredictionLog
from services.predictor.schemas import (
    CalibrationBucket,
    OutcomeIn,
    OutcomeOut,
    PerformanceOut,
    VariantPerformance,
)
from shared import audit
from shared.errors import ConflictError, NotFoundError
from shared.model_metadata import CLASSES

log = logging.getLogger("predictor.performance")

# Two-sided 95 %: the standard normal quantile 0.975.
Z95 = 1.959963984540054
# Confidence buckets of the calibration table: [1/3, 0.4), [0.4, 0.5), ..., [0.9, 1.0]. The signal is the most
# probable of three classes, so its confidence is never below 1/3.
BUCKET_EDGES = (1.0 / 3.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LOG_LOSS_EPS = 1e-15
VARIANT_ORDER = {"production": 0, "candidate": 1, "shadow": 2}

FloatArray = npt.NDArray[np.float64]


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one trial")
    p = hits / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _onehot(realised: Sequence[str]) -> FloatArray:
    index = {c: i for i, c in enumerate(CLASSES)}
    y = np.zeros((len(realised), len(CLASSES)))
    y[np.arange(len(realised)), [index[r] for r in realised]] = 1.0
    return y


def brier_score(probabilities: FloatArray, realised: Sequence[str]) -> float:
    """Multiclass Brier score: mean over bars of the sum over classes of (p - onehot)², in [0, 2] (the trainer's
    definition, scikit-learn's brier_score_loss on three classes)."""
    p = probabilities / probabilities.sum(axis=1, keepdims=True)
    return float(((p - _onehot(realised)) ** 2).sum(axis=1).mean())


def log_loss(probabilities: FloatArray, realised: Sequence[str]) -> float:
    """Mean -ln p(realised class), probabilities renormalised and clipped at 1e-15 (natural log)."""
    p = probabilities / probabilities.sum(axis=1, keepdims=True)
    true = (p * _onehot(realised)).sum(axis=1)
    return float(-np.log(np.clip(true, LOG_LOSS_EPS, 1.0)).mean())


def calibration_table(confidence: FloatArray, hit: npt.NDArray[np.bool_]) -> list[CalibrationBucket]:
    """Per confidence bucket: settled bars, their mean confidence and how often the signal was right."""
    # Bucket k holds BUCKET_EDGES[k] <= c < BUCKET_EDGES[k + 1]; a confidence of exactly 1.0 goes in the last one.
    k = np.clip(np.searchsorted(np.asarray(BUCKET_EDGES[1:-1]), confidence, side="right"), 0, len(BUCKET_EDGES) - 2)
    out: list[CalibrationBucket] = []
    for b in range(len(BUCKET_EDGES) - 1):
        sel = k == b
        n = int(sel.sum())
        out.append(
            CalibrationBucket(
                confidence_low=round(BUCKET_EDGES[b], 6),
                confidence_high=BUCKET_EDGES[b + 1],
                bars=n,
                mean_confidence=float(confidence[sel].mean()) if n else None,
                hit_rate=float(hit[sel].mean()) if n else None,
            )
        )
    return out


def summarise(
    model_version: str,
    variant: str,
    rows: Sequence[asyncpg.Record],
    predictions: int,
    external: tuple[int, float | None],
) -> VariantPerformance:
    """The performance of one (model version, variant) from its settled outcomes (rows of OUTCOME_COLUMNS)."""
    n = len(rows)
    hit = np.fromiter((bool(r["hit"]) for r in rows), dtype=np.bool_, count=n)
    pnl = np.fromiter((float(r["pnl"]) for r in rows), dtype=np.float64, count=n)
    confidence = np.fromiter((float(r["confidence"]) for r in rows), dtype=np.float64, count=n)
    hits = int(hit.sum())
    ci = wilson_interval(hits, n) if n else (None, None)
    brier = loss = None
    if n:
        probs = np.asarray([list(r["probabilities"]) for r in rows], dtype=np.float64)
        realised = [r["realised_label"] for r in rows]
        brier, loss = brier_score(probs, realised), log_loss(probs, realised)
    # A HOLD signal takes no position (pnl 0, no cost): it is no trade.
    traded = np.fromiter((r["signal"] != "HOLD" for r in rows), dtype=np.bool_, count=n)
    wins, losses = float(pnl[traded & (pnl > 0)].sum()), float(-pnl[traded & (pnl < 0)].sum())
    return VariantPerformance(
        model_version=model_version,
        variant=variant,
        predictions=predictions,
        settled_bars=n,
        first_bar=rows[0]["bar_ts"] if n else None,
        last_bar=rows[-1]["bar_ts"] if n else None,
        hits=hits,
        hit_rate=hits / n if n else None,
        hit_rate_ci_low=ci[0],
        hit_rate_ci_high=ci[1],
        brier=brier,
        log_loss=loss,
        calibration=calibration_table(confidence, hit),
        trades=int(traded.sum()),
        profit_factor=wins / losses if losses > 0 else None,
        return_after_costs=float(pnl.sum()),
        external_outcomes=external[0],
        external_pnl=external[1],
    )


async def series_performance(
    pool: asyncpg.Pool, plog: PredictionLog, symbol: str, timeframe: str, since: datetime | None
) -> PerformanceOut:
    """GET /v1/performance: every (model version, variant) that served the series. 404 when nothing was ever
    logged for it."""
    if plog.buffer:
        try:  # what this process served a moment ago counts too
            await plog.flush()
        except Exception as exc:  # the counts are then a flush behind; the outcomes are unaffected
            log.warning("could not flush the prediction log before a performance read", extra={"error": str(exc)})
    if not await repository.series_has_predictions(pool, symbol, timeframe):
        raise NotFoundError(
            f"no predictions logged for {symbol} {timeframe}: nothing to measure yet (ask for a signal first, or "
            "check the symbol and timeframe)"
        )
    counts = await repository.prediction_counts(pool, symbol, timeframe, since)
    outcomes = await repository.series_outcomes(pool, symbol, timeframe, since)
    external = await repository.external_outcome_totals(pool, symbol, timeframe, since)
    grouped: dict[tuple[str, str], list[asyncpg.Record]] = {}
    for r in outcomes:
        grouped.setdefault((r["model_version"], r["variant"]), []).append(r)
    keys = sorted(set(counts) | set(grouped) | set(external), key=lambda k: (k[0], VARIANT_ORDER.get(k[1], 9), k[1]))
    return PerformanceOut(
        symbol=symbol,
        timeframe=timeframe,
        since=since,
        versions=[
            summarise(
                v,
                variant,
                grouped.get((v, variant), []),
                counts.get((v, variant), 0),
                external.get((v, variant), (0, None)),
            )
            for v, variant in keys
            if variant in VARIANT_ORDER
        ],
    )


# --- external outcomes ----------------------------------------------------------------------------------------


def _outcome_out(row: asyncpg.Record, series: asyncpg.Record) -> OutcomeOut:
    detail = orjson.loads(row["detail"])
    return OutcomeOut(
        prediction_id=str(row["prediction_id"]),
        symbol=series["symbol"],
        timeframe=series["timeframe"],
        model_version=series["model_version"],
        variant=series["variant"],
        pnl=row["pnl"],
        detail=detail if isinstance(detail, dict) else {},
        recorded_by=row["recorded_by"],
        recorded_at=row["recorded_at"],
    )


async def record_outcome(
    pool: asyncpg.Pool, plog: PredictionLog, body: OutcomeIn, actor: str
) -> tuple[OutcomeOut, bool]:
    """Store a client's outcome for a prediction with its audit row, in one transaction. Returns (the stored
    outcome, whether this call created it). The same body again returns the stored row; a different one is a
    409: an outcome, once recorded, is not rewritten."""
    pid = str(body.prediction_id)
    if plog.find(uuid.UUID(pid)) is not None:
        await plog.flush()  # served moments ago and still buffered: write it so that it can be found
    detail: dict[str, Any] = body.detail or {}
    async with pool.acquire() as conn:
        series = await repository.prediction_series(conn, pid)
        if series is None:
            raise NotFoundError(f"no prediction {pid}: record outcomes for the prediction_id of a served prediction")
        async with conn.transaction():
            row = await repository.insert_external_outcome(conn, pid, body.pnl, detail, actor)
            if row is not None:
                await audit.record(
                    conn,
                    actor=actor,
                    action="outcome.record",
                    symbol=series["symbol"],
                    timeframe=series["timeframe"],
                    target=f"prediction:{pid}",
                    after={"pnl": body.pnl, "detail": detail, "model_version": series["model_version"]},
                )
                return _outcome_out(row, series), True
        existing = await repository.get_external_outcome(conn, pid)
    assert existing is not None
    stored = _outcome_out(existing, series)
    if stored.pnl != body.pnl or stored.detail != orjson.loads(orjson.dumps(detail)):
        raise ConflictError(
            f"an outcome for prediction {pid} was already recorded by {stored.recorded_by} at "
            f"{stored.recorded_at.isoformat()} (pnl {stored.pnl}); outcomes are not rewritten: send the same body "
            "to read it back"
        )
    return stored, False


# --- gauges ---------------------------------------------------------------------------------------------------


class PerformanceGauges:
    """ml_model_accuracy / _brier / _pnl {model_version} and ml_model_settled_bars {model_version, variant} of the
    versions that serve (production or candidate), refreshed from bar_outcomes by a background loop."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._versions: set[str] = set()
        self._variants: set[tuple[str, str]] = set()
        self.refreshed = 0  # completed refreshes; tests wait on it

    async def refresh(self) -> None:
        per_version, per_variant = await repository.outcome_gauges(self.pool)
        versions: set[str] = set()
        for r in per_version:
            v, bars = r["model_version"], int(r["bars"])
            versions.add(v)
            MODEL_ACCURACY.labels(v).set(int(r["hits"]) / bars)
            MODEL_BRIER.labels(v).set(float(r["brier"]))
            MODEL_PNL.labels(v).set(float(r["pnl"]))
        variants: set[tuple[str, str]] = set()
        for r in per_variant:
            key = (r["model_version"], r["variant"])
            variants.add(key)
            MODEL_SETTLED_BARS.labels(*key).set(int(r["bars"]))
        # A retired version's series go away instead of repeating their last value.
        for v in self._versions - versions:
            for gauge in (MODEL_ACCURACY, MODEL_BRIER, MODEL_PNL):
                gauge.remove(v)
        for key in self._variants - variants:
            MODEL_SETTLED_BARS.remove(*key)
        self._versions, self._variants = versions, variants
        self.refreshed += 1
