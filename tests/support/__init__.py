"""Plain helpers the tests import: keys, clients, ports and processes, per-service constants.

Fixtures stay in the conftest files; anything a test module imports by name lives here, so no test imports a
conftest (pytest loads those itself, and importing one a second time as a module runs it twice).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
