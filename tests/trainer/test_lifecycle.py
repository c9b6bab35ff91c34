"""The lifecycle control plane (services/trainer/lifecycle.py) on real PostgreSQL: promotion, rollback, rejection of
a candidate, the rollout policy after the gate, rollout changes, and the audit row each writes in its transaction.

Versions are registry rows with made-up artifacts (nothing here loads a model): what is tested is the registry's
state machine and its audit trail, not training."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from services.trainer import lifecycle
from services.trainer import repository as repo
from services.trainer.schemas import ModelVersion
from services.trainer.settings import TrainerSettings
from shared.errors import ConflictError, NotFoundError, ValidationFailed
from tests.support.registry import TF, pass_gate, register_version, series_symbol


@pytest.fixture
def symbol() -> str:
    return series_symbol("LC")


async def status(conn: asyncpg.Connection, v: ModelVersion) -> str:
    got = await repo.get_version(conn, v.id)
    assert got is not None
    return got.status


async def audit_rows(conn: asyncpg.Connection, symbol: str) -> list[dict[str, Any]]:
    rows = await repo.list_audit(conn, symbol=symbol, limit=1000)
    return [r.model_dump() for r in reversed(rows)]  # oldest first


# --- promote ---------------------------------------------------------------------------------------------------


async def test_promote_archives_the_old_production_and_audits_before_and_after(
    conn: asyncpg.Connection, symbol: str
) -> None:
    v1 = await register_version(conn, symbol, 1)
    v2 = await register_version(conn, symbol, 2)
    assert (v1.status, v2.status) == ("production", "candidate")
    promoted = await lifecycle.promote(conn, v2.id, actor="admin", reason="looks better", evidence={"ticket": 7})
    assert promoted.status == "production" and promoted.promoted_at is not None
    old = await repo.get_version(conn, v1.id)
    assert old is not None and old.status == "archived" and old.retired_at is not None
    assert old.rolled_back_at is None
    (row,) = [r for r in await audit_rows(conn, symbol) if r["action"] == "model.promote"]
    assert row["actor"] == "admin" and row["target"] == f"model_version:{v2.id}"
    assert row["before"]["production"]["id"] == v1.id and row["before"]["promoted"]["status"] == "candidate"
    assert row["after"]["production"]["id"] == v2.id and row["after"]["archived"]["status"] == "archived"
    assert row["evidence"] == {"reason": "looks better", "ticket": 7}


async def test_an_admins_promotion_keeps_the_failed_verdict_and_says_an_admin_promoted_it(
    conn: asyncpg.Connection, symbol: str
) -> None:
    await register_version(conn, symbol, 1)
    v2 = await register_version(conn, symbol, 2)
    await repo.set_quality(conn, v2.id, {"gate": "failed", "reasons": ["log loss not below the baseline's"]})
    promoted = await lifecycle.promote_by_admin(conn, v2.id, actor="admin", reason=None)
    assert promoted.status == "production" and promoted.quality.gate == "failed"
    assert promoted.quality.reasons == ["log loss not below the baseline's", lifecycle.ADMIN_NOTE]
    (row,) = await audit_rows(conn, symbol)
    assert row["evidence"] == {"reason": "promoted by an admin"}


async def test_promote_unknown_failed_and_archived_are_refused_with_what_to_do(
    conn: asyncpg.Connection, symbol: str
) -> None:
    with pytest.raises(NotFoundError, match="no model version with id 987654321"):
        await lifecycle.promote(conn, 987654321, actor="admin", reason=None)
    await register_version(conn, symbol, 1)
    failed = await register_version(conn, symbol, 2)
    await repo.set_status(conn, failed.id, "failed")
    with pytest.raises(ConflictError, match="failed and cannot serve; train a new version"):
        await lifecycle.promote(conn, failed.id, actor="admin", reason=None)
    archived = await register_version(conn, symbol, 3)
    await repo.set_status(conn, archived.id, "archived")
    with pytest.raises(ConflictError, match=rf"archived .*POST /v1/models/{symbol}/{TF}/rollback"):
        await lifecycle.promote(conn, archived.id, actor="admin", reason=None)
    assert [r["action"] for r in await audit_rows(conn, symbol)] == []  # refusals change nothing


async def test_promoting_the_production_version_again_changes_nothing(conn: asyncpg.Connection, symbol: str) -> None:
    v1 = await register_version(conn, symbol, 1)
    again = await lifecycle.promote(conn, v1.id, actor="admin", reason=None)
    assert again.status == "production" and again.promoted_at == v1.promoted_at
    assert await audit_rows(conn, symbol) == []


async def test_promoting_the_rollouts_candidate_takes_it_out_of_the_rollout(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    await register_version(conn, symbol, 1)
    v2 = await register_version(conn, symbol, 2)
    await lifecycle.update_rollout(
        conn, symbol, TF, {"candidate_model_id": v2.id, "candidate_traffic_percent": 25}, actor="a", settings=settings
    )
    await lifecycle.promote(conn, v2.id, actor="admin", reason=None)
    r = await lifecycle.get_rollout(conn, symbol, TF, settings)
    assert r.candidate_model_id is None and r.candidate_traffic_percent == 0
    row = [x for x in await audit_rows(conn, symbol) if x["action"] == "model.promote"][0]
    assert row["before"]["rollout"]["candidate_model_id"] == v2.id
    assert row["after"]["rollout"]["candidate_model_id"] is None


# --- rollback --------------------------------------------------------------------------------------------------


async def test_rollback_returns_to_the_previous_production_then_one_further_never_forth(
    conn: asyncpg.Connection, symbol: str
) -> None:
    v1 = await register_version(conn, symbol, 1)
    v2 = await register_version(conn, symbol, 2)
    v3 = await register_version(conn, symbol, 3)
    await lifecycle.promote(conn, v2.id, actor="admin", reason=None)
    await lifecycle.promote(conn, v3.id, actor="admin", reason=None)

    back = await lifecycle.rollback(conn, symbol, TF, actor="admin", reason="v3 is bad")
    assert back.id == v2.id and back.status == "production"
    gone = await repo.get_version(conn, v3.id)
    assert gone is not None and gone.status == "archived" and gone.rolled_back_at is not None

    # Again: v3 was rolled back and is out of reach, so the next one back is v1.
    back = await lifecycle.rollback(conn, symbol, TF, actor="admin", reason=None)
    assert back.id == v1.id
    assert (await status(conn, v2), await status(conn, v3)) == ("archived", "archived")

    # Nothing served before v1: a third rollback is refused, and nothing changes.
    with pytest.raises(ConflictError, match="no previous production version.*promote a version instead"):
        await lifecycle.rollback(conn, symbol, TF, actor="admin", reason=None)
    assert await status(conn, v1) == "production"

    rows = [r for r in await audit_rows(conn, symbol) if r["action"] == "model.rollback"]
    assert [(r["before"]["production"]["id"], r["after"]["production"]["id"]) for r in rows] == [
        (v3.id, v2.id),
        (v2.id, v1.id),
    ]
    assert rows[0]["evidence"] == {"reason": "v3 is bad"} and rows[0]["after"]["rolled_back"]["id"] == v3.id


async def test_rollback_skips_a_candidate_that_never_served(conn: asyncpg.Connection, symbol: str) -> None:
    v1 = await register_version(conn, symbol, 1)
    never = await register_version(conn, symbol, 2)
    await repo.set_status(conn, never.id, "archived")  # archived without serving: promoted_at stays NULL
    v3 = await register_version(conn, symbol, 3)
    await lifecycle.promote(conn, v3.id, actor="admin", reason=None)
    assert (await lifecycle.rollback(conn, symbol, TF, actor="admin", reason=None)).id == v1.id


async def test_rollback_without_any_production_or_previous_version_is_409(
    conn: asyncpg.Connection, symbol: str
) -> None:
    with pytest.raises(ConflictError, match="no production version.*promote a version instead"):
        await lifecycle.rollback(conn, symbol, TF, actor="admin", reason=None)
    await register_version(conn, symbol, 1)
    with pytest.raises(ConflictError, match="no previous production version"):
        await lifecycle.rollback(conn, symbol, TF, actor="admin", reason=None)


async def test_exactly_one_production_version_under_concurrent_promotions(
    database_url: str, conn: asyncpg.Connection, symbol: str
) -> None:
    import asyncio

    await register_version(conn, symbol, 0)
    versions = [await register_version(conn, symbol, n) for n in range(1, 7)]
    conns = [await asyncpg.connect(database_url) for _ in versions]
    try:
        await asyncio.gather(
            *(lifecycle.promote(c, v.id, actor="admin", reason=None) for c, v in zip(conns, versions, strict=True))
        )
    finally:
        for c in conns:
            await c.close()
    statuses = [v.status for v in await repo.list_versions(conn, symbol, TF)]
    assert statuses.count("production") == 1 and statuses.count("archived") == 6


# --- the rollout: defaults, changes, bad input -------------------------------------------------------------------


async def test_a_series_without_a_row_has_the_default_rollout(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    r = await lifecycle.get_rollout(conn, symbol, TF, settings)
    assert r.policy == settings.trainer_rollout_default_policy == "canary"
    assert (r.candidate_model_id, r.candidate_traffic_percent, r.shadow, r.updated_at) == (None, 0, False, None)


async def test_update_rollout_changes_only_the_fields_given_and_audits_them(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    await register_version(conn, symbol, 1)
    v2 = await register_version(conn, symbol, 2)
    r = await lifecycle.update_rollout(
        conn,
        symbol,
        TF,
        {"candidate_model_id": v2.id, "candidate_traffic_percent": 20, "test_group_user_ids": ["u1", "u2", "u1"]},
        actor="admin",
        settings=settings,
    )
    assert (r.candidate_model_id, r.candidate_traffic_percent, r.test_group_user_ids) == (v2.id, 20, ["u1", "u2"])
    r = await lifecycle.update_rollout(conn, symbol, TF, {"shadow": True}, actor="ops", settings=settings)
    assert (r.candidate_model_id, r.candidate_traffic_percent, r.test_group_user_ids, r.shadow) == (
        v2.id,
        20,
        ["u1", "u2"],
        True,
    )
    assert r.updated_by == "ops" and r.policy == "canary"
    r = await lifecycle.update_rollout(conn, symbol, TF, {"candidate_model_id": None}, actor="ops", settings=settings)
    assert r.candidate_model_id is None and r.shadow is True and r.candidate_traffic_percent == 20
    rows = [x for x in await audit_rows(conn, symbol) if x["action"] == "rollout.update"]
    assert len(rows) == 3
    assert rows[0]["before"] is None and rows[0]["after"]["candidate_model_id"] == v2.id
    assert rows[1]["before"]["shadow"] is False and rows[1]["after"]["shadow"] is True
    assert rows[1]["evidence"] == {"fields": ["shadow"]} and rows[1]["actor"] == "ops"


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"candidate_traffic_percent": 100.5}, ValidationFailed, "outside 0..100"),
        ({"candidate_traffic_percent": -1}, ValidationFailed, "outside 0..100"),
        ({"candidate_traffic_percent": float("nan")}, ValidationFailed, "outside 0..100"),
        ({"policy": "yolo"}, ValidationFailed, "not one of direct, canary, manual"),
        ({"policy": None}, ValidationFailed, "may not be null: leave it out"),
        ({"colour": "red"}, ValidationFailed, "unknown rollout field"),
        ({"rollout_symbols": ["eur usd"]}, ValidationFailed, "bad symbol"),
        ({"candidate_model_id": 987654321}, NotFoundError, "no model version with id 987654321"),
    ],
)
async def test_bad_rollout_changes_are_refused_and_change_nothing(
    conn: asyncpg.Connection,
    symbol: str,
    settings: TrainerSettings,
    changes: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        await lifecycle.update_rollout(conn, symbol, TF, changes, actor="admin", settings=settings)
    assert await repo.get_rollout_row(conn, symbol, TF) is None
    assert await audit_rows(conn, symbol) == []


async def test_a_candidate_must_be_a_candidate_of_the_same_series(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    v1 = await register_version(conn, symbol, 1)
    other = await register_version(conn, symbol, 2, timeframe="D1")  # production of the D1 series
    other_cand = await register_version(conn, symbol, 3, timeframe="D1")
    with pytest.raises(ValidationFailed, match=f"belongs to {symbol} D1, not {symbol} {TF}"):
        await lifecycle.update_rollout(
            conn, symbol, TF, {"candidate_model_id": other_cand.id}, actor="a", settings=settings
        )
    with pytest.raises(ConflictError, match="already production"):
        await lifecycle.update_rollout(conn, symbol, TF, {"candidate_model_id": v1.id}, actor="a", settings=settings)
    del other
    failed = await register_version(conn, symbol, 4)
    await repo.set_status(conn, failed.id, "failed")
    with pytest.raises(ConflictError, match="failed and cannot serve; train a new version"):
        await lifecycle.update_rollout(
            conn, symbol, TF, {"candidate_model_id": failed.id}, actor="a", settings=settings
        )
    archived = await register_version(conn, symbol, 5)
    await repo.set_status(conn, archived.id, "archived")
    with pytest.raises(ConflictError, match="is archived"):
        await lifecycle.update_rollout(
            conn, symbol, TF, {"candidate_model_id": archived.id}, actor="a", settings=settings
        )
    assert await audit_rows(conn, symbol) == []


# --- reject_candidate ------------------------------------------------------------------------------------------


async def test_reject_candidate_archives_it_says_why_and_clears_the_rollout(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    v1 = await register_version(conn, symbol, 1)
    v2 = await register_version(conn, symbol, 2)
    await lifecycle.update_rollout(
        conn, symbol, TF, {"candidate_model_id": v2.id, "candidate_traffic_percent": 10}, actor="a", settings=settings
    )
    rejected = await lifecycle.reject_candidate(
        conn, symbol, TF, actor="system", reason="significantly worse log loss", evidence={"pairs": 250}
    )
    assert rejected.status == "archived" and rejected.rolled_back_at is not None and rejected.promoted_at is None
    assert "rolled back as candidate: significantly worse log loss" in rejected.quality.reasons
    r = await lifecycle.get_rollout(conn, symbol, TF, settings)
    assert r.candidate_model_id is None and r.candidate_traffic_percent == 0
    assert await status(conn, v1) == "production"
    row = [x for x in await audit_rows(conn, symbol) if x["action"] == "rollout.reject"][0]
    assert row["actor"] == "system" and row["evidence"] == {"reason": "significantly worse log loss", "pairs": 250}
    assert row["before"]["rollout"]["candidate_model_id"] == v2.id
    # A rejected candidate never served: no rollback reaches it, and a second reject has nothing to reject.
    with pytest.raises(ConflictError, match="no candidate in its rollout"):
        await lifecycle.reject_candidate(conn, symbol, TF, actor="system", reason=None)


# --- apply_policy (after the gate) -----------------------------------------------------------------------------


async def test_default_policy_canary_places_a_passing_candidate_at_the_canary_share_with_shadow(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    v1 = await register_version(conn, symbol, 1)
    v2 = await pass_gate(conn, await register_version(conn, symbol, 2))
    assert await lifecycle.apply_policy(conn, v2, settings) == "canary"
    r = await lifecycle.get_rollout(conn, symbol, TF, settings)
    assert r.policy == "canary" and r.candidate_model_id == v2.id
    assert r.candidate_traffic_percent == settings.trainer_canary_traffic_percent == 10
    assert r.shadow is settings.trainer_canary_shadow is True
    assert (await status(conn, v1), await status(conn, v2)) == ("production", "candidate")
    (row,) = await audit_rows(conn, symbol)
    assert (row["action"], row["actor"], row["target"]) == ("rollout.candidate", "system", f"model_version:{v2.id}")
    assert row["evidence"]["policy"] == "canary"
    assert row["evidence"]["policy_source"] == "TRAINER_ROLLOUT_DEFAULT_POLICY"
    assert row["evidence"]["gate"]["gate"] == "passed"

    # A newer passing candidate replaces it in the rollout; the older keeps its status but no longer routes.
    v3 = await pass_gate(conn, await register_version(conn, symbol, 3))
    assert await lifecycle.apply_policy(conn, v3, settings) == "canary"
    r = await lifecycle.get_rollout(conn, symbol, TF, settings)
    assert r.candidate_model_id == v3.id and await status(conn, v2) == "candidate"
    row = (await audit_rows(conn, symbol))[-1]
    assert row["evidence"]["replaced_candidate_model_id"] == v2.id
    assert "keeps status candidate but no longer routes" in row["evidence"]["replaced_candidate_note"]
    # Validated again: it stays the candidate at whatever traffic it has (no second audit row).
    await lifecycle.update_rollout(conn, symbol, TF, {"candidate_traffic_percent": 50}, actor="a", settings=settings)
    assert await lifecycle.apply_policy(conn, v3, settings) == "unchanged"
    assert (await lifecycle.get_rollout(conn, symbol, TF, settings)).candidate_traffic_percent == 50


async def test_manual_policy_places_the_candidate_at_zero_traffic(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    await register_version(conn, symbol, 1)
    await lifecycle.update_rollout(conn, symbol, TF, {"policy": "manual"}, actor="admin", settings=settings)
    v2 = await pass_gate(conn, await register_version(conn, symbol, 2))
    assert await lifecycle.apply_policy(conn, v2, settings) == "manual"
    r = await lifecycle.get_rollout(conn, symbol, TF, settings)
    assert (r.policy, r.candidate_model_id, r.candidate_traffic_percent, r.shadow) == ("manual", v2.id, 0, False)
    assert await status(conn, v2) == "candidate"
    row = (await audit_rows(conn, symbol))[-1]
    assert row["action"] == "rollout.candidate" and row["evidence"]["policy_source"] == "rollout"


async def test_direct_policy_promotes_the_passing_candidate(
    conn: asyncpg.Connection, symbol: str, settings: TrainerSettings
) -> None:
    v1 = await register_version(conn, symbol, 1)
    direct = settings.model_copy(update={"trainer_rollout_default_policy": "direct"})
    v2 = await pass_gate(conn, await register_version(conn, symbol, 2))
    assert await lifecycle.apply_policy(conn, v2, direct) == "promoted"
    assert (await status(conn, v1), await status(conn, v2)) == ("archived", "production")
    (row,) = await audit_rows(conn, symbol)
    assert (row["action"], row["actor"]) == ("model.promote", "system")
    assert row["evidence"]["policy"] == "direct" and "passed the promotion gate" in row["evidence"]["reason"]
    # The series' first version (production at registration) is skipped: there is nothing to place.
    assert await lifecycle.apply_policy(conn, v2, direct) == "skipped"


# --- the audit trail: same transaction, append-only ------------------------------------------------------------


async def test_a_change_that_fails_leaves_no_audit_row(conn: asyncpg.Connection, symbol: str) -> None:
    await register_version(conn, symbol, 1)
    v2 = await register_version(conn, symbol, 2)
    before = await conn.fetchval("SELECT count(*) FROM audit_log")

    class Boom(Exception):
        pass

    async def promote_then_fail() -> None:
        async with conn.transaction():
            await lifecycle.promote(conn, v2.id, actor="admin", reason=None)
            assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE symbol = $1", symbol) == 1
            raise Boom  # the caller's transaction fails after the promotion: both roll back

    with pytest.raises(Boom):
        await promote_then_fail()
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == before
    assert await status(conn, v2) == "candidate"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ],
)
async def test_the_audit_table_refuses_update_delete_and_truncate_even_for_the_superuser(
    conn: asyncpg.Connection, symbol: str, statement: str
) -> None:
    assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is True
    await register_version(conn, symbol, 1)
    v2 = await register_version(conn, symbol, 2)
    await lifecycle.promote(conn, v2.id, actor="admin", reason=None)
    count = await conn.fetchval("SELECT count(*) FROM audit_log")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="audit_log is append-only"):
        await conn.execute(statement)
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == count
    assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE actor = 'someone else'") == 0
