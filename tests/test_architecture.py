"""The import rules of docs/ARCHITECTURE.md, checked on the source and in fresh processes.

- services never import each other; `shared/` imports no service;
- the trainer's API modules never reach task code, the job runner or TensorFlow;
- no import cycle inside a service's package (module-level imports; imports inside functions are deliberate
  lazy edges and are allowed to point anywhere within the rules above).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("indicators", "predictor", "trainer")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` blocks and the like
            out.update(_imports_in(node.body))
    return out


def _imports_in(body: list[ast.stmt]) -> set[str]:
    out: set[str] = set()
    for node in body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    others = [f"services.{s}" for s in SERVICES if s != service]
    bad = {
        f"{_module(p)} -> {m}"
        for p in _sources(f"services/{service}")
        for m in _imports(p, top_level_only=False)
        if any(m == o or m.startswith(o + ".") for o in others)
    }
    assert not bad, sorted(bad)


def test_shared_imports_no_service() -> None:
    bad = {
        f"{_module(p)} -> {m}"
        for p in _sources("shared")
        for m in _imports(p, top_level_only=True)
        if m.startswith("services.")
    }
    assert not bad, sorted(bad)


@pytest.mark.parametrize("service", SERVICES)
def test_no_import_cycle_inside_a_service(service: str) -> None:
    modules = {_module(p): p for p in _sources(f"services/{service}")}
    graph = {
        name: {m for m in _imports(path, top_level_only=True) if m in modules and m != name}
        for name, path in modules.items()
    }
    # Depth-first search for a back edge; report the cycle it closes.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


# What each service's API process must never load: task code, the job runner, the training stack.
_FORBIDDEN = {
    "services.trainer.main": [
        "services.trainer.tasks",
        "services.trainer.jobs",
        "services.trainer.quality_jobs",
        "services.trainer.model",
        "tensorflow",
        "keras",
        "talib",
        "shap",
        "pandas_ta",
    ],
    "services.predictor.main": ["tensorflow", "keras", "shap", "celery", "talib", "pandas_ta", "services.trainer"],
    "services.indicators.main": ["tensorflow", "keras", "shap", "celery", "onnxruntime", "pandas_ta"],
}


@pytest.mark.parametrize("module", sorted(_FORBIDDEN))
def test_each_api_imports_in_a_fresh_process_without_tasks_or_tensorflow(module: str) -> None:
    code = (
        "import json, sys\n"
        f"import {module}\n"
        f"bad = [m for m in {_FORBIDDEN[module]!r} if any(k == m or k.startswith(m + '.') for k in sys.modules)]\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run(  # our interpreter, our code
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
