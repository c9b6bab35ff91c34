"""k8s/overlays/{staging,production}: each renders with `kubectl kustomize`, validates strictly against
Kubernetes 1.30 and differs from the other where the environments must differ."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.infra.helpers import run
from tests.infra.kustomize import NAMESPACES, OVERLAY_NAMES, documents, find, rendered

K8S_VERSION = "1.30.0"


def cpu_millis(value: str) -> float:
    return float(value[:-1]) if value.endswith("m") else float(value) * 1000


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_overlay_validates_strictly(tool: Callable[[str], str], overlay: str, tmp_path: Path) -> None:
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(rendered(overlay))
    out = run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", K8S_VERSION, str(path)])
    assert "ERROR" not in out.stdout + out.stderr


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_everything_lands_in_the_overlays_namespace(overlay: str) -> None:
    docs = documents(overlay)
    namespace = NAMESPACES[overlay]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == [namespace]
    assert all(d["metadata"]["namespace"] == namespace for d in docs if d["kind"] != "Namespace")
    kinds = {d["kind"] for d in docs}
    assert {"NetworkPolicy", "CronJob", "Job", "Deployment", "Ingress"} <= kinds
    assert "Secret" not in kinds


def test_staging_runs_one_smaller_predictor() -> None:
    staging, production = documents("staging"), documents("production")
    dep = find(staging, "Deployment", "predictor")
    assert dep["spec"]["replicas"] == 1
    assert find(staging, "HorizontalPodAutoscaler", "predictor")["spec"]["minReplicas"] == 1
    (small,) = dep["spec"]["template"]["spec"]["containers"]
    (big,) = find(production, "Deployment", "predictor")["spec"]["template"]["spec"]["containers"]
    assert cpu_millis(small["resources"]["requests"]["cpu"]) < cpu_millis(big["resources"]["requests"]["cpu"])
    # No disruption budget that one replica could never satisfy.
    assert not [d for d in staging if d["kind"] == "PodDisruptionBudget"]
    config = find(staging, "ConfigMap", "aicash-config")["data"]
    prod_config = find(production, "ConfigMap", "aicash-config")["data"]
    for key in ("MODEL_STORE_URL", "BACKUP_URL"):
        assert config[key] != prod_config[key], f"staging and production share {key}"
    hosts = {find(documents(o), "Ingress", "aicash")["spec"]["rules"][0]["host"] for o in OVERLAY_NAMES}
    assert len(hosts) == 2


def test_production_runs_three_predictors_spread_over_zones() -> None:
    docs = documents("production")
    dep = find(docs, "Deployment", "predictor")
    assert dep["spec"]["replicas"] == 3
    hpa = find(docs, "HorizontalPodAutoscaler", "predictor")
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] > 3
    spread = {c["topologyKey"]: c for c in dep["spec"]["template"]["spec"]["topologySpreadConstraints"]}
    assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= set(spread)
    zone = spread["topology.kubernetes.io/zone"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert zone["maxSkew"] == 1 and zone["labelSelector"]["matchLabels"].items() <= labels.items()
    assert find(docs, "PodDisruptionBudget", "predictor")["spec"]["minAvailable"] == 2


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_images_stay_placeholders_until_the_deploy_pins_them(overlay: str) -> None:
    for doc in documents(overlay):
        spec = doc.get("spec", {})
        pod = spec.get("template", spec.get("jobTemplate", {}).get("spec", {}).get("template", {})).get("spec")
        for c in [*(pod or {}).get("containers", []), *(pod or {}).get("initContainers", [])]:
            repo, _, tag = c["image"].rpartition(":")
            if "/aicash-" in repo:
                assert tag == "set-by-deploy", c["image"]
            else:
                assert tag and tag != "latest", c["image"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_backup_cronjob_dumps_then_uploads(overlay: str) -> None:
    docs = documents(overlay)
    cron = find(docs, "CronJob", "aicash-backup")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    minute, hour, *_ = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour == "*", "hourly: the recovery-point objective in docs/DEPLOYMENT.md is 1 h"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (dump,) = pod["initContainers"]
    (upload,) = pod["containers"]
    assert dump["image"].startswith("postgres:16.") and "pg_dump --format=custom" in " ".join(dump["command"])
    assert upload["command"][:4] == ["aicash", "db", "backup", "--dump-file"]
    path = upload["command"][4]
    assert f"--file={path}" in " ".join(dump["command"])
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (dump, upload)}
    assert mounts["pg-dump"]["/backup"] == mounts["upload"]["/backup"]
    config = find(docs, "ConfigMap", "aicash-config")["data"]
    assert config["BACKUP_URL"].startswith("s3://") and int(config["BACKUP_KEEP_DAILY"]) >= 1
    for c in (dump, upload):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
