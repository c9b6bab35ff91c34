"""The automatic decision (beat task `trainer.judge_rollouts`, docs/LIFECYCLE.md): for every series whose
rollout has a candidate, pair the candidate's settled outcomes with the production version's on the same bars,
run the sequential test (services/trainer/sequential.py) and act on it.

- Policy `canary`: "promote" makes the candidate production (lifecycle.promote, audit `model.promote` plus a
  `rollout.decision` row naming the evaluation); "rollback" archives it and clears the rollout's candidate
  (lifecycle.reject_candidate, audit `rollout.reject` plus `rollout.decision`).
- Policy `manual` (and `direct`, whose candidate an admin placed, or one placed before the policy changed): the
  evaluation is stored and reported, never acted on; an admin decides.

Every run stores one rollout_evaluations row per series judged, whatever it decided, with the evidence. A run
holds a per-series advisory lock for its transaction, so two overlapping beats never judge (or act on) one
series twice; the one that finds the lock taken skips the series and says so.

Pairs: the candidate's outcomes (variant candidate or shadow, one per bar) settled since it last entered the
rollout, joined with the production version's production-variant outcome of the same bar. Each model's log
loss is taken against its own realised label. With a label horizon above one bar, consecutive outcomes
overlap in time (their returns share bars) and their d values are correlated; the judge then keeps only pairs
whose outcome windows do not overlap (each at least `horizon` bars after the last one kept), the independence
the test's variance assumes.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np
from numpy.typing import NDArray

from services.trainer import lifecycle
from services.trainer import repository as repo
from services.trainer.sequential import Evaluation, SequentialParams, evaluate, log_loss
from services.trainer.settings import TrainerSettings
from shared import audit
from shared.db import require_database_url
from shared.errors import AppError
from shared.model_metadata import CLASSES
from shared.rollouts import Rollout
from shared.timeframes import Timeframe

log = logging.getLogger("trainer.judge")

_LABEL_INDEX = {name: i for i, name in enumerate(CLASSES)}


def params_from(settings: TrainerSettings) -> SequentialParams:
    return SequentialParams(
        alpha=settings.trainer_judge_alpha,
        min_pairs=settings.trainer_judge_min_pairs,
        max_error_rate=settings.trainer_judge_max_error_rate,
    )


def pairs_to_arrays(
    rows: list[asyncpg.Record], timeframe: str
) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_], dict[str, Any]]:
    """d, wrong-way and directional flags of the pairs used (non-overlapping outcome windows), in bar order,
    and what was dropped."""
    step = Timeframe(timeframe).seconds
    kept: list[asyncpg.Record] = []
    next_free: float | None = None
    for r in rows:
        ts = r["bar_ts"].timestamp()
        if next_free is not None and ts < next_free:
            continue
        kept.append(r)
        next_free = ts + max(int(r["c_horizon"]), int(r["p_horizon"])) * step
    info = {"pairs_settled": len(rows), "pairs_used": len(kept)}
    if not kept:
        empty = np.zeros(0)
        return empty, empty.astype(bool), empty.astype(bool), info
    c_prob = np.array([list(r["c_probabilities"]) for r in kept], dtype=np.float64)
    p_prob = np.array([list(r["p_probabilities"]) for r in kept], dtype=np.float64)
    c_label = np.array([_LABEL_INDEX[r["c_label"]] for r in kept])
    p_label = np.array([_LABEL_INDEX[r["p_label"]] for r in kept])
    d = log_loss(c_prob, c_label) - log_loss(p_prob, p_label)
    signal = np.array([r["c_signal"] for r in kept])
    ret = np.array([r["c_return"] for r in kept], dtype=np.float64)
    directional = signal != "HOLD"
    wrong = ((signal == "BUY") & (ret < 0)) | ((signal == "SELL") & (ret > 0))
    info["first_bar"] = kept[0]["bar_ts"].isoformat()
    info["last_bar"] = kept[-1]["bar_ts"].isoformat()
    return d, wrong, directional, info


async def judge_series(conn: asyncpg.Connection, rollout: Rollout, settings: TrainerSettings) -> dict[str, Any]:
    """Judge one series in one transaction; returns what happened (also when nothing could be judged)."""
    symbol, timeframe = rollout.symbol, rollout.timeframe
    out: dict[str, Any] = {"symbol": symbol, "timeframe": timeframe}
    async with conn.transaction():
        if not await repo.try_lock_judge(conn, symbol, timeframe):
            return {**out, "skipped": "another judge run holds this series"}
        row = await repo.get_rollout_row(conn, symbol, timeframe)  # re-read: an overlapping run may have acted
        if row is None or row.candidate_model_id is None:
            return {**out, "skipped": "the rollout no longer has a candidate"}
        candidate = await repo.get_version(conn, row.candidate_model_id)
        production = await repo.production_version(conn, symbol, timeframe)
        if candidate is None or candidate.status != "candidate":
            status = candidate.status if candidate else "missing"
            return {**out, "skipped": f"the rollout's candidate {row.candidate_model_id} is {status}, not a candidate"}
        if production is None:
            return {**out, "skipped": "the series has no production version to compare with"}
        entered: datetime = (
            await repo.candidate_entered_at(conn, symbol, timeframe, candidate.id) or candidate.created_at
        )
        rows = await repo.paired_outcomes(conn, symbol, timeframe, candidate.version, production.version, entered)
        d, wrong, directional, info = pairs_to_arrays(rows, timeframe)
        result: Evaluation = evaluate(d, wrong, directional, params_from(settings))
        acts = row.policy == "canary"
        evidence: dict[str, Any] = {
            **result.evidence(),
            **info,
            "policy": row.policy,
            "candidate_model_id": candidate.id,
            "production_model_id": production.id,
            "candidate_since": entered.isoformat(),
            "acted": acts and result.decision in ("promote", "rollback"),
        }
        if not acts and result.decision in ("promote", "rollback"):
            evidence["note"] = f"policy {row.policy}: the decision is reported, never acted on; an admin decides"
        if evidence["acted"]:
            try:
                if result.decision == "promote":
                    await lifecycle.promote(
                        conn, candidate.id, actor=audit.SYSTEM, reason=result.reason, evidence=evidence
                    )
                else:
                    await lifecycle.reject_candidate(
                        conn, symbol, timeframe, actor=audit.SYSTEM, reason=result.reason, evidence=evidence
                    )
            except AppError as exc:  # e.g. an admin archived the candidate between our read and the change
                log.warning("%s %s: %s not applied: %s", symbol, timeframe, result.decision, exc.message)
                evidence.update(acted=False, action_error=exc.message)
        evaluation_id = await repo.insert_rollout_evaluation(
            conn,
            symbol=symbol,
            timeframe=timeframe,
            candidate_version=candidate.version,
            production_version=production.version,
            decision=result.decision,
            pairs=result.n,
            evidence=evidence,
        )
        if evidence["acted"]:
            # The automatic decision itself, next to the change it made (model.promote / rollout.reject).
            await audit.record(
                conn,
                actor=audit.SYSTEM,
                action="rollout.decision",
                symbol=symbol,
                timeframe=timeframe,
                target=f"model_version:{candidate.id}",
                before={"production": production.version, "candidate": candidate.version},
                after={
                    "decision": result.decision,
                    "production": (candidate.version if result.decision == "promote" else production.version),
                },
                evidence={**evidence, "evaluation_id": evaluation_id},
            )
        out.update(
            evaluation_id=evaluation_id,
            candidate=candidate.version,
            production=production.version,
            decision=result.decision,
            pairs=result.n,
            acted=evidence["acted"],
            reason=result.reason,
        )
        if "action_error" in evidence:
            out["error"] = evidence["action_error"]
    log.info("%s %s: %s %s (%s)", symbol, timeframe, result.decision, candidate.version, result.reason)
    return out


async def judge_all(conn: asyncpg.Connection, settings: TrainerSettings) -> dict[str, Any]:
    series = []
    for rollout in await repo.rollouts_with_candidate(conn):
        try:
            series.append(await judge_series(conn, rollout, settings))
        except Exception as exc:  # one series' failure must not stop the others, run after run
            log.exception("judging %s %s failed; the other series go on", rollout.symbol, rollout.timeframe)
            series.append({"symbol": rollout.symbol, "timeframe": rollout.timeframe, "error": str(exc)})
    return {"series": series}


def run_judge(settings: TrainerSettings) -> dict[str, Any]:
    """The beat task's body: judge every series with a candidate, on a connection of its own."""

    async def go() -> dict[str, Any]:
        conn = await asyncpg.connect(
            require_database_url(settings), timeout=10, server_settings={"application_name": "aicash-trainer-judge"}
        )
        try:
            return await judge_all(conn, settings)
        finally:
            await conn.close()

    return asyncio.run(go())
