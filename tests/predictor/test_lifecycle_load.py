"""Promote and roll back through the trainer API while two predictor processes serve: no failed request, only
the two versions in answers, each process switched within 5 s (the benchmark's code, at a test's size)."""

from __future__ import annotations

import pytest

from benchmarks.bench_lifecycle import run


def test_promote_and_rollback_under_load_fail_no_request(
    server_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The benchmark makes (and drops) its own scratch database on the server.
    monkeypatch.setenv("DATABASE_URL", server_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    result = run(requests=1_500, concurrency=16)
    assert result["failed"] == 0, result
    assert result["versions"] == ["v1", "v2"], result
    for proc in (0, 1):
        for action in ("promote", "rollback"):
            switch = result[f"{action}_switch_s_{proc}"]
            assert switch is not None, f"process {proc} never served the version after {action}: {result}"
            assert switch < 5.0, result
