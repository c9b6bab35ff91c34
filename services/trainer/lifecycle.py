"""The lifecycle control plane (docs/LIFECYCLE.md): a series' rollout, promotion, rollback, the rejection of a
candidate and the rollout policy a gate-passing version follows.

Every function runs in one transaction on the caller's connection (a savepoint when the caller already holds a
transaction), takes the series' advisory lock (the key of repository.register_version, so the one-production
index can never be raced) and writes its audit row in that transaction: the change and its
audit row commit together or not at all. Bad input raises shared.errors (404, 409, 422) with a message that
says what to do instead.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import asyncpg

from services.trainer import repository as repo
from services.trainer.schemas import ModelVersion
from services.trainer.settings import TrainerSettings
from shared import audit
from shared.errors import ConflictError, NotFoundError, ValidationFailed
from shared.rollouts import Rollout
from shared.timeframes import check_symbol

log = logging.getLogger("trainer.lifecycle")

# What apply_policy did with a gate-passing version.
PolicyAction = Literal["promoted", "canary", "manual", "unchanged", "skipped"]

_CHANGEABLE = frozenset(
    {"policy", "candidate_model_id", "candidate_traffic_percent", "test_group_user_ids", "rollout_symbols", "shadow"}
)
_POLICIES = ("direct", "canary", "manual")


def _defaults(symbol: str, timeframe: str, settings: TrainerSettings) -> Rollout:
    return Rollout(
        symbol=symbol,
        timeframe=timeframe,
        policy=settings.trainer_rollout_default_policy,
        candidate_model_id=None,
        candidate_traffic_percent=0.0,
        test_group_user_ids=[],
        rollout_symbols=[],
        shadow=False,
    )


def _brief(v: ModelVersion | None) -> dict[str, Any] | None:
    """What an audit row keeps of a version: enough to see what changed, not its whole metrics blob."""
    if v is None:
        return None
    return {
        "id": v.id,
        "version": v.version,
        "status": v.status,
        "gate": v.quality.gate,
        "promoted_at": v.promoted_at,
        "retired_at": v.retired_at,
        "rolled_back_at": v.rolled_back_at,
    }


def _rollout_json(r: Rollout | None) -> dict[str, Any] | None:
    return None if r is None else r.model_dump(mode="json", exclude={"updated_at"})


def _evidence(reason: str | None, evidence: dict[str, Any] | None) -> dict[str, Any]:
    return {**({"reason": reason} if reason else {}), **(evidence or {})}


async def _version(conn: asyncpg.Connection, model_id: int) -> ModelVersion:
    v = await repo.get_version(conn, model_id)
    if v is None:
        raise NotFoundError(f"no model version with id {model_id}; GET /v1/models lists the registry")
    return v


async def _record_version(
    conn: asyncpg.Connection,
    action: str,
    v: ModelVersion,
    *,
    actor: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    evidence: dict[str, Any],
) -> None:
    """The audit row of `action` on model version `v` (its series; target `model_version:<id>`)."""
    await audit.record(
        conn,
        actor=actor,
        action=action,
        symbol=v.symbol,
        timeframe=v.timeframe,
        target=f"model_version:{v.id}",
        before=before,
        after=after,
        evidence=evidence,
    )


async def get_rollout(conn: asyncpg.Connection, symbol: str, timeframe: str, settings: TrainerSettings) -> Rollout:
    """The series' rollout; the defaults (policy TRAINER_ROLLOUT_DEFAULT_POLICY, no candidate) without a row."""
    return await repo.get_rollout_row(conn, symbol, timeframe) or _defaults(symbol, timeframe, settings)


async def _check_candidate(conn: asyncpg.Connection, symbol: str, timeframe: str, model_id: int) -> ModelVersion:
    v = await repo.get_version(conn, model_id)
    if v is None:
        raise NotFoundError(f"no model version with id {model_id}; GET /v1/models lists the registry")
    if (v.symbol, v.timeframe) != (symbol, timeframe):
        raise ValidationFailed(
            f"model version {model_id} belongs to {v.symbol} {v.timeframe}, not {symbol} {timeframe}: set it as "
            f"the candidate of its own series (PUT /v1/rollouts/{v.symbol}/{v.timeframe})"
        )
    if v.status != "candidate":
        what = {
            "production": "is already production; nothing to roll out",
            "failed": "failed and cannot serve; train a new version",
            "archived": "is archived; train a new version (a previous production version is reached by rollback)",
        }[v.status]
        raise ConflictError(f"model version {model_id} {what}")
    return v


