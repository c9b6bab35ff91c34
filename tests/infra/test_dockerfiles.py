"""docker/Dockerfile.*: hadolint-clean, pinned Python 3.12 base, non-root, healthcheck, right extra and CMD.

No Docker engine runs here, so the images are not built (CI's `images` job builds them); these checks
read the Dockerfiles the way the builder would.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.infra.contract import SERVICES
from tests.infra.helpers import REPO, run

DOCKER = REPO / "docker"
IMAGES = {"predictor": "predictor", "indicators": "indicators", "trainer": "trainer-api"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result[1:]


def args_of(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions(path) if k == "ARG" and "=" in a)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_hadolint(tool: Callable[[str], str], image: str) -> None:
    run([tool("hadolint"), "--failure-threshold", "info", str(DOCKER / f"Dockerfile.{image}")])


def test_hadolint_catches_a_bad_dockerfile(tool: Callable[[str], str], tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python app.py\n")
    assert run([tool("hadolint"), str(bad)], check=False).returncode != 0


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_base_image_is_pinned_python_312_slim(image: str) -> None:
    path = DOCKER / f"Dockerfile.{image}"
    args = args_of(path)
    for stage in stages(path):
        base = stage[0][1].split()[0]
        base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)
        assert re.fullmatch(r"python:3\.12\.\d+-slim(-\w+)?", base), f"{image}: base {base} is not a pinned 3.12 slim"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_runtime_stage(image: str) -> None:
    path = DOCKER / f"Dockerfile.{image}"
    runtime = stages(path)[-1]
    keys = [k for k, _ in runtime]
    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, f"{image} runs as root"
    health = [a for k, a in runtime if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0] and "/health/ready" not in health[0]
    service = SERVICES[IMAGES[image]]
    cmd = json.loads(next(a for k, a in runtime if k == "CMD"))
    assert cmd == service["command"], f"{image} CMD differs from the contract"
    assert f"EXPOSE {service['port']}" in [f"{k} {a}" for k, a in runtime]
    env = " ".join(a for k, a in runtime if k == "ENV")
    assert "PROMETHEUS_MULTIPROC_DIR=" in env and "PYTHONPATH=/app" in env
    assert keys.index("USER") > max(i for i, k in enumerate(keys) if k in {"RUN", "COPY"}), (
        "USER must come after the last RUN/COPY so nothing runs as root at runtime"
    )


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_installs_its_own_extra_only(image: str) -> None:
    runs = [a for k, a in instructions(DOCKER / f"Dockerfile.{image}") if k == "RUN"]
    syncs = [a for a in runs if "uv sync" in a]
    assert len(syncs) == 1 and "--frozen" in syncs[0], f"{image} must install from uv.lock (uv sync --frozen)"
    extras = set(re.findall(r"--extra[= ](\w+)", syncs[0]))
    assert extras == {image}, f"{image} installs extras {extras}"
    assert not [a for a in runs if "pip install" in a and "uv==" not in a], f"{image} installs around the lock"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_copied_paths_exist_and_pass_the_dockerignore(image: str) -> None:
    path = DOCKER / f"Dockerfile.{image}"
    ignore = (DOCKER / f"Dockerfile.{image}.dockerignore").read_text().splitlines()
    assert ignore[next(i for i, ln in enumerate(ignore) if ln and not ln.startswith("#"))] == "*"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for keyword, arg in instructions(path):
        if keyword != "COPY" or "--from=" in arg:
            continue
        *sources, _dest = shlex.split(arg)
        for src in (s for s in sources if not s.startswith("--")):
            if "[" in src:  # optional file, e.g. README.m[d]
                continue
            assert (REPO / src).exists(), f"{image}: COPY {src} does not exist"
            assert src.rstrip("/") in allowed, f"{image}: {src} is excluded by the .dockerignore"


def test_predictor_image_has_no_tensorflow() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any("tensorflow" in dep.lower() for dep in extras["predictor"])
    assert any("tensorflow" in dep.lower() for dep in extras["trainer"])
