"""Lifecycle under load: an admin promotes a candidate and rolls it back while clients send 10,000 predictions
across two predictor processes. Prints a Markdown section.

    .venv/bin/python -m benchmarks.bench_lifecycle            # 10,000 requests, 32 in flight
    .venv/bin/python -m benchmarks.bench_lifecycle --quick    # 3,000 requests

Real stack, one process each: the indicators service, the trainer API (the control plane: it owns the registry)
and two predictor processes (one uvicorn worker each: two processes, as two replicas would be). The registry
holds v1 (production) and v2 (candidate) for one series. The load alternates between the predictors; each
request names its own user id. At 30 % of the requests `POST /v1/models/{v2}/promote`, at 65 %
`POST /v1/models/{symbol}/{timeframe}/rollback`. Reported: failed requests (any status other than 200, any
transport error), the versions seen (each response's `model_version` must be v1 or v2), and per process the
switch time: from the admin call's answer until the last response that was *sent after it* still carried the
old version (0 when the next request already had the new one). The goal of issue 9: every process within 5 s,
zero failures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

READ_KEY = "bench-read-secret-0001"
WRITE_KEY = "bench-write-secret-001"
ADMIN_KEY = "bench-admin-secret-01"
API_KEYS = f"reader:read:{READ_KEY},writer:write:{WRITE_KEY},admin:admin:{ADMIN_KEY}"
SYMBOL, TF = "LIFE1", "H1"


@dataclass(frozen=True, slots=True)
class Sample:
    proc: int
    sent: float
    done: float
    status: int  # 0: transport error
    version: str | None


@contextlib.contextmanager
def stack(tmp: Path) -> Iterator[dict[str, Any]]:
    """Indicators, trainer API and two predictors on a scratch database with v1 production, v2 candidate."""
    import asyncpg

    from benchmarks.common import temporary_database, uvicorn_server
    from shared.bars import bars_to_rows
    from shared.features import feature_rows
    from shared.storage import store_from_url
    from tests.data import generate_bars
    from tests.predictor.model_factory import feature_scaler, register, write_model

    with contextlib.ExitStack() as es:
        db_url = es.enter_context(temporary_database())
        env = {"DATABASE_URL": db_url, "API_KEYS": API_KEYS, "ENVIRONMENT": "test", "LOG_LEVEL": "WARNING"}
        ind_url = es.enter_context(uvicorn_server("services.indicators.main:app", env))
        bars = generate_bars(TF, 1500, seed=11)
        with httpx.Client(base_url=ind_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as c:
            c.post(f"/v1/bars/{SYMBOL}/{TF}", json={"bars": bars_to_rows(bars)}).raise_for_status()
        mean, scale = feature_scaler(feature_rows(bars).values)
        store_url = f"file://{tmp / 'models'}"
        store = store_from_url(store_url)

        async def models() -> dict[str, int]:
            for version, seed, status in (("v1", 1, "production"), ("v2", 2, "candidate")):
                sha = write_model(store, SYMBOL, TF, version, seed=seed, mean=mean, scale=scale)
                await register(db_url, store, SYMBOL, TF, version, sha, status=status)
            conn = await asyncpg.connect(db_url)
            try:
                rows = await conn.fetch("SELECT version, id FROM model_versions WHERE symbol = $1", SYMBOL)
            finally:
                await conn.close()
            return {r["version"]: r["id"] for r in rows}

        ids = asyncio.run(models())
        trainer_url = es.enter_context(uvicorn_server("services.trainer.main:app", env))
        penv = {
            **env,
            "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            "INDICATORS_URL": ind_url,
            "INDICATORS_API_KEY": READ_KEY,
            "MODEL_STORE_URL": store_url,
        }
        predictors = [es.enter_context(uvicorn_server("services.predictor.main:app", penv)) for _ in range(2)]
        yield {"db_url": db_url, "trainer": trainer_url, "predictors": predictors, "ids": ids}


async def load(
    predictors: list[str], trainer: str, ids: dict[str, int], requests: int, concurrency: int
) -> tuple[list[Sample], dict[str, float]]:
    """Send `requests` predictions; promote v2 at 30 % and roll back at 65 %. Returns the samples and the
    monotonic time at which each admin call was sent (`*_sent`) and answered."""
    sent = 0
    samples: list[Sample] = []
    # Set by the workers when the request count crosses 30 % and 65 %.
    marks = [(int(requests * 0.30), asyncio.Event()), (int(requests * 0.65), asyncio.Event())]
    actions: dict[str, float] = {}
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=10, limits=limits, headers={"X-API-Key": READ_KEY}) as client:
        # Both processes answer before the clock starts (models loaded, features warm).
        for url in predictors:
            for _ in range(100):
                r = await client.post(url + "/v1/predictions", json={"symbol": SYMBOL, "timeframe": TF})
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.2)
            r.raise_for_status()

        async def worker() -> None:
            nonlocal sent
            while sent < requests:
                i = sent
                sent += 1
                for at, event in marks:
                    if i == at:
                        event.set()
                proc = i % len(predictors)
                body = {"symbol": SYMBOL, "timeframe": TF, "user_id": f"user-{i}"}
                t0 = time.monotonic()
                try:
                    r = await client.post(predictors[proc] + "/v1/predictions", json=body)
                    status, version = r.status_code, r.json().get("model_version") if r.status_code == 200 else None
                except httpx.HTTPError:
                    status, version = 0, None
                samples.append(Sample(proc, t0, time.monotonic(), status, version))

        async def admin() -> None:
            h = {"X-API-Key": ADMIN_KEY}
            async with httpx.AsyncClient(base_url=trainer, timeout=10, headers=h) as c:
                await marks[0][1].wait()
                actions["promote_sent"] = time.monotonic()
                (await c.post(f"/v1/models/{ids['v2']}/promote")).raise_for_status()
                actions["promote"] = time.monotonic()
                await marks[1][1].wait()
                actions["rollback_sent"] = time.monotonic()
                (await c.post(f"/v1/models/{SYMBOL}/{TF}/rollback")).raise_for_status()
                actions["rollback"] = time.monotonic()

        await asyncio.gather(admin(), *(worker() for _ in range(concurrency)))
    return samples, actions


def switch_seconds(samples: list[Sample], at: float, until: float, old: str, new: str, proc: int) -> float | None:
    """Per process: from `at` until the last response sent after `at` that still had the old version; 0 when none
    did. None when no request reached the new version. Only responses answered before `until` (the next admin call
    was sent) count: on this loaded client a request stamped as sent may go out hundreds of ms later, after the
    next change, and rightly carry the version that change restored."""
    after = [s for s in samples if s.proc == proc and at <= s.sent and s.done < until and s.status == 200]
    if not any(s.version == new for s in after):
        return None
    stale = [s.done - at for s in after if s.version == old]
    return max(stale, default=0.0)


def first_new_seconds(samples: list[Sample], sent: float, new: str, proc: int) -> float | None:
    """Per process: from the admin call being sent until the first response carrying the new version (the
    commit, the NOTIFY, the reload and one request, as this client saw them)."""
    done = [s.done for s in samples if s.proc == proc and s.sent >= sent and s.version == new]
    return min(done) - sent if done else None


def summarise(samples: list[Sample], actions: dict[str, float]) -> dict[str, Any]:
    failed = [s for s in samples if s.status != 200]
    versions = sorted({s.version for s in samples if s.version is not None})
    end = max(s.sent for s in samples) + 1
    out: dict[str, Any] = {
        "requests": len(samples),
        "failed": len(failed),
        "failed_statuses": sorted({s.status for s in failed}),
        "versions": versions,
        "seconds": max(s.done for s in samples) - min(s.sent for s in samples),
    }
    # The promote window ends when the rollback call is *sent*: the rollback commits before its answer reaches this
    # busy client, so responses sent in between may rightly carry v1 again.
    promote, rollback, rollback_sent = actions["promote"], actions["rollback"], actions["rollback_sent"]
    out["admin_call_ms"] = {
        "promote": (promote - actions["promote_sent"]) * 1000,
        "rollback": (rollback - rollback_sent) * 1000,
    }
    for proc in sorted({s.proc for s in samples}):
        out[f"promote_switch_s_{proc}"] = switch_seconds(samples, promote, rollback_sent, "v1", "v2", proc)
        out[f"rollback_switch_s_{proc}"] = switch_seconds(samples, rollback, end, "v2", "v1", proc)
        out[f"promote_first_s_{proc}"] = first_new_seconds(samples, actions["promote_sent"], "v2", proc)
        out[f"rollback_first_s_{proc}"] = first_new_seconds(samples, rollback_sent, "v1", proc)
    return out


def run(requests: int = 10_000, concurrency: int = 32) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp, stack(Path(tmp)) as s:
        samples, actions = asyncio.run(load(s["predictors"], s["trainer"], s["ids"], requests, concurrency))
    return summarise(samples, actions)


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v * 1000:.0f} ms"


def markdown(r: dict[str, Any], concurrency: int) -> list[str]:
    procs = sorted(int(k.rsplit("_", 1)[1]) for k in r if k.startswith("promote_switch_s_"))
    return [
        "## Lifecycle: promote and roll back under load",
        "",
        f"{r['requests']:,} predictions ({concurrency} in flight, alternating between two predictor processes, a user "
        f"id each) in {r['seconds']:.1f} s; the trainer API promoted v2 at 30 % and rolled back at 65 % "
        "(`benchmarks/bench_lifecycle.py`). Switch time: from the admin call's answer until the last response sent "
        "after it that still carried the old version (for the promote, among the responses received before the "
        "rollback call was sent). "
        f"The admin calls took {r['admin_call_ms']['promote']:.0f} ms (promote) and "
        f"{r['admin_call_ms']['rollback']:.0f} ms (rollback) as this loaded client saw them.",
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| failed requests | {r['failed']} {r['failed_statuses'] or ''} | 0 |",
        f"| versions in responses | {', '.join(r['versions'])} | v1, v2 only |",
        *(
            f"| process {p}: promote switch / rollback switch | {_s(r[f'promote_switch_s_{p}'])} / "
            f"{_s(r[f'rollback_switch_s_{p}'])} | < 5 s |\n"
            f"| process {p}: call sent → first response with the new version, promote / rollback | "
            f"{_s(r[f'promote_first_s_{p}'])} / {_s(r[f'rollback_first_s_{p}'])} | < 5 s |"
            for p in procs
        ),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3,000 requests")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    n = args.requests or (3_000 if args.quick else 10_000)
    print("\n".join(markdown(run(n, args.concurrency), args.concurrency)))


if __name__ == "__main__":
    main()