def _validated_changes(changes: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(changes) - _CHANGEABLE)
    if unknown:
        raise ValidationFailed(
            f"unknown rollout field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_CHANGEABLE))}"
        )
    for name, value in changes.items():
        if value is None and name != "candidate_model_id":
            raise ValidationFailed(f"{name} may not be null: leave it out to keep its value")
    out = dict(changes)
    if "policy" in out and out["policy"] not in _POLICIES:
        raise ValidationFailed(f"policy {out['policy']!r} is not one of {', '.join(_POLICIES)}")
    if "candidate_traffic_percent" in out:
        pct = float(out["candidate_traffic_percent"])
        if not 0 <= pct <= 100:  # NaN fails too
            raise ValidationFailed(
                f"candidate_traffic_percent {pct:g} is outside 0..100; give a share between 0 and 100"
            )
        out["candidate_traffic_percent"] = pct
    if "test_group_user_ids" in out:
        ids = [str(u) for u in out["test_group_user_ids"]]
        if any(not u or len(u) > 200 for u in ids):
            raise ValidationFailed("test_group_user_ids: every user id must be 1..200 characters")
        out["test_group_user_ids"] = list(dict.fromkeys(ids))
    if "rollout_symbols" in out:
        symbols = [str(s) for s in out["rollout_symbols"]]
        for s in symbols:
            check_symbol(s)
        out["rollout_symbols"] = list(dict.fromkeys(symbols))
    if "shadow" in out:
        out["shadow"] = bool(out["shadow"])
    return out


async def update_rollout(
    conn: asyncpg.Connection,
    symbol: str,
    timeframe: str,
    changes: dict[str, Any],
    *,
    actor: str,
    settings: TrainerSettings,
) -> Rollout:
    """Change the fields named in `changes` (absent ones keep their value); audit action `rollout.update`.

    422 for an unknown field, a null where only the candidate may be cleared, a traffic share outside 0..100 or a
    candidate of another series; 404 for an unknown candidate id; 409 for a candidate that is not `candidate`.
    """
    check_symbol(symbol)
    clean = _validated_changes(changes)
    async with conn.transaction():
        await repo.lock_series(conn, symbol, timeframe)
        row = await repo.get_rollout_row(conn, symbol, timeframe)
        current = row or _defaults(symbol, timeframe, settings)
        evidence: dict[str, Any] = {"fields": sorted(clean)}
        candidate_id = clean.get("candidate_model_id")
        if candidate_id is not None:
            await _check_candidate(conn, symbol, timeframe, int(candidate_id))
        if "candidate_model_id" in clean and current.candidate_model_id not in (None, candidate_id):
            evidence["replaced_candidate_model_id"] = current.candidate_model_id
        updated = await repo.upsert_rollout(conn, current.model_copy(update=clean), actor)
        await audit.record(
            conn,
            actor=actor,
            action="rollout.update",
            symbol=symbol,
            timeframe=timeframe,
            target=f"rollout:{symbol}/{timeframe}",
            before=_rollout_json(row),
            after=_rollout_json(updated),
            evidence=evidence,
        )
    return updated


async def _clear_candidate_if(
    conn: asyncpg.Connection, symbol: str, timeframe: str, model_id: int, actor: str
) -> tuple[Rollout | None, Rollout | None]:
    """If `model_id` is the rollout's candidate: clear it, traffic 0. Returns (before, after) of the rollout."""
    row = await repo.get_rollout_row(conn, symbol, timeframe)
    if row is None or row.candidate_model_id != model_id:
        return row, row
    after = await repo.upsert_rollout(
        conn, row.model_copy(update={"candidate_model_id": None, "candidate_traffic_percent": 0.0}), actor
    )
    return row, after


