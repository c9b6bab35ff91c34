"""Fixtures for the deployment checks in tests/infra.

They need no Docker engine. They run real tools: hadolint, docker-compose (v1, `config` only), kubectl
kustomize, kubernetes-validate, actionlint with shellcheck, nginx, promtool, uv; the backup and Prometheus
tests also run pg_dump/pg_restore, seaweedfs, Prometheus and the services against the suite's PostgreSQL
and Redis. A missing system tool is installed
by scripts/ensure-system-tools.sh (as root) or the test fails saying what to install; nothing is skipped.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.infra.helpers import ENSURE_TOOLS, SYSTEM_TOOLS, which
from tests.support.net import stop_all


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    """`tool("nginx")` -> absolute path; installs missing system tools once, fails when it cannot."""
    ensured = False

    def find(name: str) -> str:
        nonlocal ensured
        path = which(name)
        if path is None and name in SYSTEM_TOOLS and not ensured:
            ensured = True
            proc = subprocess.run(["bash", str(ENSURE_TOOLS)], capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                pytest.fail(f"{ENSURE_TOOLS.name} could not provide {name}:\n{proc.stderr}", pytrace=False)
            path = which(name)
        if path is None:
            hint = "run scripts/ensure-system-tools.sh" if name in SYSTEM_TOOLS else "install the dev extra"
            pytest.fail(f"{name} not found ({hint})", pytrace=False)
        return path

    return find


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is stopped and reaped at teardown, even when the test fails."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    stop_all(procs)
