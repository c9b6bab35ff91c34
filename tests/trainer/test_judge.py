"""The automatic decision (services/trainer/judge.py) on real PostgreSQL: planted settled outcomes of a worse
candidate roll it back, of a better one promote it, too few pairs decide nothing; a manual rollout is only
reported; two overlapping runs act once. The beat task's own entry point (run_judge) is what runs.

Versions are registry rows with made-up artifacts; outcomes are bar_outcomes rows as settlement writes them,
with probabilities from skilled or unskilled simulated models on labels drawn from known class probabilities.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import numpy as np
import pytest
from numpy.typing import NDArray

from services.trainer import lifecycle
from services.trainer import repository as repo
from services.trainer.judge import judge_series, pairs_to_arrays, run_judge
from services.trainer.schemas import ModelVersion
from services.trainer.settings import TrainerSettings
from services.trainer.settlement import Outcome, insert_outcomes
from shared.model_metadata import CLASSES
from tests.support.registry import TF, pass_gate, register_version, series_symbol

START = datetime(2026, 1, 5, tzinfo=UTC)


@pytest.fixture
def symbol() -> str:
    return series_symbol("JD")


async def register(conn: asyncpg.Connection, symbol: str, n: int) -> ModelVersion:
    """A registered version whose gate passed."""
    return await pass_gate(conn, await register_version(conn, symbol, n))


async def rollout_series(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings, policy: str = "canary"
) -> tuple[ModelVersion, ModelVersion]:
    """A production version and a candidate in the series' rollout (placed by an admin: audit rollout.update)."""
    prod = await register(conn, symbol, 1)
    cand = await register(conn, symbol, 2)
    assert (prod.status, cand.status) == ("production", "candidate")
    await lifecycle.update_rollout(
        conn,
        symbol,
        TF,
        {"policy": policy, "candidate_model_id": cand.id, "candidate_traffic_percent": 10.0, "shadow": True},
        actor="admin-key",
        settings=settings,
    )
    return prod, cand


def _model_rows(
    rng: np.random.Generator, q: NDArray[np.float64], y: NDArray[np.int64], up: NDArray[np.bool_], skill: float
) -> list[tuple[Any, ...]]:
    """(probabilities, signal, confidence, realised_label, log_return, hit) per bar of a model of this skill."""
    noise = rng.dirichlet([0.7, 0.7, 0.7], len(y))
    p = skill * q + (1 - skill) * noise
    out = []
    for i in range(len(y)):
        sig = int(p[i].argmax())
        ret = 0.004 if up[i] else -0.004
        out.append(
            ([float(x) for x in p[i]], CLASSES[sig], float(p[i].max()), CLASSES[int(y[i])], ret, bool(sig == y[i]))
        )
    return out


async def plant(
    conn: asyncpg.Connection,
    symbol: str,
    prod: ModelVersion,
    cand: ModelVersion,
    *,
    bars: int,
    prod_skill: float,
    cand_skill: float,
    seed: int,
) -> int:
    """Settled outcomes of both versions on `bars` bars (the candidate's as shadow, and on every 7th bar also as
    candidate: one pair per bar all the same), plus noise the judge must ignore. Returns the pairs planted."""
    rng = np.random.default_rng(seed)
    q = rng.dirichlet([2.0, 2.0, 2.0], bars)
    y = (rng.random(bars)[:, None] > np.cumsum(q, axis=1)).sum(1).clip(0, 2)
    up = np.where(y == 2, True, np.where(y == 0, False, rng.random(bars) < 0.5))
    prod_rows = _model_rows(rng, q, y, up, prod_skill)
    cand_rows = _model_rows(rng, q, y, up, cand_skill)
    records = []

    def rec(version: str, variant: str, ts: datetime, r: tuple[Any, ...]) -> Outcome:
        probs, sig, conf, label, ret, hit = r
        return Outcome(uuid.uuid4(), version, variant, ts, probs, sig, conf, 1, ret, label, hit, 0.0)

    for i in range(bars):
        ts = START + timedelta(hours=i)
        records.append(rec(prod.version, "production", ts, prod_rows[i]))
        records.append(rec(cand.version, "shadow", ts, cand_rows[i]))
        if i % 7 == 0:
            records.append(rec(cand.version, "candidate", ts, cand_rows[i]))
    # Not pairs: production's own bars after the candidate's last, and an unrelated version's outcomes.
    for i in range(bars, bars + 20):
        records.append(rec(prod.version, "production", START + timedelta(hours=i), prod_rows[i % bars]))
        records.append(rec("someone-else", "production", START + timedelta(hours=i), prod_rows[i % bars]))
    # Written as settlement writes them (a key already settled would be kept; none is here).
    assert await insert_outcomes(conn, symbol, TF, records) == len(records)
    return bars


