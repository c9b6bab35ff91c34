"""Trainer errors, grouped by what the operator must do."""

from __future__ import annotations

from shared.errors import AppError


class OnnxMismatch(AppError):
    """ONNX output disagrees with Keras beyond the tolerance: the model is never registered."""

    status_code = 422
    code = "onnx_mismatch"


class JobBusy(Exception):  # noqa: N818 - a state, not a failure
    """Another process holds this job's lock (a duplicate delivery): try again later."""


class RetryLater(Exception):  # noqa: N818
    """An attempt failed with an error that may pass (network, storage); the job is queued again."""
