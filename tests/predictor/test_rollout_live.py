"""A rollout change, made with SQL on the table the trainer writes, reaches two predictor processes (uvicorn)
within 5 s while a client keeps sending requests, none of which fails."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from services.predictor.routing import bucket
from shared.storage import ObjectStore
from tests.support.keys import READ_KEY
from tests.support.net import free_port, start_uvicorn, stop_all
from tests.support.predictor import predictor_env
from tests.support.routing import ingest, production_and_candidate, set_rollout

SYM = "ROUT2"
USERS = [f"live-user-{i}" for i in range(50)]
# Far above the 5 s target: only the NOTIFY on the rollouts table can bring a change in time.
POLL_SECONDS = 60
LAG_LIMIT_S = 5.0
ROLLOUT_SALT = "live-test-salt"


@dataclass(frozen=True)
class Answer:
    process: int
    started: float
    status: int
    variant: str | None
    model_version: str | None


@pytest.fixture(scope="module")
async def candidate_id(
    indicators_url: str, database_url: str, store: ObjectStore, scaler: tuple[list[float], list[float]]
) -> int:
    await ingest(indicators_url, SYM, seed=17)
    cid = await production_and_candidate(database_url, store, SYM, scaler)
    await set_rollout(
        database_url,
        SYM,
        candidate_model_id=cid,
        candidate_traffic_percent=0.0,
        test_group_user_ids=[],
        rollout_symbols=[],
        shadow=False,
    )
    return cid


@pytest.fixture(scope="module")
def two_predictors(
    candidate_id: int,
    database_url: str,
    redis_url: str,
    indicators_url: str,
    store_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[str]]:
    env = predictor_env(
        database_url,
        redis_url,
        indicators_url,
        store_url,
        MODEL_POLL_SECONDS=str(POLL_SECONDS),
        USER_ID_SALT="test-salt",
        ROLLOUT_SALT=ROLLOUT_SALT,
        LOG_LEVEL="WARNING",
    )
    logs = tmp_path_factory.mktemp("rollout-live")
    procs = []
    urls = []
    try:
        for i in range(2):
            port = free_port()
            procs.append(start_uvicorn("services.predictor.main:app", port, env, logs / f"predictor-{i}.log"))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        stop_all(procs, timeout_s=10.0)


async def _ask(client: httpx.AsyncClient, process: int, user: str, no_cache: bool) -> Answer:
    started = time.monotonic()
    try:
        r = await client.post(
            "/v1/predictions",
            json={"symbol": SYM, "timeframe": "H1", "user_id": user},
            headers={"Cache-Control": "no-cache"} if no_cache else {},
        )
    except httpx.HTTPError:
        return Answer(process, started, 0, None, None)
    if r.status_code != 200:
        return Answer(process, started, r.status_code, None, None)
    body = r.json()
    return Answer(process, started, 200, body["variant"], body["model_version"])


async def _until_all(clients: list[httpx.AsyncClient], variant: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = [await _ask(c, i, "probe", True) for i, c in enumerate(clients)]
        if all(a.variant == variant for a in got):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not every predictor serves {variant} within {timeout_s} s")


class Load:
    """Concurrent client loops against both processes, recording every answer."""

    def __init__(self, clients: list[httpx.AsyncClient], loops_per_process: int = 2) -> None:
        self.clients = clients
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._loop(i, random.Random(i * 100 + k)))
            for i in range(len(clients))
            for k in range(loops_per_process)
        ]

    async def _loop(self, process: int, rng: random.Random) -> None:
        while not self._stop.is_set():
            answer = await _ask(self.clients[process], process, rng.choice(USERS), rng.random() < 0.2)
            self.answers.append(answer)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def _switch(database_url: str, load: Load, sql: str, new: str, processes: int) -> dict[int, float]:
    """Run `sql` (one UPDATE of the rollouts row) under the load and return, per process, how long after it
    the last request answered with the old variant was sent."""
    conn = await asyncpg.connect(database_url)
    try:
        t0 = time.monotonic()  # before the statement: the lag measured is, if anything, too long
        status = await conn.execute(sql, SYM)
        assert status == "UPDATE 1"
    finally:
        await conn.close()
    # Keep the load running past the limit: any answer of the old variant after it is a miss.
    await asyncio.sleep(t0 + LAG_LIMIT_S + 1.0 - time.monotonic())
    lag: dict[int, float] = {}
    for p in range(processes):
        after = [a for a in load.answers if a.process == p and a.started >= t0]
        assert any(a.variant == new for a in after), f"process {p} never served {new}"
        old = [a.started - t0 for a in after if a.status == 200 and a.variant != new]
        lag[p] = max(old, default=0.0)
    return lag


async def test_a_rollout_change_reaches_two_processes_within_5_s_without_failures(
    two_predictors: list[str], database_url: str
) -> None:
    clients = [httpx.AsyncClient(base_url=url, headers={"X-API-Key": READ_KEY}, timeout=10.0) for url in two_predictors]
    try:
        await _until_all(clients, "production")

        # Both processes split users as the documented formula does (sticky: computed, not remembered).
        await set_rollout(database_url, SYM, candidate_traffic_percent=30.0)
        expected = ["candidate" if bucket(ROLLOUT_SALT, SYM, "H1", u) < 3000 else "production" for u in USERS]
        assert set(expected) == {"production", "candidate"}
        deadline = time.monotonic() + 10.0
        while True:
            per_process = [[(await _ask(c, i, u, False)).variant for u in USERS] for i, c in enumerate(clients)]
            if per_process == [expected, expected] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert per_process == [expected, expected]
        await set_rollout(database_url, SYM, candidate_traffic_percent=0.0)
        await _until_all(clients, "production")

        load = Load(clients)
        await asyncio.sleep(1.0)
        to_candidate = await _switch(
            database_url,
            load,
            "UPDATE rollouts SET rollout_symbols = ARRAY[$1] WHERE symbol = $1 AND timeframe = 'H1'",
            "candidate",
            2,
        )
        back = await _switch(
            database_url,
            load,
            "UPDATE rollouts SET rollout_symbols = '{}' WHERE symbol = $1 AND timeframe = 'H1'",
            "production",
            2,
        )
        await load.stop()
    finally:
        for c in clients:
            await c.aclose()

    answers = load.answers
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    assert len(answers) > 100
    assert {(a.variant, a.model_version) for a in answers} == {("production", "p1"), ("candidate", "c1")}
    for lag in (to_candidate, back):
        assert all(s <= LAG_LIMIT_S for s in lag.values()), f"lag per process (s): {lag}"
    print(f"rollout change seen after (s): to candidate {to_candidate}, back {back}; {len(answers)} requests")