async def promote(
    conn: asyncpg.Connection,
    model_id: int,
    *,
    actor: str,
    reason: str | None,
    evidence: dict[str, Any] | None = None,
) -> ModelVersion:
    """Make a version its series' production model; the previous one is archived (a later rollback can return
    to it), the series' flags cleared, and the rollout's candidate cleared (traffic 0) if it was this version.
    Audit action `model.promote`. Promoting the version that already serves changes nothing and writes no row.

    404 unknown id; 409 for a failed version (retrain) or an archived one (rollback reaches a previous
    production version; an archived candidate never served and cannot)."""
    async with conn.transaction():
        v = await _version(conn, model_id)
        await repo.lock_series(conn, v.symbol, v.timeframe)
        v = await _version(conn, model_id)  # re-read under the lock: a concurrent change may have won
        if v.status == "failed":
            raise ConflictError(
                f"model version {model_id} ({v.version}) failed and cannot serve; train a new version instead"
            )
        if v.status == "archived":
            raise ConflictError(
                f"model version {model_id} ({v.version}) is archived and cannot be promoted; to serve the previous "
                f"production version again use POST /v1/models/{v.symbol}/{v.timeframe}/rollback, or train a new "
                "version"
            )
        if v.status == "production":
            return v
        old = await repo.production_version(conn, v.symbol, v.timeframe)
        if old is not None:
            await repo.set_status(conn, old.id, "archived")
        await repo.set_status(conn, v.id, "production")
        await repo.clear_flags(conn, v.symbol, v.timeframe)
        rollout_before, rollout_after = await _clear_candidate_if(conn, v.symbol, v.timeframe, v.id, actor)
        promoted = await _version(conn, model_id)
        archived = await repo.get_version(conn, old.id) if old is not None else None
        await _record_version(
            conn,
            "model.promote",
            v,
            actor=actor,
            before={"production": _brief(old), "promoted": _brief(v), "rollout": _rollout_json(rollout_before)},
            after={
                "production": _brief(promoted),
                "archived": _brief(archived),
                "rollout": _rollout_json(rollout_after),
            },
            evidence=_evidence(reason, evidence),
        )
    log.info("%s %s: %s is production (was %s), by %s", v.symbol, v.timeframe, v.version, old and old.version, actor)
    return promoted


ADMIN_NOTE = "promoted to production by an admin"


async def promote_by_admin(conn: asyncpg.Connection, model_id: int, *, actor: str, reason: str | None) -> ModelVersion:
    """`promote` on an admin's explicit decision, whatever the gate said: a candidate keeps its verdict with
    ADMIN_NOTE added to its reasons (clients still see e.g. `gate: failed`), in the promotion's transaction, so a
    refused promotion leaves the reasons as they were."""
    async with conn.transaction():
        v = await repo.get_version(conn, model_id)
        if v is not None and v.status == "candidate" and ADMIN_NOTE not in v.quality.reasons:
            quality = v.quality.model_dump(mode="json")
            quality["reasons"] = [*quality["reasons"], ADMIN_NOTE]
            await repo.set_quality(conn, model_id, quality)
        return await promote(conn, model_id, actor=actor, reason=reason or "promoted by an admin")


async def rollback(
    conn: asyncpg.Connection,
    symbol: str,
    timeframe: str,
    *,
    actor: str,
    reason: str | None,
    evidence: dict[str, Any] | None = None,
) -> ModelVersion:
    """Production goes back to the previous production version: the newest archived version that served
    before (promoted_at set), was not itself rolled back, by retired_at. The rolled-back version is archived
    with rolled_back_at set, so a second rollback goes one further back instead of forth. The series' flags are
    cleared (they described the version that no longer serves). Audit action `model.rollback`; returns the
    version that now serves.

    409 when the series has no production version or no previous one (promote a version instead)."""
    check_symbol(symbol)
    async with conn.transaction():
        await repo.lock_series(conn, symbol, timeframe)
        current = await repo.production_version(conn, symbol, timeframe)
        if current is None:
            raise ConflictError(
                f"{symbol} {timeframe} has no production version to roll back; promote a version instead "
                "(POST /v1/models/{id}/promote)"
            )
        target = await repo.rollback_target(conn, symbol, timeframe, current.id)
        if target is None:
            raise ConflictError(
                f"{symbol} {timeframe} has no previous production version to roll back to (only {current.version} "
                "ever served, or every earlier one was rolled back); promote a version instead "
                "(POST /v1/models/{id}/promote)"
            )
        await repo.set_status(conn, current.id, "archived", rolled_back=True)
        await repo.set_status(conn, target.id, "production")
        await repo.clear_flags(conn, symbol, timeframe)
        restored = await _version(conn, target.id)
        rolled_back = await _version(conn, current.id)
        await _record_version(
            conn,
            "model.rollback",
            current,
            actor=actor,
            before={"production": _brief(current), "previous": _brief(target)},
            after={"production": _brief(restored), "rolled_back": _brief(rolled_back)},
            evidence=_evidence(reason, evidence),
        )
    log.info("%s %s: rolled back %s to %s, by %s", symbol, timeframe, current.version, target.version, actor)
    return restored


