"""Schemathesis against the three running services, as a new user would run it: all checks, the examples,
coverage and fuzzing phases, without a key and with the admin key.

The only failures allowed are the ones listed, each with why a schema cannot state it, in
tests/contract/accepted_failures.json (schemathesis's own `--baseline` file). Anything else fails the test with
schemathesis's report. Measured on the shared 2-core machine, loaded by other work (2026-12-01): the whole
module 179 s (the services' start, migrations and data 44 s; each of the 6 runs its `MAX_TIME_S` budget plus
3-8 s of schema loading and the examples and coverage phases; 640-1,380 test cases a run).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.local_services import scratch_database
from tests.support.contract import ACCEPTED_FAILURES, SERVICES, running_services, schemathesis_run
from tests.support.keys import ADMIN_KEY

pytestmark = pytest.mark.slow

# The fuzzing phase repeats until its budget is spent; the examples and coverage phases always run whole.
MAX_TIME_S = 15
CHECKS = {
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
    "object_level_authorization",
}


@pytest.fixture(scope="module")
def services(server_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The services on a database of their own: with the admin key schemathesis promotes, rolls back and
    changes rollouts by any id it tries, which must not touch the rows other tests of the run registered."""
    with (
        scratch_database(server_url, "aicash_contract") as database_url,
        running_services(database_url, redis_url, tmp_path_factory.mktemp("contract")) as urls,
    ):
        yield urls


@pytest.mark.parametrize("key", [None, ADMIN_KEY], ids=["no-key", "admin-key"])
@pytest.mark.parametrize("service", SERVICES)
def test_schemathesis_finds_nothing_new(
    services: dict[str, str], service: str, key: str | None, tmp_path: Path
) -> None:
    run = schemathesis_run(services[service], tmp_path / "report.json", key=key, max_time_s=MAX_TIME_S)
    report = run.report
    assert report, f"schemathesis wrote no report (exit {run.returncode}):\n{run.output}"
    print(
        f"{service} {'admin key' if key else 'no key'}: {report['test_cases']['generated']} cases in "
        f"{report['running_time']:.1f} s; {report['baseline']['known']} accepted failures seen"
    )
    assert report["complete"], run.output
    assert report["operations"]["tested"] == report["operations"]["selected"] > 0, run.output
    assert not report["errors"], run.output
    assert not report["failures"], run.output
    assert run.returncode == 0, run.output


def test_accepted_failures_are_reviewed(services: dict[str, str]) -> None:
    """Each accepted failure names a real operation of its service, a schemathesis check, and why no schema can
    state the rule the service applies."""
    document = json.loads(ACCEPTED_FAILURES.read_text())
    operations = {name: _operations(url) for name, url in services.items()}
    seen = set()
    for entry in document["entries"]:
        where = f"entry {entry.get('id')} ({entry.get('operation')})"
        assert entry.get("service") in SERVICES, where
        assert entry["operation"] in operations[entry["service"]], where
        assert entry["check"] in CHECKS, where
        assert len(str(entry.get("why", ""))) >= 40, f"{where}: say why a schema cannot state it"
        assert "expires" not in entry, f"{where}: an accepted failure is accepted for good or fixed"
        identity = (entry["operation"], entry["check"], entry["failure"], entry["signature"])
        assert identity not in seen, where
        seen.add(identity)


def _operations(base_url: str) -> set[str]:
    schema = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    return {f"{method.upper()} {path}" for path, item in schema["paths"].items() for method in item}
