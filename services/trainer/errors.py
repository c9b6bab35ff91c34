"""Trainer errors, grouped by what the operator must do."""

from __future__ import annotations

from shared.errors import AppError, ConflictError


class OnnxMismatch(AppError):
    """ONNX output disagrees with Keras beyond the tolerance: the model is never registered."""

    status_code = 422
    code = "onnx_mismatch"


class JobBusy(Exception):  # a state, not a failure
    """Another process holds this job's lock (a duplicate delivery): try again later."""


class RetryLater(Exception):
    """An attempt failed with an error that may pass (network, storage); the job is queued again."""


class DatabaseUnavailable(Exception):  # a state of the infrastructure, retried
    """PostgreSQL could not be reached or dropped the connection: nothing about the job could be recorded.

    The delivery is retried through Celery with backoff; if every retry fails the sweeper re-sends the job.
    """


class JobInProgress(ConflictError):
    """The series already has a queued or running training job (at most one per series)."""

    code = "job_in_progress"

    def __init__(self, message: str, job_id: str | None) -> None:
        super().__init__(message)
        self.job_id = job_id
