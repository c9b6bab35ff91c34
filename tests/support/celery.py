"""A real `celery worker` process for the tests (the trainer's job queue, the predictor's webhook deliveries)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import REPO


@dataclass
class Worker:
    """`celery -A <app> worker -Q <queue>` processes, each in its own session, so a SIGKILL can take the whole
    group (the main process and its prefork pool children)."""

    env: dict[str, str]
    log_path: Path
    app: str
    queue: str
    concurrency: int = 1
    name: str = "test-worker"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "celery"),
                    "-A",
                    self.app,
                    "worker",
                    "-Q",
                    self.queue,
                    "-c",
                    str(self.concurrency),
                    "--pool",
                    "prefork",
                    "--loglevel",
                    "INFO",
                    "-n",
                    f"{self.name}-{secrets.token_hex(3)}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker and its pool children at once: no warm shutdown, no ack, no cleanup."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            try:
                self.kill(proc)
            except ProcessLookupError:
                pass
