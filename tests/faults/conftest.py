"""The fault-injection suite (`pytest -m faults`): every test in this folder carries the `faults` mark.

Cases that live beside the code they exercise (tests/trainer/test_worker.py, say) carry the mark themselves.
Each case states its pass criterion and the bound it measured in its docstring; docs/RELIABILITY.md collects
them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)
