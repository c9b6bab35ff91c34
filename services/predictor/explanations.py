"""Explanations of served predictions: read from `prediction_explanations` (the trainer's output), asked of
the trainer when there is none yet. The predictor computes none itself: it never imports TensorFlow or shap."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.predictor import repository
from services.predictor.prediction_log import PredictionLog
from services.predictor.repository import ExplanationRow
from services.predictor.trainer_client import TrainerClient
from shared.errors import AppError, NotFoundError, ServiceUnavailable

# Seconds a client should wait before asking again for an explanation being computed.
RETRY_AFTER_SECONDS = 2


class ExplanationFailed(AppError):
    """The trainer tried and failed: asking again returns the same error (docs/PREDICTOR.md, Explanations)."""

    status_code = 409
    code = "explanation_failed"


@dataclass(frozen=True)
class ExplanationAnswer:
    status_code: int  # 200 finished, 202 being computed
    body: dict[str, Any]


def _render(row: ExplanationRow) -> ExplanationAnswer:
    if row.status == "succeeded":
        body: dict[str, Any] = {
            # The trainer's detail (class explained, base value, method, ...) first: the fixed fields win.
            **row.detail,
            "prediction_id": row.prediction_id,
            "status": row.status,
            "model_version": row.model_version,
            "class": row.detail.get("class"),
            "method": row.detail.get("method"),
            "contributions": row.contributions or [],
            "created_at": row.created_at,
            "finished_at": row.finished_at,
        }
        return ExplanationAnswer(200, body)
    if row.status == "failed":
        raise ExplanationFailed(
            f"the explanation of prediction {row.prediction_id} failed after {row.attempts} attempt(s): "
            f"{row.error or 'the trainer recorded no error message'}"
        )
    return ExplanationAnswer(202, {"prediction_id": row.prediction_id, "status": row.status})


class Explanations:
    def __init__(self, pool: asyncpg.Pool, log: PredictionLog, trainer: TrainerClient) -> None:
        self.pool = pool
        self.log = log
        self.trainer = trainer

    async def get(self, prediction_id: uuid.UUID) -> ExplanationAnswer:
        """The explanation of a served prediction, asking the trainer for it the first time.

        Raises NotFoundError for an unknown prediction, ExplanationFailed for a failed explanation and
        ServiceUnavailable when the database or the trainer cannot be reached.
        """
        pid = str(prediction_id)
        try:
            row = await repository.get_explanation(self.pool, pid)
            if row is not None:
                return _render(row)
            # The trainer reads the prediction and its window from PostgreSQL: what the log still buffers
            # (a prediction served a moment ago) is written first, and a batch being written is waited for.
            await self.log.flush()
            if not await repository.prediction_exists(self.pool, pid):
                raise NotFoundError(f"no prediction {pid}; ids come from POST /v1/predictions responses")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ServiceUnavailable(f"database unavailable: {type(exc).__name__}; try again later") from None
        await self.trainer.request_explanation(pid)
        try:
            row = await repository.get_explanation(self.pool, pid)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            row = None  # the trainer accepted it: queued, whatever this read says
        return _render(row) if row is not None else ExplanationAnswer(202, {"prediction_id": pid, "status": "queued"})