async def reject_candidate(
    conn: asyncpg.Connection,
    symbol: str,
    timeframe: str,
    *,
    actor: str,
    reason: str | None,
    evidence: dict[str, Any] | None = None,
) -> ModelVersion:
    """Roll the rollout's candidate back: it is archived with rolled_back_at set and `reason` added to its
    quality reasons; the rollout's candidate is cleared and its traffic set to 0. Audit action
    `rollout.reject`; returns the rejected version. 409 when the series' rollout has no candidate."""
    check_symbol(symbol)
    async with conn.transaction():
        await repo.lock_series(conn, symbol, timeframe)
        row = await repo.get_rollout_row(conn, symbol, timeframe)
        if row is None or row.candidate_model_id is None:
            raise ConflictError(f"{symbol} {timeframe} has no candidate in its rollout; nothing to reject")
        cand = await _version(conn, row.candidate_model_id)
        if cand.status == "candidate":
            note = f"rolled back as candidate: {reason}" if reason else "rolled back as candidate"
            quality = cand.quality.model_dump(mode="json")
            quality["reasons"] = [*quality["reasons"], note]
            await repo.set_quality(conn, cand.id, quality)
            await repo.set_status(conn, cand.id, "archived", rolled_back=True)
        after_rollout = await repo.upsert_rollout(
            conn, row.model_copy(update={"candidate_model_id": None, "candidate_traffic_percent": 0.0}), actor
        )
        rejected = await _version(conn, cand.id)
        await _record_version(
            conn,
            "rollout.reject",
            cand,
            actor=actor,
            before={"candidate": _brief(cand), "rollout": _rollout_json(row)},
            after={"candidate": _brief(rejected), "rollout": _rollout_json(after_rollout)},
            evidence=_evidence(reason, evidence),
        )
    log.info("%s %s: candidate %s rejected, by %s", symbol, timeframe, cand.version, actor)
    return rejected


async def apply_policy(
    conn: asyncpg.Connection, version: ModelVersion, settings: TrainerSettings, *, actor: str = audit.SYSTEM
) -> PolicyAction:
    """What a version that passed the promotion gate does, by its series' rollout policy (the series' row, else
    TRAINER_ROLLOUT_DEFAULT_POLICY):

    - `direct`: promoted now (audit `model.promote`) -> "promoted";
    - `canary`: the rollout's candidate at TRAINER_CANARY_TRAFFIC_PERCENT, shadow TRAINER_CANARY_SHADOW, for the
      automatic decision to judge on live outcomes (audit `rollout.candidate`) -> "canary";
    - `manual`: the rollout's candidate at 0 % traffic until an admin acts (audit `rollout.candidate`) -> "manual".

    A newer candidate replaces an older one in the rollout (the older keeps status `candidate` but no longer
    routes; the audit row names it). "unchanged" when the version already is the rollout's candidate (a
    re-validation keeps the traffic an admin may have set); "skipped" when it is not a candidate (it serves
    already, or an admin archived it meanwhile). Only call it for a version whose gate passed.
    """
    async with conn.transaction():
        await repo.lock_series(conn, version.symbol, version.timeframe)
        v = await _version(conn, version.id)
        if v.status != "candidate":
            return "skipped"
        row = await repo.get_rollout_row(conn, v.symbol, v.timeframe)
        current = row or _defaults(v.symbol, v.timeframe, settings)
        evidence: dict[str, Any] = {
            "policy": current.policy,
            "policy_source": "rollout" if row is not None else "TRAINER_ROLLOUT_DEFAULT_POLICY",
            "gate": v.quality.model_dump(mode="json"),
        }
        if current.policy == "direct":
            await promote(
                conn, v.id, actor=actor, reason="passed the promotion gate (rollout policy direct)", evidence=evidence
            )
            return "promoted"
        if current.candidate_model_id == v.id:
            return "unchanged"
        update: dict[str, Any] = {"candidate_model_id": v.id}
        if current.policy == "canary":
            update["candidate_traffic_percent"] = settings.trainer_canary_traffic_percent
            update["shadow"] = settings.trainer_canary_shadow
        else:
            update["candidate_traffic_percent"] = 0.0
        if current.candidate_model_id is not None:
            evidence["replaced_candidate_model_id"] = current.candidate_model_id
            evidence["replaced_candidate_note"] = (
                f"model version {current.candidate_model_id} keeps status candidate but no longer routes"
            )
        updated = await repo.upsert_rollout(conn, current.model_copy(update=update), actor)
        await _record_version(
            conn,
            "rollout.candidate",
            v,
            actor=actor,
            before=_rollout_json(row),
            after=_rollout_json(updated),
            evidence=evidence,
        )
    log.info(
        "%s %s: %s is the %s candidate at %g %%",
        v.symbol,
        v.timeframe,
        v.version,
        current.policy,
        updated.candidate_traffic_percent,
    )
    return current.policy
