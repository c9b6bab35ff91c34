"""The whole system as `make up` runs it (shared.devstack), for the tests that act as its users: the README tour
and the operator console in a browser.

One stack per test session (`live_stack` in tests/conftest.py starts it on first use): a scratch database of its
own on the test server, an embedded Redis of its own (the devstack starts one when REDIS_URL is unset, so its
Celery queues and stream channels meet no other test's), the run's API keys, its own ports and model store.
It trains the sample's first model (2 epochs), validates it walk-forward and computes its weights before it
reports itself up, exactly as `make up` does for a new user.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.local_services import free_port, scratch_database
from tests.support.keys import ADMIN_KEY, API_KEYS

SYMBOL = "SPXLIVE"  # the sample's symbol in the live stack
TIMEFRAME = "D1"
UP_LINE = "Ctrl-C stops everything."  # the last line: validated and weighted by then
START_TIMEOUT_S = 900.0


@dataclass
class LiveStack:
    urls: dict[str, str]  # indicators, predictor, trainer
    key: str  # the admin key
    env: dict[str, str]  # what the stack's processes run with (DATABASE_URL, the keys, the URLs)
    proc: subprocess.Popen[str]
    symbol: str = SYMBOL
    timeframe: str = TIMEFRAME
    output: list[str] = field(default_factory=list)  # devstack's stdout, line by line

    @property
    def database_url(self) -> str:
        return self.env["DATABASE_URL"]

    def text(self) -> str:
        return "".join(self.output)


def _pump(proc: subprocess.Popen[str], into: list[str], up: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        into.append(line)
        if UP_LINE in line:
            up.set()


@contextlib.contextmanager
def live_stack(server_url: str, workdir: Path) -> Iterator[LiveStack]:
    with scratch_database(server_url, "aicash_live") as database_url:
        ports = {name: free_port() for name in ("indicators", "predictor", "trainer")}
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "API_KEYS": API_KEYS,
            "AICASH_API_KEY": ADMIN_KEY,
            "MODEL_STORE_URL": f"file://{workdir / 'models'}",
            "AICASH_VAR_DIR": str(workdir / "var"),  # its own embedded Redis, logs and metrics files
            "AICASH_SAMPLE_SYMBOL": SYMBOL,
            "COLUMNS": "200",  # devstack prints with rich: long lines unwrapped
            **{f"{name.upper()}_PORT": str(port) for name, port in ports.items()},
        }
        for name in ("REDIS_URL", "CELERY_BROKER_URL", "TRAINER_QUEUE", "PROMETHEUS_MULTIPROC_DIR"):
            env.pop(name, None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.devstack", "up", "--epochs", "2"],
            env=env,
            stdin=subprocess.DEVNULL,  # a terminal pytest runs in stays pytest's (devstack takes a tty's foreground)
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        output: list[str] = []
        up = threading.Event()
        threading.Thread(target=_pump, args=(proc, output, up), daemon=True).start()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not up.wait(1.0):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the live stack did not come up:\n" + "".join(output)[-4000:])
            urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
            env.update(INDICATORS_URL=urls["indicators"], PREDICTOR_URL=urls["predictor"], TRAINER_URL=urls["trainer"])
            yield LiveStack(urls=urls, key=ADMIN_KEY, env=env, proc=proc, output=output)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # what Ctrl-C sends; the devstack stops what it started
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
