"""railway.toml: the predictor image, the health check and restart policy the design asks for, and a start
command that serves the same app as the image's CMD on Railway's PORT."""

from __future__ import annotations

import shlex
import tomllib

from tests.infra.contract import SERVICES
from tests.support import REPO

RAILWAY = REPO / "railway.toml"


def test_railway_builds_the_predictor_image_and_checks_health() -> None:
    config = tomllib.loads(RAILWAY.read_text())
    assert set(config) == {"build", "deploy"}
    assert config["build"]["builder"] == "DOCKERFILE"
    assert (REPO / config["build"]["dockerfilePath"]).name == "Dockerfile.predictor"
    assert (REPO / config["build"]["dockerfilePath"]).is_file()
    deploy = config["deploy"]
    assert deploy["healthcheckPath"] == "/health"
    assert deploy["restartPolicyType"] == "ON_FAILURE" and deploy["restartPolicyMaxRetries"] >= 1
    assert deploy["preDeployCommand"] == ["aicash db upgrade"]


def test_start_command_is_the_images_command_on_railways_port() -> None:
    start = tomllib.loads(RAILWAY.read_text())["deploy"]["startCommand"]
    shell, flag, script = shlex.split(start)
    assert (shell, flag) == ("/bin/sh", "-c")
    argv = shlex.split(script)
    assert argv[0] == "exec"
    expected = SERVICES["predictor"]["command"]
    port = expected.index("--port") + 1
    assert argv[1:] == [*expected[:port], "${PORT:-8080}", *expected[port + 1 :]]
