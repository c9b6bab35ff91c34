"""docker-compose.production.yml: valid for docker-compose, ordered by health, secrets only from env.

`docker-compose config` validates and renders the file without a Docker engine. The rendered file
(deploy.env.example supplying the variables) is then checked against the system's contracts.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.contract import APP_ENV, SECRET_ENV, SERVICES
from tests.infra.helpers import REPO, run

COMPOSE = REPO / "docker-compose.production.yml"
EXAMPLE_ENV = REPO / "deploy.env.example"
APP_SERVICES = {
    "migrate",
    "indicators",
    "predictor-1",
    "predictor-2",
    "predictor-3",
    "trainer-api",
    "trainer-worker",
    "trainer-beat",
    "webhook-worker",
}


def compose(
    tool: Callable[[str], str], env_file: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # A clean environment: nothing from the developer's shell may satisfy a required variable.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    cmd = [tool("docker-compose"), "--env-file", str(env_file), "-f", str(COMPOSE), "config", *args]
    return run(cmd, env=env, check=check)


@pytest.fixture(scope="module")
def rendered(tool: Callable[[str], str]) -> dict[str, Any]:
    out = compose(tool, EXAMPLE_ENV)
    doc: dict[str, Any] = yaml.safe_load(out.stdout)
    return doc


def test_config_q_passes_with_the_example_env(tool: Callable[[str], str]) -> None:
    compose(tool, EXAMPLE_ENV, "-q")


@pytest.mark.parametrize(
    "missing",
    [
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "API_KEYS",
        "MODEL_STORE_URL",
        "BACKUP_URL",
        "IMAGE_TAG",
        "GRAFANA_ADMIN_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
    ],
)
def test_a_missing_secret_stops_compose(tool: Callable[[str], str], tmp_path: Path, missing: str) -> None:
    lines = [ln for ln in EXAMPLE_ENV.read_text().splitlines() if not ln.startswith(f"{missing}=")]
    env_file = tmp_path / "deploy.env"
    env_file.write_text("\n".join(lines) + "\n")
    out = compose(tool, env_file, "-q", check=False)
    assert out.returncode != 0
    assert missing in out.stderr


def test_no_secret_is_written_in_the_compose_file() -> None:
    text = COMPOSE.read_text()
    for key in [*SECRET_ENV, "POSTGRES_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD", "REDISCLI_AUTH"]:
        for value in re.findall(rf"^\s*{key}:\s*(.+)$", text, re.M):
            assert "${" in value, f"{key} must come from the env file, found {value!r}"


BACKUP_SERVICES = {"backup-dump", "backup"}


def test_services(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert set(services) == APP_SERVICES | {"postgres", "redis", "nginx", "prometheus", "grafana", *BACKUP_SERVICES}


def test_images_are_pinned(rendered: dict[str, Any]) -> None:
    for name, svc in rendered["services"].items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_service_command_image_and_env(rendered: dict[str, Any], name: str) -> None:
    svc = rendered["services"][name]
    contract = SERVICES["predictor" if name.startswith("predictor-") else name]
    assert svc["command"] == contract["command"]
    assert re.search(rf"/aicash-{contract['image']}:", svc["image"]), svc["image"]
    assert APP_ENV <= set(svc["environment"]), sorted(APP_ENV - set(svc["environment"]))
    assert svc["environment"]["AUTH_DISABLED"] == "false"
    assert svc["environment"]["INDICATORS_URL"] == "http://indicators:8081"
    # Multiprocess metrics need an empty writable directory at every start: a tmpfs.
    assert svc["environment"]["PROMETHEUS_MULTIPROC_DIR"] in svc["tmpfs"]
    assert svc["read_only"] is True


@pytest.mark.parametrize("name", sorted(APP_SERVICES - {"migrate"}))
def test_services_start_after_migration_and_healthy_dependencies(rendered: dict[str, Any], name: str) -> None:
    deps = rendered["services"][name]["depends_on"]
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["redis"]["condition"] == "service_healthy"


def test_migrate_is_one_shot(rendered: dict[str, Any]) -> None:
    migrate = rendered["services"]["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_every_long_running_service_has_a_healthcheck(rendered: dict[str, Any]) -> None:
    for name, svc in rendered["services"].items():
        if name in {"migrate", "trainer-beat", *BACKUP_SERVICES}:
            continue
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in ("indicators", "predictor-1", "trainer-api"):
        port = SERVICES["predictor" if name.startswith("predictor") else name]["port"]
        assert f"127.0.0.1:{port}/health'" in " ".join(rendered["services"][name]["healthcheck"]["test"])


def test_nginx_waits_for_healthy_backends_and_mounts_the_rendered_conf(rendered: dict[str, Any]) -> None:
    nginx = rendered["services"]["nginx"]
    assert {k for k, v in nginx["depends_on"].items() if v["condition"] == "service_healthy"} == {
        "predictor-1",
        "predictor-2",
        "predictor-3",
        "indicators",
        "trainer-api",
    }
    assert f"{REPO / 'nginx' / 'nginx.conf'}:/etc/nginx/nginx.conf:ro" in nginx["volumes"]


def test_only_nginx_is_published_to_the_world(rendered: dict[str, Any]) -> None:
    for name, svc in rendered["services"].items():
        for port in svc.get("ports", []):
            if name == "nginx":
                continue
            # docker-compose v1 renders "127.0.0.1:9090:9090" as a string, newer ones as a mapping.
            host_ip = port.split(":")[0] if isinstance(port, str) else port.get("host_ip")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} on every interface"


def test_grafana_and_prometheus_get_their_files(rendered: dict[str, Any]) -> None:
    prom = " ".join(rendered["services"]["prometheus"]["volumes"])
    assert "monitoring/prometheus.yml:/etc/prometheus/prometheus.yml" in prom
    assert "monitoring/alerts.yml:/etc/prometheus/alerts.yml" in prom
    grafana = " ".join(rendered["services"]["grafana"]["volumes"])
    assert "monitoring/grafana/provisioning:/etc/grafana/provisioning" in grafana


def test_trainer_api_enqueues_to_the_queue_the_worker_consumes(rendered: dict[str, Any]) -> None:
    worker = rendered["services"]["trainer-worker"]
    queue = worker["command"][worker["command"].index("-Q") + 1]
    for name in ("trainer-api", "trainer-worker", "trainer-beat"):
        assert rendered["services"][name]["environment"]["TRAINER_QUEUE"] == queue, name


def test_backup_is_a_one_shot_pair_in_its_own_profile(rendered: dict[str, Any]) -> None:
    """pg_dump from the server's image into a scratch volume, then `aicash db backup --dump-file` uploads it."""
    services = rendered["services"]
    dump, upload = services["backup-dump"], services["backup"]
    assert dump["profiles"] == upload["profiles"] == ["backup"]
    assert dump["restart"] == upload["restart"] == "no"
    assert dump["image"] == services["postgres"]["image"], "pg_dump must match the server's major version"
    assert "pg_dump --format=custom" in " ".join(dump["command"])
    assert dump["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert upload["command"] == ["aicash", "db", "backup", "--dump-file", "/backup/aicash.dump"]
    assert upload["depends_on"]["backup-dump"]["condition"] == "service_completed_successfully"
    assert re.search(r"/aicash-predictor:", upload["image"])
    assert upload["environment"]["BACKUP_URL"].startswith("s3://")
    assert upload["environment"]["DATABASE_URL"] == dump["environment"]["DATABASE_URL"]
    assert upload["read_only"] is True

    def mounts(svc: dict[str, Any]) -> dict[str, str]:  # docker-compose v1 renders "source:target[:mode]"
        return {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}

    assert mounts(dump)["/backup"] == mounts(upload)["/backup"] == "backup_scratch"
