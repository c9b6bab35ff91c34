"""CI/CD workflows (structure and actionlint; GitHub runs them) and scripts/ensure-system-tools.sh (really run)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.infra.helpers import ENSURE_TOOLS, REPO, run

WORKFLOWS = REPO / ".github" / "workflows"


def workflow(name: str) -> dict[str, Any]:
    raw: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    raw["on"] = raw.pop(True, raw.get("on"))
    return {str(k): v for k, v in raw.items()}


def steps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for job in doc["jobs"].values() for s in job.get("steps", [])]


def test_actions_are_pinned_to_a_release() -> None:
    for path in WORKFLOWS.glob("*.yml"):
        for step in steps(workflow(path.name)):
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+[\w.]*|[0-9a-f]{40})", step["uses"]), (
                    f"{path.name}: {step['uses']} is not pinned to a release"
                )


def test_ci_runs_lint_and_tests_against_real_services() -> None:
    ci = workflow("ci.yml")
    test_job = ci["jobs"]["test"]
    assert {"postgres", "redis", "rabbitmq"} <= set(test_job["services"])
    commands = [s.get("run", "") for s in test_job["steps"]]
    assert any(c.startswith("make lint") for c in commands)
    assert any(c.startswith("make test") for c in commands)
    assert any("scripts/ensure-system-tools.sh" in c for c in commands)
    images = ci["jobs"]["images"]["strategy"]["matrix"]["service"]
    assert sorted(images) == ["indicators", "predictor", "trainer"]


def test_deploy_uses_immutable_tags_smoke_tests_and_rolls_back() -> None:
    text = (WORKFLOWS / "deploy.yml").read_text()
    deploy = workflow("deploy.yml")
    assert "latest" not in text
    build = next(s for s in steps(deploy) if s.get("uses", "").startswith("docker/build-push-action"))
    assert build["with"]["tags"].endswith(":${{ env.SHA }}")
    assert deploy["env"]["SHA"].startswith("${{ github.event.workflow_run.head_sha")
    job = deploy["jobs"]["deploy"]
    names = [s.get("name") for s in job["steps"]]
    assert names.index("Migrate the database") < names.index("Roll out") < names.index("Smoke test")
    smoke = next(s for s in job["steps"] if s.get("name") == "Smoke test")["run"]
    assert "/health/ready" in smoke and "/weights" in smoke and "curl -fsS" in smoke
    rollback = next(s for s in job["steps"] if s.get("name") == "Roll back")
    assert rollback["if"].startswith("failure()")
    assert "kubectl rollout undo" in rollback["run"]
    assert deploy["concurrency"]["cancel-in-progress"] is False


def test_ensure_system_tools_is_idempotent_and_quiet() -> None:
    # The tools are present by now (the other infra tests used them): a second run changes nothing.
    started = time.monotonic()
    out = run(["bash", str(ENSURE_TOOLS)])
    assert out.stdout == "" and out.stderr == ""
    assert time.monotonic() - started < 5


def test_ensure_system_tools_refuses_to_install_without_root(tmp_path: Path) -> None:
    """Not root and a tool missing: it names the package, says how to install it and exits 1.

    A copy of the script looks for a tool that cannot exist and believes it runs as uid 1000.
    """
    original = ENSURE_TOOLS.read_text()
    patched = original.replace("[nginx]=nginx", "[nginx]=nginx\n  [aicash-no-such-tool]=aicash-no-such-package", 1)
    patched = patched.replace('"$(id -u)" -ne 0', '"${FAKE_UID:-$(id -u)}" -ne 0', 1)
    assert patched.count("aicash-no-such-package") == 1 and "FAKE_UID" in patched
    script = tmp_path / "ensure.sh"
    script.write_text(patched)
    out = run(["bash", str(script)], env={**os.environ, "FAKE_UID": "1000"}, check=False)
    assert out.returncode == 1
    assert "aicash-no-such-package" in out.stderr and "apt-get install" in out.stderr


def test_actionlint_passes_on_the_workflows(tool: Callable[[str], str]) -> None:
    """actionlint (with shellcheck on every `run:` script) finds nothing in .github/workflows."""
    tool("shellcheck")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    out = run([tool("actionlint"), "-no-color", "-oneline", *files], check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_actionlint_finds_a_broken_workflow(tool: Callable[[str], str], tmp_path: Path) -> None:
    """The check can fail: an undefined step output and a shell quoting slip are both reported."""
    tool("shellcheck")
    text = (WORKFLOWS / "deploy.yml").read_text()
    bad = text.replace("${{ steps.image.outputs.name }}", "${{ steps.imgae.outputs.name }}", 1)
    bad = bad.replace('cat "$RUNNER_TEMP/existing-deployments"', "cat $RUNNER_TEMP/existing-deployments", 1)
    assert bad.count("imgae") == 1 and "cat $RUNNER_TEMP" in bad
    path = tmp_path / ".github" / "workflows" / "deploy.yml"
    path.parent.mkdir(parents=True)
    path.write_text(bad)
    out = run([tool("actionlint"), "-no-color", "-oneline", str(path)], check=False)
    assert out.returncode == 1
    assert "imgae" in out.stdout and "SC2086" in out.stdout, out.stdout


def test_deploy_applies_the_production_overlay() -> None:
    deploy = workflow("deploy.yml")
    assert deploy["env"]["OVERLAY"] == "production"
    pin = next(s for s in deploy["jobs"]["deploy"]["steps"] if s.get("name", "").startswith("Pin images"))["run"]
    assert 'cd "k8s/overlays/$OVERLAY"' in pin and 'kustomize build "k8s/overlays/$OVERLAY"' in pin
    rollout = next(s for s in deploy["jobs"]["deploy"]["steps"] if s.get("name") == "Roll out")["run"]
    for name in ("predictor", "indicators", "trainer-api", "trainer-worker", "trainer-beat", "webhook-worker"):
        assert f" {name}" in rollout, f"deploy.yml does not wait for {name}"
