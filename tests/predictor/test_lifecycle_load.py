"""Promote and roll back through the trainer API while two predictor processes serve: no failed request, only
the two versions in answers, each process switched within 5 s (the benchmark's code, at the size of issue 12's
fault case 7: 10,000 requests, 32 in flight, over two predictor processes).

The measured figures are printed (`-s`); see docs/BENCHMARKS.md for a quiet machine's. Measured on a loaded 2-core
machine (load average 6): 10,000 requests in 117 s, 0 failed, versions v1 and v2 only; switch 0 s on both
processes for promote and rollback (the first response sent after the admin call's answer already carried the new
version); from the call being sent to the first new answer 2.7 s (promote; the call itself took 2.7 s) and
0.4 s (rollback)."""

from __future__ import annotations

import pytest

from benchmarks.bench_lifecycle import run


@pytest.mark.faults
def test_promote_and_rollback_under_load_fail_no_request(
    server_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The benchmark makes (and drops) its own scratch database on the server.
    monkeypatch.setenv("DATABASE_URL", server_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    result = run(requests=10_000, concurrency=32)
    print(f"\nlifecycle under load: {result}")
    assert result["requests"] == 10_000
    assert result["failed"] == 0, result
    assert result["versions"] == ["v1", "v2"], result
    for proc in (0, 1):
        for action in ("promote", "rollback"):
            switch = result[f"{action}_switch_s_{proc}"]
            assert switch is not None, f"process {proc} never served the version after {action}: {result}"
            assert switch < 5.0, result
