"""uv.lock: every dependency group is locked, and the lock agrees with pyproject.toml (`make lock` fixes it).

`uv lock --check` resolves pyproject.toml again (against the package index) and fails when the result
would differ from uv.lock; UV_PYTHON_DOWNLOADS=never keeps uv on the interpreter running the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from tests.infra.helpers import run
from tests.support import REPO

LOCK = REPO / "uv.lock"


def uv_env() -> dict[str, str]:
    return {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}


def test_the_lock_covers_every_extra() -> None:
    lock = tomllib.loads(LOCK.read_text())
    project = next(p for p in lock["package"] if p["name"] == "aicash")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(project["optional-dependencies"]) == set(extras)
    # Every locked package is pinned to one version with hashes (wheels or sdist) to install from.
    for pkg in lock["package"]:
        if pkg["name"] == "aicash":
            continue
        assert re.fullmatch(r"[\w.+!-]+", pkg["version"]), pkg["name"]
        files = [*pkg.get("wheels", []), *([pkg["sdist"]] if "sdist" in pkg else [])]
        assert files and all(f["hash"].startswith("sha256:") for f in files), pkg["name"]


def test_pyproject_and_lock_agree(tool: Callable[[str], str]) -> None:
    out = run([tool("uv"), "lock", "--check", "--python", sys.executable], env=uv_env(), timeout=300, check=False)
    assert out.returncode == 0, f"uv.lock is out of date: run `make lock`\n{out.stderr}"


def test_the_check_fails_when_pyproject_changes(tool: Callable[[str], str], tmp_path: Path) -> None:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    assert '    "typer>=0.12",\n' in text
    pyproject.write_text(text.replace('    "typer>=0.12",\n', '    "typer>=0.12",\n    "six>=1.16",\n', 1))
    out = run(
        [tool("uv"), "lock", "--check", "--python", sys.executable, "--directory", str(tmp_path)],
        env=uv_env(),
        timeout=300,
        check=False,
    )
    assert out.returncode != 0 and "update" in (out.stderr + out.stdout).lower(), out.stderr
