"""k8s/base: the kustomize base builds, validates strictly against Kubernetes 1.30, and keeps its promises.

`kubectl kustomize` renders the base (when kubectl is absent, the resources are read and namespaced the
way kustomize would, as a fallback); `kubernetes-validate --strict` rejects unknown or misspelled fields.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.contract import APP_ENV, SECRET_ENV, SERVICES
from tests.infra.helpers import REPO, run, which

K8S = REPO / "k8s" / "base"
K8S_VERSION = "1.30.0"
DEPLOYMENTS = {"predictor", "indicators", "trainer-api", "trainer-worker", "trainer-beat", "webhook-worker"}


def build_without_kubectl() -> str:
    """Fallback when kubectl is missing: the resources with the namespace and images kustomize would set."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization.get("images", [])}
    docs = []
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
            spec = pod_spec(doc)
            for c in spec["containers"] if spec else []:
                c["image"] = images.get(c["image"], c["image"])
            docs.append(doc)
    return str(yaml.safe_dump_all(docs))


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in {"Deployment", "Job"}:
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


@pytest.fixture(scope="module")
def rendered_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kubectl = which("kubectl")
    text = run([kubectl, "kustomize", str(K8S)]).stdout if kubectl else build_without_kubectl()
    path = tmp_path_factory.mktemp("k8s") / "rendered.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def docs(rendered_file: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered_file.read_text()) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def test_kubernetes_validate_strict(tool: Callable[[str], str], rendered_file: Path) -> None:
    validate = tool("kubernetes-validate")
    out = run(
        [
            validate,
            "--strict",
            "--kubernetes-version",
            K8S_VERSION,
            str(rendered_file),
            str(K8S / "secret.template.yaml"),
        ]
    )
    assert "ERROR" not in out.stdout + out.stderr


def test_strict_validation_rejects_a_misspelled_field(
    tool: Callable[[str], str], rendered_file: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(rendered_file.read_text().replace("readinessProbe:", "readynessProbe:", 1))
    out = run([tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(bad)], check=False)
    assert out.returncode != 0


def test_expected_objects(docs: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {
        ("Namespace", "aicash"),
        ("ConfigMap", "aicash-config"),
        ("Job", "aicash-migrate"),
        ("Ingress", "aicash"),
        ("PodDisruptionBudget", "predictor"),
        ("HorizontalPodAutoscaler", "predictor"),
    }
    expected |= {("Deployment", d) for d in DEPLOYMENTS}
    expected |= {("Service", s) for s in ("predictor", "indicators", "trainer-api")}
    assert expected <= kinds, sorted(expected - kinds)
    assert not any(k == "Secret" for k, _ in kinds), "the base must not carry a Secret (see secret.template.yaml)"
    assert all(d["metadata"].get("namespace") == "aicash" for d in docs if d["kind"] != "Namespace")


def test_predictor_deployment(docs: list[dict[str, Any]]) -> None:
    dep = find(docs, "Deployment", "predictor")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["port"] in ("http", 8080)
    assert c["ports"] == [{"name": "http", "containerPort": 8080}]


def test_predictor_pdb_and_hpa(docs: list[dict[str, Any]]) -> None:
    labels = find(docs, "Deployment", "predictor")["spec"]["template"]["metadata"]["labels"]
    pdb = find(docs, "PodDisruptionBudget", "predictor")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < 3
    hpa = find(docs, "HorizontalPodAutoscaler", "predictor")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "predictor"}
    assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("name", ["trainer-worker", "trainer-beat"])
def test_singletons_run_exactly_once(docs: list[dict[str, Any]], name: str) -> None:
    dep = find(docs, "Deployment", name)
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_container(docs: list[dict[str, Any]], name: str) -> None:
    spec = find(docs, "Deployment", name)["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    contract = SERVICES[name if name != "predictor" else "predictor"]
    assert c["command"] == contract["command"]
    repo, tag = c["image"].rsplit(":", 1)
    assert repo.endswith(f"/aicash-{contract['image']}") and tag and tag != "latest", c["image"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name} lacks {kind}"
    if contract["port"]:
        assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    # Restricted pod security: non-root, read-only root, nothing to escalate.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("name", [*sorted(DEPLOYMENTS), "aicash-migrate"])
def test_env_comes_from_configmap_and_secret(docs: list[dict[str, Any]], name: str) -> None:
    kind = "Job" if name == "aicash-migrate" else "Deployment"
    (c,) = find(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    assert c["envFrom"] == [{"configMapRef": {"name": "aicash-config"}}, {"secretRef": {"name": "aicash-secrets"}}]
    config = find(docs, "ConfigMap", "aicash-config")["data"]
    secret = yaml.safe_load((K8S / "secret.template.yaml").read_text())
    assert secret["metadata"]["name"] == "aicash-secrets"
    provided = set(config) | set(secret["stringData"])
    assert provided >= APP_ENV, sorted(APP_ENV - provided)
    assert not SECRET_ENV & set(config), "secrets must not be in the ConfigMap"
    assert set(secret["stringData"]) >= SECRET_ENV


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_prometheus_multiproc_dir_is_an_empty_dir(docs: list[dict[str, Any]], name: str) -> None:
    spec = find(docs, "Deployment", name)["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    path = find(docs, "ConfigMap", "aicash-config")["data"]["PROMETHEUS_MULTIPROC_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert path in mounts, f"{name} does not mount {path}"
    assert "emptyDir" in volumes[mounts[path]]


def test_migration_job(docs: list[dict[str, Any]]) -> None:
    job = find(docs, "Job", "aicash-migrate")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["aicash", "db", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "migrate"


def test_services_select_pods_and_ports(docs: list[dict[str, Any]]) -> None:
    for svc in (d for d in docs if d["kind"] == "Service"):
        name = svc["metadata"]["name"]
        dep = find(docs, "Deployment", name)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), name
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports and port["port"] == SERVICES[name]["port"], name


def test_ingress_routes(docs: list[dict[str, Any]]) -> None:
    ing = find(docs, "Ingress", "aicash")
    (rule,) = ing["spec"]["rules"]
    routes = {p["path"]: p["backend"]["service"]["name"] for p in rule["http"]["paths"]}
    assert routes == {
        "/v1/indicators": "indicators",
        "/v1/bars": "indicators",
        "/v1/jobs": "trainer-api",
        "/v1/models": "trainer-api",
        "/v1/series": "indicators",
        "/v1/retrain-decisions": "trainer-api",
        "/ui": "trainer-api",
        "/": "predictor",
    }
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for p in rule["http"]["paths"]:
        backend = p["backend"]["service"]
        assert backend["port"]["name"] in {sp["name"] for sp in services[backend["name"]]["spec"]["ports"]}
    body = ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body.rstrip("m")) >= 10


def test_images_are_placeholders_until_deploy_pins_them() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    names = {i["name"] for i in kustomization["images"]}
    assert names == {f"aicash-{s}" for s in ("predictor", "indicators", "trainer")}
    workflow = (REPO / ".github" / "workflows" / "deploy.yml").read_text()
    for name in names:
        assert f'"{name}=$prefix/{name}:$SHA"' in workflow, f"deploy.yml does not pin {name}"


def test_trainer_api_enqueues_to_the_queue_the_worker_consumes(docs: list[dict[str, Any]]) -> None:
    (worker,) = find(docs, "Deployment", "trainer-worker")["spec"]["template"]["spec"]["containers"]
    queue = worker["command"][worker["command"].index("-Q") + 1]
    assert find(docs, "ConfigMap", "aicash-config")["data"]["TRAINER_QUEUE"] == queue
