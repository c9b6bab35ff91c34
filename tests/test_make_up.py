"""`make up`'s program, end to end: migrations, every service, the real sample imported through the API, the
first model trained on the Celery worker, and the prediction the printed curl makes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from shared.local_services import free_port


def test_make_up_trains_the_first_model_and_serves_predictions(database_url: str, redis_url: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "INDICATORS_PORT": str(free_port()),
        "PREDICTOR_PORT": str(free_port()),
        "TRAINER_PORT": str(free_port()),
        # a queue of this test's own on the shared Redis
        "TRAINER_QUEUE": f"make-up-{os.getpid()}",
        "AICASH_SAMPLE_SYMBOL": "SPXUP",
    }
    env.pop("API_KEYS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "shared.devstack", "up", "--smoke", "--epochs", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SPXUP D1: 5031 inserted" in " ".join((proc.stdout + proc.stderr).split())
    assert "'symbol': 'SPXUP'" in proc.stdout
    assert "'ts': '2018-12-31T00:00:00Z'" in proc.stdout
    assert "rsi_14" in proc.stdout
    assert "curl" in proc.stdout
    # the first model was trained through the worker and the predictor serves it
    assert "'model_version':" in proc.stdout
    assert "'signal':" in proc.stdout
    # validated walk-forward and weighted before the curl is printed; the verdict is whatever the data say
    out = " ".join(proc.stdout.split())
    assert "gate passed" in out or "gate failed" in out, proc.stdout[-3000:]
    assert "/validation" in out
    # the prediction itself carries the model's verdict
    assert re.search(r"'quality': \{ ?'gate': '(passed|failed)'", out), proc.stdout[-3000:]
