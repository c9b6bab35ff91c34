"""Sending trainer tasks by name: the API, the CLI and the schedules publish through here.

Nothing here imports task code (or TensorFlow): a message names its task (`trainer.train_model`, ...) and the
worker resolves it. A send is bounded: the broker sockets time out on their own
(TRAINER_BROKER_TIMEOUT_SECONDS) and `publish` adds a hard bound (TRAINER_PUBLISH_TIMEOUT_SECONDS) for a broker
that accepts connections and never answers; a thread abandoned at the bound ends when its socket times out.
"""

from __future__ import annotations

import functools
from typing import Final

import anyio
from celery import Celery

from services.trainer.settings import TrainerSettings

# The task that runs a job of each kind (training_jobs.kind); every one takes the job id.
JOB_TASKS: Final[dict[str, str]] = {
    "train": "trainer.train_model",
    "validate": "trainer.validate_model",
    "backtest": "trainer.backtest",
    "optimize_weights": "trainer.optimize_weights",
}
EXPLAIN_TASK: Final = "trainer.explain_prediction"


def send(app: Celery, task: str, args: list[object], queue: str) -> None:
    """Publish one message (blocking: kombu)."""
    app.send_task(task, args=args, queue=queue)


def send_job(app: Celery, kind: str, job_id: str, queue: str) -> None:
    """Publish the message that runs job `job_id` of kind `kind`."""
    send(app, JOB_TASKS[kind], [job_id], queue)


async def publish(app: Celery, task: str, args: list[object], settings: TrainerSettings) -> None:
    """`send` in a thread, bounded by TRAINER_PUBLISH_TIMEOUT_SECONDS (TimeoutError past it)."""
    fn = functools.partial(send, app, task, args, settings.trainer_queue)
    with anyio.fail_after(settings.trainer_publish_timeout_seconds):
        await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)
