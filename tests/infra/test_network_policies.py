"""NetworkPolicies of the rendered overlays, evaluated the way the Kubernetes API defines them.

A connection passes when the sender's egress and the receiver's ingress both allow it: a pod selected by
no policy of a direction is open in that direction; a pod selected by one or more is open only to what one
of their rules lists (peers by pod selector in the policy's namespace, namespace selector, both, or IP
block; ports by number, name or range and protocol). The needed flows must pass; the others must not.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.infra.kustomize import NAMESPACES, OVERLAY_NAMES, documents

Labels = dict[str, str]


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Labels
    ports: dict[str, int] = field(default_factory=dict)  # named container ports


@dataclass(frozen=True)
class External:
    ip: str


Endpoint = Pod | External


def selects(selector: dict[str, Any] | None, labels: Labels) -> bool:
    """Label selector semantics: matchLabels and matchExpressions; `{}` selects everything."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def namespace_labels(name: str) -> Labels:
    return {"kubernetes.io/metadata.name": name}  # set by the API server on every namespace


def peer_matches(peer: dict[str, Any], policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if not isinstance(other, External):
            return False  # pod IPs are matched by selectors; ipBlock targets cluster-external addresses
        ip = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if not isinstance(other, Pod):
        return False
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_sel is None:
        in_ns = other.namespace == policy_ns
    else:
        in_ns = selects(ns_sel, namespace_labels(other.namespace))
    return in_ns and (pod_sel is None or selects(pod_sel, other.labels))


def port_matches(rule_ports: list[dict[str, Any]] | None, port: int, protocol: str, target: Endpoint) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        want = p["port"]
        if isinstance(want, str):
            if isinstance(target, Pod) and target.ports.get(want) == port:
                return True
            continue
        if want <= port <= p.get("endPort", want):
            return True
    return False


class Policies:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.items = [d for d in docs if d["kind"] == "NetworkPolicy"]

    def _selecting(self, pod: Pod, direction: str) -> list[dict[str, Any]]:
        out = []
        for pol in self.items:
            default = ["Ingress", "Egress"] if "egress" in pol["spec"] else ["Ingress"]
            types = pol["spec"].get("policyTypes") or default
            if direction in types and pol["metadata"]["namespace"] == pod.namespace:
                if selects(pol["spec"]["podSelector"], pod.labels):
                    out.append(pol)
        return out

    def _allowed(self, pod: Pod, direction: str, other: Endpoint, port: int, protocol: str, target: Endpoint) -> bool:
        policies = self._selecting(pod, direction)
        if not policies:
            return True
        key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        for pol in policies:
            for rule in pol["spec"].get(key, []):
                peers = rule.get(peers_key)
                peer_ok = not peers or any(peer_matches(p, pol["metadata"]["namespace"], other) for p in peers)
                if peer_ok and port_matches(rule.get("ports"), port, protocol, target):
                    return True
        return False

    def allows(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
        egress = not isinstance(src, Pod) or self._allowed(src, "Egress", dst, port, protocol, dst)
        ingress = not isinstance(dst, Pod) or self._allowed(dst, "Ingress", src, port, protocol, dst)
        return egress and ingress


def app_pods(docs: list[dict[str, Any]]) -> dict[str, Pod]:
    """Every pod template of the overlay (Deployments, the Job, the CronJob) by app name."""
    pods: dict[str, Pod] = {}
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if d["kind"] not in {"Deployment", "Job", "CronJob"}:
            continue
        template = spec["template"]
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        labels = template["metadata"]["labels"]
        pods[labels["app.kubernetes.io/name"]] = Pod(d["metadata"]["namespace"], labels, ports)
    return pods


INGRESS_CONTROLLER = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
DNS = Pod("kube-system", {"k8s-app": "kube-dns"})
STRANGER = Pod("default", {"app": "curl"})
# Managed PostgreSQL / Redis / S3 outside the cluster, and a webhook receiver on the internet.
DATA_STORE = External("203.0.113.10")
INTERNET = External("198.51.100.7")
METADATA = External("169.254.169.254")
SERVICE_PORTS = {"predictor": 8080, "indicators": 8081, "trainer-api": 8082}
CONNECTED = ["predictor", "indicators", "trainer-api", "trainer-worker", "trainer-beat", "webhook-worker"]


@pytest.fixture(scope="module", params=OVERLAY_NAMES)
def cluster(request: pytest.FixtureRequest) -> tuple[Policies, dict[str, Pod]]:
    docs = documents(request.param)
    pods = app_pods(docs)
    assert set(pods) >= {*CONNECTED, "aicash-migrate", "aicash-backup"}
    assert {p.namespace for p in pods.values()} == {NAMESPACES[request.param]}
    return Policies(docs), pods


def test_the_namespace_denies_by_default(cluster: tuple[Policies, dict[str, Pod]]) -> None:
    policies, pods = cluster
    defaults = [p for p in policies.items if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert any(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not p["spec"].get("egress") for p in defaults)
    for name, pod in pods.items():
        assert policies._selecting(pod, "Ingress") and policies._selecting(pod, "Egress"), name


def test_needed_flows_are_allowed(cluster: tuple[Policies, dict[str, Pod]]) -> None:
    policies, pods = cluster
    needed: list[tuple[str, Endpoint, Endpoint, int, str]] = []
    for name, port in SERVICE_PORTS.items():  # the Ingress routes to all three (k8s/base/ingress.yaml)
        needed.append((f"ingress -> {name}", INGRESS_CONTROLLER, pods[name], port, "TCP"))
        needed.append((f"prometheus -> {name} /metrics", PROMETHEUS, pods[name], port, "TCP"))
    needed.append(("predictor -> indicators", pods["predictor"], pods["indicators"], 8081, "TCP"))
    needed.append(("predictor -> trainer-api (explanations)", pods["predictor"], pods["trainer-api"], 8082, "TCP"))
    # The console at the trainer's /ui calls the other two services' APIs with its user's key.
    needed.append(("trainer-api -> predictor (console)", pods["trainer-api"], pods["predictor"], 8080, "TCP"))
    needed.append(("trainer-api -> indicators (console)", pods["trainer-api"], pods["indicators"], 8081, "TCP"))
    for name in [*CONNECTED, "aicash-migrate", "aicash-backup"]:
        needed.append((f"{name} -> DNS", pods[name], DNS, 53, "UDP"))
        needed.append((f"{name} -> PostgreSQL", pods[name], DATA_STORE, 5432, "TCP"))
    for name in CONNECTED:
        needed.append((f"{name} -> Redis", pods[name], DATA_STORE, 6379, "TCP"))
    for name in ("predictor", "trainer-api", "trainer-worker", "aicash-backup"):
        needed.append((f"{name} -> S3", pods[name], DATA_STORE, 443, "TCP"))
    needed.append(("webhook-worker -> a receiver", pods["webhook-worker"], INTERNET, 8443, "TCP"))
    blocked = [what for what, src, dst, port, proto in needed if not policies.allows(src, dst, port, proto)]
    assert not blocked, blocked


def test_unneeded_flows_are_denied(cluster: tuple[Policies, dict[str, Pod]]) -> None:
    policies, pods = cluster
    denied: list[tuple[str, Endpoint, Endpoint, int]] = [
        ("indicators -> trainer-api", pods["indicators"], pods["trainer-api"], 8082),
        ("indicators -> predictor", pods["indicators"], pods["predictor"], 8080),
        ("trainer-api -> predictor on another port", pods["trainer-api"], pods["predictor"], 9000),
        ("trainer-worker -> predictor", pods["trainer-worker"], pods["predictor"], 8080),
        ("trainer-worker -> indicators", pods["trainer-worker"], pods["indicators"], 8081),
        ("webhook-worker -> indicators", pods["webhook-worker"], pods["indicators"], 8081),
        ("predictor -> indicators on another port", pods["predictor"], pods["indicators"], 9000),
        ("another namespace -> predictor", STRANGER, pods["predictor"], 8080),
        ("ingress -> trainer-worker", INGRESS_CONTROLLER, pods["trainer-worker"], 8080),
        ("indicators -> the internet", pods["indicators"], INTERNET, 8443),
        ("predictor -> cloud metadata", pods["predictor"], METADATA, 443),
        ("webhook-worker -> a private address", pods["webhook-worker"], External("10.1.2.3"), 8080),
        ("backup -> indicators", pods["aicash-backup"], pods["indicators"], 8081),
    ]
    passed = [what for what, src, dst, port in denied if policies.allows(src, dst, port)]
    assert not passed, passed


def test_the_evaluator_sees_a_policy_open_a_flow(cluster: tuple[Policies, dict[str, Pod]]) -> None:
    """The checker itself: adding an allow-all for indicators egress and trainer-api ingress opens the flow."""
    policies, pods = cluster
    ns = pods["indicators"].namespace
    extra = Policies([])
    extra.items = [
        *policies.items,
        {
            "kind": "NetworkPolicy",
            "metadata": {"name": "oops", "namespace": ns},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]},
        },
    ]
    assert not policies.allows(pods["indicators"], pods["trainer-api"], 8082)
    assert extra.allows(pods["indicators"], pods["trainer-api"], 8082)
