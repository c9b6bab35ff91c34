"""Recovering jobs whose Celery message was lost.

Acks-late and the broker's redelivery cover a worker that dies. What they cannot cover: a delivery that
gave up because PostgreSQL stayed down through every retry, a retry that could not be published, a message
dropped by the broker, a job row written by a schedule whose send failed. Such a job sits queued or running
with nobody holding its lock. Every TRAINER_SWEEP_INTERVAL_SECONDS, beat runs `trainer.sweep_jobs`, which
re-sends every such job whose row has not moved for TRAINER_SWEEP_STALE_AFTER_SECONDS. A re-sent job that
turns out to have a live message after all is harmless: the job lock and the finished-job check make the
second delivery a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from services.trainer import repository as repo
from services.trainer.settings import TrainerSettings
from shared.db import require_database_url

log = logging.getLogger("trainer.sweeper")


def run_sweep(send: Callable[[str, str], None], settings: TrainerSettings) -> dict[str, Any]:
    """Claim the orphaned jobs (touching their rows) and send one message for each (`send(kind, job_id)`);
    returns their ids."""

    async def claim() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(
            require_database_url(settings), timeout=10, server_settings={"application_name": "aicash-trainer-sweeper"}
        )
        try:
            return await repo.claim_orphans(conn, settings.trainer_sweep_stale_after_seconds)
        finally:
            await conn.close()

    resent: list[str] = []
    failed: dict[str, str] = {}
    for job_id, kind in asyncio.run(claim()):  # claimed rows are committed before their message is sent
        try:
            send(kind, job_id)
        except Exception as exc:  # claimed again by a sweep once the row is stale again
            log.warning("sweeper: could not re-send job %s: %s: %s", job_id, type(exc).__name__, exc)
            failed[job_id] = f"{type(exc).__name__}: {exc}"
            continue
        log.warning("sweeper: re-sent job %s (queued/running, no holder, no progress for a while)", job_id)
        resent.append(job_id)
    return {"resent": resent, "send_failed": failed}