def _mine(result: dict[str, Any], symbol: str) -> list[dict[str, Any]]:
    return [s for s in result["series"] if s["symbol"] == symbol]


async def _judge(settings: TrainerSettings, symbol: str) -> dict[str, Any] | None:
    """Run the beat task's body (its own event loop, in a thread) and return this series' entry."""
    mine = _mine(await asyncio.to_thread(run_judge, settings), symbol)
    assert len(mine) <= 1
    return mine[0] if mine else None


async def _audit(conn: asyncpg.Connection, symbol: str) -> list[Any]:
    return list(reversed(await repo.list_audit(conn, symbol=symbol, limit=100)))


async def test_worse_candidate_is_rolled_back_with_evidence(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    prod, cand = await rollout_series(conn, symbol, settings)
    pairs = await plant(conn, symbol, prod, cand, bars=400, prod_skill=0.8, cand_skill=0.0, seed=1)
    got = await _judge(settings, symbol)
    assert got is not None
    assert got["decision"] == "rollback" and got["acted"] is True and got["pairs"] == pairs, got
    c = await repo.get_version(conn, cand.id)
    p = await repo.get_version(conn, prod.id)
    assert c is not None and p is not None
    assert c.status == "archived" and c.rolled_back_at is not None
    assert any("significantly worse" in r for r in c.quality.reasons)
    assert p.status == "production"
    rollout = await repo.get_rollout_row(conn, symbol, TF)
    assert rollout is not None and rollout.candidate_model_id is None and rollout.candidate_traffic_percent == 0
    evals = await repo.list_rollout_evaluations(conn, symbol, TF)
    assert [e["decision"] for e in evals] == ["rollback"]
    ev = evals[0]["evidence"]
    assert evals[0]["pairs"] == pairs and ev["n"] == pairs and ev["pairs_settled"] == pairs
    assert ev["mean"] > 0 and ev["lower"] > 0 and ev["sum_d"] >= ev["boundary"]
    rows = await _audit(conn, symbol)
    reject = [r for r in rows if r.action == "rollout.reject"]
    decision = [r for r in rows if r.action == "rollout.decision"]
    assert len(reject) == 1 and reject[0].actor == "system" and reject[0].target == f"model_version:{cand.id}"
    assert reject[0].evidence["n"] == pairs and reject[0].evidence["decision"] == "rollback"
    assert len(decision) == 1 and decision[0].evidence["evaluation_id"] == evals[0]["id"]
    # Idempotent: the next run finds no candidate and writes nothing more.
    assert await _judge(settings, symbol) is None
    assert len(await repo.list_rollout_evaluations(conn, symbol, TF)) == 1


async def test_better_candidate_is_promoted(conn: asyncpg.Connection, symbol: str, settings: TrainerSettings) -> None:
    prod, cand = await rollout_series(conn, symbol, settings)
    pairs = await plant(conn, symbol, prod, cand, bars=400, prod_skill=0.0, cand_skill=0.8, seed=2)
    got = await _judge(settings, symbol)
    assert got is not None and got["decision"] == "promote" and got["acted"] is True, got
    c = await repo.get_version(conn, cand.id)
    p = await repo.get_version(conn, prod.id)
    assert c is not None and p is not None
    assert c.status == "production" and p.status == "archived" and p.rolled_back_at is None
    rollout = await repo.get_rollout_row(conn, symbol, TF)
    assert rollout is not None and rollout.candidate_model_id is None
    evals = await repo.list_rollout_evaluations(conn, symbol, TF)
    assert [e["decision"] for e in evals] == ["promote"]
    assert evals[0]["evidence"]["upper"] < 0 and evals[0]["pairs"] == pairs
    promote = [r for r in await _audit(conn, symbol) if r.action == "model.promote"]
    assert len(promote) == 1 and promote[0].actor == "system"
    assert promote[0].evidence["decision"] == "promote" and "significantly better" in promote[0].evidence["reason"]


async def test_below_min_pairs_nothing_changes(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    prod, cand = await rollout_series(conn, symbol, settings)
    pairs = settings.trainer_judge_min_pairs - 1
    await plant(conn, symbol, prod, cand, bars=pairs, prod_skill=0.0, cand_skill=0.9, seed=3)
    before = await _audit(conn, symbol)
    for _ in range(2):  # every run stores its evaluation, and acts on nothing
        got = await _judge(settings, symbol)
        assert got is not None and got["decision"] == "insufficient" and got["acted"] is False
    evals = await repo.list_rollout_evaluations(conn, symbol, TF)
    assert [e["decision"] for e in evals] == ["insufficient", "insufficient"]
    assert all(e["pairs"] == pairs for e in evals)
    c = await repo.get_version(conn, cand.id)
    assert c is not None and c.status == "candidate"
    rollout = await repo.get_rollout_row(conn, symbol, TF)
    assert rollout is not None and rollout.candidate_model_id == cand.id
    assert len(await _audit(conn, symbol)) == len(before)


async def test_only_outcomes_settled_since_the_candidate_entered_count(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    prod, cand = await rollout_series(conn, symbol, settings)
    await plant(conn, symbol, prod, cand, bars=400, prod_skill=0.8, cand_skill=0.0, seed=6)
    # An admin takes the candidate out and puts it back: its earlier outcomes are from another rollout.
    for candidate in (None, cand.id):
        await lifecycle.update_rollout(
            conn, symbol, TF, {"candidate_model_id": candidate}, actor="admin-key", settings=settings
        )
    got = await _judge(settings, symbol)
    assert got is not None and got["decision"] == "insufficient" and got["pairs"] == 0, got
    c = await repo.get_version(conn, cand.id)
    assert c is not None and c.status == "candidate"


async def test_manual_policy_is_reported_never_acted_on(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    prod, cand = await rollout_series(conn, symbol, settings, policy="manual")
    await plant(conn, symbol, prod, cand, bars=400, prod_skill=0.0, cand_skill=0.8, seed=4)
    got = await _judge(settings, symbol)
    assert got is not None and got["decision"] == "promote" and got["acted"] is False
    evals = await repo.list_rollout_evaluations(conn, symbol, TF)
    assert "never acted on" in evals[0]["evidence"]["note"]
    c = await repo.get_version(conn, cand.id)
    assert c is not None and c.status == "candidate"
    assert not [r for r in await _audit(conn, symbol) if r.action in ("model.promote", "rollout.decision")]


async def test_overlapping_runs_act_once(
    conn: asyncpg.Connection, database_url: str, symbol: str, settings: TrainerSettings
) -> None:
    prod, cand = await rollout_series(conn, symbol, settings)
    await plant(conn, symbol, prod, cand, bars=400, prod_skill=0.8, cand_skill=0.0, seed=5)
    rollout = await repo.get_rollout_row(conn, symbol, TF)
    assert rollout is not None
    others = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        # One run holds the series' judge lock inside an open transaction while the other tries.
        holder = others[0]
        tx = holder.transaction()
        await tx.start()
        assert await repo.try_lock_judge(holder, symbol, TF)
        blocked = await judge_series(others[1], rollout, settings)
        assert blocked["skipped"] == "another judge run holds this series"
        await tx.rollback()
        results = await asyncio.gather(*(judge_series(c, rollout, settings) for c in others))
    finally:
        for c in others:
            await c.close()
    acted = [r for r in results if r.get("acted")]
    assert len(acted) == 1 and acted[0]["decision"] == "rollback"
    assert all("skipped" in r for r in results if not r.get("acted")), results
    assert len([r for r in await _audit(conn, symbol) if r.action == "rollout.reject"]) == 1
    assert len(await repo.list_rollout_evaluations(conn, symbol, TF)) == 1


def test_overlapping_outcome_windows_are_thinned() -> None:
    """Horizon 3 on H1 bars: only pairs at least 3 bars apart are independent enough to count."""

    def row(hour: int, horizon: int) -> dict[str, Any]:
        return {
            "bar_ts": START + timedelta(hours=hour),
            "c_probabilities": [0.2, 0.3, 0.5],
            "p_probabilities": [0.3, 0.4, 0.3],
            "c_label": "BUY",
            "p_label": "BUY",
            "c_signal": "BUY",
            "c_return": -0.01,
            "c_horizon": horizon,
            "p_horizon": 1,
        }

    rows: Any = [row(h, 3) for h in (0, 1, 2, 3, 4, 7, 8, 11)]
    d, wrong, directional, info = pairs_to_arrays(rows, TF)
    assert info["pairs_settled"] == 8 and info["pairs_used"] == 4  # hours 0, 3, 7, 11
    assert d == pytest.approx([np.log(0.3) - np.log(0.5)] * 4)
    assert wrong.all() and directional.all()
