"""Webhooks: the admin API and its target rule, and signed deliveries through a real Celery worker (Redis
broker, a queue of this run's own) to a real HTTP receiver on loopback: retries with backoff, every attempt
recorded, pausing after consecutive failed deliveries, the target rule checked again at delivery time."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from services.predictor.deps import predictor_of
from services.predictor.main import create_app
from services.predictor.settings import PredictorSettings
from services.predictor.streaming import SignalEvent
from services.predictor.webhook_delivery import deliver_once, pinned_request
from services.predictor.webhook_targets import TargetRefused, check_target, refusal
from services.predictor.webhooks import WebhookDispatcher, dispatcher_of
from shared.bars import bars_to_rows
from shared.features import feature_rows
from shared.storage import ObjectStore
from tests.data import generate_bars
from tests.predictor.model_factory import feature_scaler, register, write_model
from tests.support import REPO
from tests.support.celery import Worker
from tests.support.clients import asgi_client
from tests.support.keys import ADMIN_KEY, READ_KEY, WRITE_KEY
from tests.support.predictor import SYMBOL

ADMIN = {"X-API-Key": ADMIN_KEY}
SERIES = f"{SYMBOL}:H1"
E2E_SYMBOL = "HOOK1"  # H1 bars and a model of its own, for the bar-close test
SECRET = "receiver-shared-secret-0001"
MAX_ATTEMPTS = 3
RETRY_BASE_SECONDS = 0.3
PAUSE_AFTER = 2


# --- a receiver on loopback ---


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A threaded HTTP server: paths starting /fail answer 500, every other path 200; it records each request."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    async def wait_for(self, path: str, n: int, timeout_s: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.on(path)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: {len(self.on(path))} of {n} requests within {timeout_s} s")
            await asyncio.sleep(0.05)
        return self.on(path)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with rec.lock:
                rec.requests.append(Received(self.path, dict(self.headers.items()), body, time.time()))
            status = 500 if self.path.startswith("/fail") else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"no" if status == 500 else b"ok")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


# --- a predictor that allows private targets, and the delivery worker ---


@pytest.fixture(scope="module")
def queue() -> str:
    return f"webhooks-test-{os.getpid()}-{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def stream_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"test-webhooks-{os.getpid()}-{secrets.token_hex(3)}"
    yield prefix
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def allow_settings(settings: PredictorSettings, queue: str, redis_url: str, stream_prefix: str) -> PredictorSettings:
    return settings.model_copy(
        update={
            "webhook_allow_private_targets": True,
            "webhook_queue": queue,
            "celery_broker_url": redis_url,
            # Its own signal stream: this app computes (and dispatches) every bar close itself.
            "stream_enabled": True,
            "stream_key_prefix": stream_prefix,
            "stream_sweep_seconds": 1.0,
        }
    )


@pytest.fixture(scope="module")
async def allow_app(allow_settings: PredictorSettings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(allow_settings)
    async for c in asgi_client(app, ADMIN_KEY):
        yield app, c


@pytest.fixture(scope="module")
def worker(database_url: str, redis_url: str, queue: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real `celery worker` for the webhook queue (its own session: killed with its pool children)."""
    log_path = tmp_path_factory.mktemp("webhook-worker") / "worker.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": redis_url,
        "ENVIRONMENT": "test",
        "WEBHOOK_QUEUE": queue,
        "WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
        "WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "WEBHOOK_RETRY_BASE_SECONDS": str(RETRY_BASE_SECONDS),
        "WEBHOOK_PAUSE_AFTER_FAILURES": str(PAUSE_AFTER),
        "WEBHOOK_TIMEOUT_SECONDS": "5",
        "PYTHONPATH": str(REPO),
    }
    w = Worker(
        env=env,
        log_path=log_path,
        app="services.predictor.webhook_worker",
        queue=queue,
        concurrency=2,
        name="webhooks-test",
    )
    w.start()
    yield log_path
    w.stop_all()
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    # The suite's other predictor app (default queue, no worker) dispatches the bar-close test's signal too.
    client.delete(queue, PredictorSettings.model_fields["webhook_queue"].default)
    client.close()


async def _subscribe(
    client: httpx.AsyncClient, receiver: Receiver, name: str, **extra: Any
) -> tuple[str, dict[str, Any]]:
    """A webhook on SERIES to a path of its own on the receiver (`/<name>-<random>`; `/fail-...` answers 500):
    (that path, the created webhook)."""
    path = f"/{name}-{secrets.token_hex(3)}"
    r = await client.post("/v1/webhooks", json={"url": receiver.url + path, "series": [SERIES], **extra})
    assert r.status_code == 201, r.text
    return path, r.json()


async def _prediction(client: httpx.AsyncClient) -> bytes:
    """The JSON of a real prediction of the served series: the body a signal event carries."""
    r = await client.post(
        "/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"}, headers={"Cache-Control": "no-cache"}
    )
    assert r.status_code == 200, r.text
    return r.content


def _as_new_event(body: bytes) -> tuple[bytes, str]:
    """The same prediction under a fresh id (a later bar's event, for the retry tests)."""
    old = orjson.loads(body)["prediction_id"]
    new = str(uuid.uuid4())
    return body.replace(old.encode(), new.encode()), new


async def _webhook(client: httpx.AsyncClient, webhook_id: int) -> dict[str, Any]:
    r = await client.get(f"/v1/webhooks/{webhook_id}")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def _wait_webhook(
    client: httpx.AsyncClient, webhook_id: int, key: str, value: object, timeout_s: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        hook = await _webhook(client, webhook_id)
        if hook[key] == value:
            return hook
        if time.monotonic() > deadline:
            raise AssertionError(f"webhook {webhook_id}: {key} is {hook[key]!r}, not {value!r}: {hook}")
        await asyncio.sleep(0.1)


# --- the API ---


@pytest.mark.faults
async def test_webhook_routes_need_the_admin_role(client: httpx.AsyncClient) -> None:
    body = {"url": "https://hooks.example.com/x", "series": [SERIES]}
    for key, status in ((None, 401), (READ_KEY, 403), (WRITE_KEY, 403)):
        headers = {"X-API-Key": key} if key else {"X-API-Key": ""}
        assert (await client.post("/v1/webhooks", json=body, headers=headers)).status_code == status
        assert (await client.get("/v1/webhooks", headers=headers)).status_code == status
        assert (await client.patch("/v1/webhooks/1", json={"paused": False}, headers=headers)).status_code == status
        assert (await client.delete("/v1/webhooks/1", headers=headers)).status_code == status
    r = await client.get("/v1/webhooks", headers={"X-API-Key": READ_KEY})
    assert r.json()["error"] == "forbidden" and "needs admin" in r.json()["detail"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10:8080/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:8080/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://240.0.0.1/hook", "reserved"),
        ("http://localhost:8080/hook", "resolves to it"),  # a host name that resolves to loopback
        ("ftp://hooks.example.com/hook", "scheme 'ftp' is not allowed"),
        ("hooks.example.com/hook", "scheme"),
        ("http://user:pw@hooks.example.com/", "credentials"),
        ("http://no-such-host.invalid/hook", "resolve"),
    ],
)
async def test_private_and_invalid_targets_are_refused(client: httpx.AsyncClient, url: str, reason: str) -> None:
    r = await client.post("/v1/webhooks", json={"url": url, "series": [SERIES]}, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "webhook_target_refused"
    assert reason in r.json()["detail"]
    if reason in ("loopback", "private", "link-local", "unspecified", "multicast", "reserved", "resolves to it"):
        assert "WEBHOOK_ALLOW_PRIVATE_TARGETS" in r.json()["detail"]


@pytest.mark.parametrize(
    ("series", "detail"),
    [
        (["NOPE:H1"], "series NOPE:H1 is not served"),
        ([f"{SYMBOL}:D1"], f"series {SYMBOL}:D1 is not served"),
        ([SYMBOL], "malformed"),
        ([f"{SYMBOL}:H7"], "H7"),
        ([], "series"),
    ],
)
async def test_unknown_or_malformed_series_is_422_naming_it(
    client: httpx.AsyncClient, series: list[str], detail: str
) -> None:
    r = await client.post("/v1/webhooks", json={"url": "https://hooks.example.com/x", "series": series}, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert detail in r.json()["detail"]


async def test_short_secret_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/webhooks",
        json={"url": "https://hooks.example.com/x", "series": [SERIES], "secret": "too-short"},
        headers=ADMIN,
    )
    assert r.status_code == 422 and "secret" in r.json()["detail"]


async def test_create_list_pause_delete_and_secrets_never_listed(allow_app: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, client = allow_app
    r = await client.post("/v1/webhooks", json={"url": "https://192.0.2.1/a", "series": [SERIES, SERIES]})
    assert r.status_code == 201, r.text
    generated = r.json()
    assert generated["series"] == [SERIES] and generated["paused"] is False and generated["created_by"] == "admin"
    assert len(generated["secret"]) >= 32
    r = await client.post("/v1/webhooks", json={"url": "https://192.0.2.2/b", "series": [SERIES], "secret": SECRET})
    assert r.status_code == 201 and r.json()["secret"] is None  # a secret the caller chose is not echoed
    given = r.json()

    listed = await client.get("/v1/webhooks")
    assert listed.status_code == 200
    assert {generated["id"], given["id"]} <= {w["id"] for w in listed.json()}
    assert generated["secret"] not in listed.text and SECRET not in listed.text
    assert all("secret" not in w for w in listed.json())
    assert generated["secret"] not in (await client.get(f"/v1/webhooks/{generated['id']}")).text

    r = await client.patch(f"/v1/webhooks/{given['id']}", json={"paused": True})
    assert r.status_code == 200 and r.json()["paused"] is True and r.json()["paused_reason"] == "paused by admin"
    r = await client.patch(f"/v1/webhooks/{given['id']}", json={"paused": False})
    assert r.json()["paused"] is False and r.json()["paused_reason"] is None

    for hook in (generated, given):
        assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
        assert (await client.get(f"/v1/webhooks/{hook['id']}")).status_code == 404
        assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 404
    assert (await client.patch("/v1/webhooks/999999", json={"paused": False})).status_code == 404
    assert (await client.get("/v1/webhooks/abc")).status_code == 422
    assert (await client.get("/v1/webhooks/999999/deliveries")).status_code == 404


# --- deliveries ---


async def test_signed_delivery_reaches_a_loopback_receiver_once(
    allow_app: tuple[FastAPI, httpx.AsyncClient], receiver: Receiver, worker: Path
) -> None:
    app, client = allow_app
    path, hook = await _subscribe(client, receiver, "ok", secret=SECRET)
    body = await _prediction(client)
    prediction_id = orjson.loads(body)["prediction_id"]

    dispatcher = dispatcher_of(app)
    # As the signal stream hands it over (services/predictor/streaming.py, subscribe_internal).
    await dispatcher.on_signal(SignalEvent(prediction_id, SERIES, "production", body, 0))
    await dispatcher.drain()
    # The same event seen again (by another replica, say) enqueues nothing: one claim per event.
    assert await dispatcher.dispatch(body) == 0
    # An event of a series nobody subscribes to goes nowhere.
    other, _ = _as_new_event(body.replace(b'"timeframe":"H1"', b'"timeframe":"H4"'))
    assert await dispatcher.dispatch(other) == 0

    (got,) = await receiver.wait_for(path, 1, timeout_s=60)
    assert got.body == body  # byte for byte
    expected = "sha256=" + hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["X-AICash-Signature"], expected)
    assert got.headers["X-AICash-Event-Id"] == prediction_id
    assert abs(int(got.headers["X-AICash-Timestamp"]) - time.time()) < 120
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-AICash-Delivery-Attempt"] == "1"

    deliveries = (await client.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()
    while not deliveries:  # the worker records the attempt right after the receiver answered
        await asyncio.sleep(0.1)
        deliveries = (await client.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()
    (d,) = deliveries
    assert (d["prediction_id"], d["attempt"], d["status"], d["http_status"]) == (prediction_id, 1, "delivered", 200)
    assert d["duration_ms"] > 0
    await asyncio.sleep(1.0)
    assert len(receiver.on(path)) == 1  # no duplicate
    assert (await _webhook(client, hook["id"]))["last_success_at"] is not None
    assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204


@pytest.mark.faults
async def test_failing_receiver_gets_retries_with_backoff_then_the_webhook_pauses(
    allow_app: tuple[FastAPI, httpx.AsyncClient], receiver: Receiver, worker: Path
) -> None:
    app, client = allow_app
    path, hook = await _subscribe(client, receiver, "fail", secret=SECRET)
    dispatcher = dispatcher_of(app)
    body = await _prediction(client)

    first, first_id = _as_new_event(body)
    assert await dispatcher.dispatch(first) == 1
    tries = await receiver.wait_for(path, MAX_ATTEMPTS)
    assert [t.headers["X-AICash-Delivery-Attempt"] for t in tries] == ["1", "2", "3"]
    assert {t.headers["X-AICash-Event-Id"] for t in tries} == {first_id}
    assert all(t.body == first for t in tries)
    gaps = [b.at - a.at for a, b in zip(tries, tries[1:], strict=False)]
    # Exponential backoff: base, then twice the base (the worker may start a retry a little late, never early).
    assert gaps[0] >= RETRY_BASE_SECONDS * 0.9 and gaps[1] >= 2 * RETRY_BASE_SECONDS * 0.9, gaps
    after_first = await _wait_webhook(client, hook["id"], "failures", 1)
    assert after_first["paused"] is False  # one failed delivery is below the bound of 2

    second, second_id = _as_new_event(body)
    assert await dispatcher.dispatch(second) == 1
    await receiver.wait_for(path, 2 * MAX_ATTEMPTS)
    paused = await _wait_webhook(client, hook["id"], "paused", True)
    assert paused["failures"] == PAUSE_AFTER
    assert "deliveries in a row failed" in paused["paused_reason"] and "HTTP 500" in paused["paused_reason"]

    # Paused: the next event is not even enqueued.
    third, _ = _as_new_event(body)
    assert await dispatcher.dispatch(third) == 0
    deliveries = (await client.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()
    assert len(deliveries) == 2 * MAX_ATTEMPTS
    by_event: dict[str, list[tuple[int, str, int]]] = {}
    for d in sorted(deliveries, key=lambda d: d["attempt"]):
        by_event.setdefault(d["prediction_id"], []).append((d["attempt"], d["status"], d["http_status"]))
    expected = [(1, "failed", 500), (2, "failed", 500), (3, "gave_up", 500)]
    assert by_event == {first_id: expected, second_id: expected}
    await asyncio.sleep(1.0)
    assert len(receiver.on(path)) == 2 * MAX_ATTEMPTS  # nothing after the pause

    # An admin unpauses: the count restarts and new events are delivered (tried) again.
    r = await client.patch(f"/v1/webhooks/{hook['id']}", json={"paused": False})
    assert r.json()["paused"] is False and r.json()["failures"] == 0
    fourth, fourth_id = _as_new_event(body)
    assert await dispatcher.dispatch(fourth) == 1
    tries = await receiver.wait_for(path, 2 * MAX_ATTEMPTS + 1)
    assert tries[-1].headers["X-AICash-Event-Id"] == fourth_id
    assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204


async def test_a_dead_broker_costs_the_dispatch_a_bounded_wait_and_no_error(
    allow_app: tuple[FastAPI, httpx.AsyncClient], allow_settings: PredictorSettings
) -> None:
    app, client = allow_app
    hook = (await client.post("/v1/webhooks", json={"url": "https://192.0.2.7/x", "series": [SERIES]})).json()
    dead = allow_settings.model_copy(
        update={"celery_broker_url": "redis://127.0.0.1:1/0", "webhook_publish_timeout_seconds": 0.5}
    )
    dispatcher = WebhookDispatcher(app.state.pool, dead)
    body, _ = _as_new_event(await _prediction(client))
    start = time.monotonic()
    assert await dispatcher.dispatch(body) == 0
    assert time.monotonic() - start < 5.0
    assert dispatcher.publish_errors == 1 and dispatcher.last_error
    dispatcher.close()
    assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204


async def test_target_is_checked_again_at_delivery_time(
    allow_app: tuple[FastAPI, httpx.AsyncClient], allow_settings: PredictorSettings, receiver: Receiver
) -> None:
    """A webhook accepted while private targets were allowed (or a name that now resolves elsewhere) is
    refused by the delivery itself when the rule forbids the address it resolves to: nothing is sent, the
    attempt is recorded as refused and the webhook paused."""
    _, client = allow_app
    path, hook = await _subscribe(client, receiver, "rebind")
    strict = allow_settings.model_copy(update={"webhook_allow_private_targets": False})
    event = str(uuid.uuid4())
    outcome = await deliver_once(strict, hook["id"], event, b'{"prediction_id": "x"}', 1)
    assert outcome.status == "refused" and "loopback" in outcome.detail and not outcome.retry
    assert receiver.on(path) == []
    after = await _webhook(client, hook["id"])
    assert after["paused"] is True and after["paused_reason"].startswith("target refused at delivery")
    (d,) = (await client.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()
    assert (d["prediction_id"], d["status"], d["http_status"]) == (event, "refused", None)
    # The same message delivered again (a worker restart) sends nothing either: the webhook is paused.
    again = await deliver_once(allow_settings, hook["id"], event, b"{}", 1)
    assert again.status == "skipped" and receiver.on(path) == []
    assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204


async def test_a_redelivered_try_sends_nothing_twice_and_a_dns_failure_is_retried_not_refused(
    allow_app: tuple[FastAPI, httpx.AsyncClient],
    allow_settings: PredictorSettings,
    receiver: Receiver,
    database_url: str,
) -> None:
    _, client = allow_app
    path, hook = await _subscribe(client, receiver, "ok")
    event = str(uuid.uuid4())
    first = await deliver_once(allow_settings, hook["id"], event, b'{"a": 1}', 1)
    # The same message again (its worker died after the receiver answered, say): recorded, so not sent again.
    again = await deliver_once(allow_settings, hook["id"], event, b'{"a": 1}', 1)
    assert (first.status, again.status) == ("delivered", "skipped")
    assert len(receiver.on(path)) == 1

    # The name stops resolving (the receiver's DNS is down): a failed try to retry, not a refusal.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE webhooks SET url = 'http://no-such-host.invalid/x' WHERE id = $1", hook["id"])
    finally:
        await conn.close()
    other = str(uuid.uuid4())
    outcome = await deliver_once(allow_settings, hook["id"], other, b"{}", 1)
    assert outcome.status == "failed" and outcome.retry and "resolve" in outcome.detail
    after = await _webhook(client, hook["id"])
    assert after["paused"] is False
    last = await deliver_once(allow_settings, hook["id"], other, b"{}", allow_settings.webhook_max_attempts)
    assert last.status == "gave_up" and not last.retry
    assert (await _webhook(client, hook["id"]))["failures"] == 1
    assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204


async def test_a_bar_close_signal_reaches_the_webhook_end_to_end(
    allow_app: tuple[FastAPI, httpx.AsyncClient],
    receiver: Receiver,
    worker: Path,
    indicators_url: str,
    database_url: str,
    store: ObjectStore,
    stream_prefix: str,
    redis_url: str,
) -> None:
    """A bar ingested through the indicators API completes a bar of a served series: the signal stream
    computes its signal once and hands it to the dispatcher, and the receiver gets it signed."""
    import redis

    app, client = allow_app
    bars = generate_bars("H1", 2600, seed=13)
    first = 2550
    async with httpx.AsyncClient(base_url=indicators_url, headers={"X-API-Key": WRITE_KEY}, timeout=60) as ind:
        r = await ind.post(f"/v1/bars/{E2E_SYMBOL}/H1", json={"bars": bars_to_rows(bars.window(0, first))})
        assert r.status_code == 200, r.text
        mean, scale = feature_scaler(feature_rows(bars.window(0, first)).values)
        sha = write_model(store, E2E_SYMBOL, "H1", "w1", seed=31, mean=mean, scale=scale, temperature=1.5)
        await register(database_url, store, E2E_SYMBOL, "H1", "w1", sha)
        rconn = redis.Redis.from_url(redis_url, socket_timeout=2)
        last_key = f"{stream_prefix}:last:{E2E_SYMBOL}:H1"
        deadline = time.monotonic() + 60
        # Served, and seen once by the stream (bars before it started are history, not signals).
        while predictor_of(app).models.get(E2E_SYMBOL, "H1") is None or rconn.get(last_key) is None:
            assert time.monotonic() < deadline, "the predictor did not pick up the new series"
            await asyncio.sleep(0.2)
        rconn.close()
        path = f"/e2e-{secrets.token_hex(3)}"
        r = await client.post(
            "/v1/webhooks", json={"url": receiver.url + path, "series": [f"{E2E_SYMBOL}:H1"], "secret": SECRET}
        )
        assert r.status_code == 201, r.text
        hook = r.json()
        r = await ind.post(f"/v1/bars/{E2E_SYMBOL}/H1", json={"bars": bars_to_rows(bars.window(first, first + 1))})
        assert r.status_code == 200, r.text

    (got,) = await receiver.wait_for(path, 1, timeout_s=60)
    event = orjson.loads(got.body)
    assert (event["symbol"], event["timeframe"]) == (E2E_SYMBOL, "H1")
    assert event["bar_ts"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(bars.ts[first]))))
    assert got.headers["X-AICash-Event-Id"] == event["prediction_id"]
    expected = "sha256=" + hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["X-AICash-Signature"], expected)
    await asyncio.sleep(1.5)  # another sweep of the stream: still one delivery
    assert len(receiver.on(path)) == 1
    assert (await client.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204


# --- the rule and the pinned request, directly ---


@pytest.mark.parametrize(
    ("address", "verdict"),
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.2", "loopback"),
        ("172.16.5.4", "private"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private"),
    ],
)
def test_refusal_names_the_range(address: str, verdict: str | None) -> None:
    import ipaddress

    why = refusal(ipaddress.ip_address(address))
    assert (why is None) if verdict is None else (why is not None and verdict in why)


async def test_allowed_private_target_resolves_and_is_pinned() -> None:
    target = await check_target("https://localhost:8443/h?q=1", allow_private=True, timeout_seconds=2)
    url, headers, extensions = pinned_request(target)
    assert url in ("https://127.0.0.1:8443/h?q=1", "https://[::1]:8443/h?q=1")
    assert headers == {"Host": "localhost:8443"} and extensions == {"sni_hostname": "localhost"}
    with pytest.raises(TargetRefused, match="loopback"):
        await check_target("https://localhost:8443/h", allow_private=False, timeout_seconds=2)


# --- fault case 14: receivers that hang or fail beside a healthy one (docs/RELIABILITY.md) ---


@dataclass
class Hanging:
    """A receiver that accepts every connection, reads the request and never answers: (time, attempt header) of
    each request, per path."""

    url: str = ""
    requests: list[tuple[str, float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, path: str) -> list[tuple[float, str]]:
        with self.lock:
            return [(at, attempt) for p, at, attempt in self.requests if p == path]


@pytest.fixture(scope="module")
def hanging() -> Iterator[Hanging]:
    import socket

    rec = Hanging()
    server = socket.create_server(("127.0.0.1", 0))
    rec.url = f"http://127.0.0.1:{server.getsockname()[1]}"
    open_conns: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        path = head[0].split(" ")[1]
        attempt = next(
            (h.split(":", 1)[1].strip() for h in head if h.lower().startswith("x-aicash-delivery-attempt")), ""
        )
        with rec.lock:
            rec.requests.append((path, time.time(), attempt))
        while conn.recv(65536):  # never answer; wait for the client to give up and close
            pass

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            open_conns.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield rec
    server.close()
    for conn in open_conns:
        conn.close()


@pytest.mark.faults
async def test_hanging_and_failing_receivers_back_off_and_pause_while_a_healthy_one_is_served(
    allow_app: tuple[FastAPI, httpx.AsyncClient], receiver: Receiver, hanging: Hanging, worker: Path
) -> None:
    """Three webhooks on one series: one whose receiver never answers, one answering 500, one healthy.

    Pass: the healthy receiver gets every event, and gets it before the hanging receiver's first try has even
    timed out (the worker's other pool process serves it); the two bad ones get MAX_ATTEMPTS tries per event,
    spaced by the timeout (hanging) plus the backoff RETRY_BASE_SECONDS * 2**(n-1), visible in the recorded
    attempts' timestamps; after PAUSE_AFTER failed deliveries each is paused and sent nothing more.
    Measured (WEBHOOK_TIMEOUT_SECONDS=5, base 0.3 s, 3 tries, pause after 2; 2 pool processes; a loaded 2-core
    machine): healthy delivery 1.9 s after the dispatch; the hanging tries' recorded ends 5.5 and 5.8 s apart;
    the hanging webhook paused 33 s after the first event.
    """
    app, client = allow_app
    timeout = 5.0  # WEBHOOK_TIMEOUT_SECONDS of the worker fixture
    hang_path = f"/hang-{secrets.token_hex(3)}"
    r = await client.post("/v1/webhooks", json={"url": hanging.url + hang_path, "series": [SERIES]})
    assert r.status_code == 201, r.text
    hang = r.json()
    fail_path, fail = await _subscribe(client, receiver, "fail")
    ok_path, ok = await _subscribe(client, receiver, "ok")
    dispatcher = dispatcher_of(app)
    body = await _prediction(client)
    try:
        first, first_id = _as_new_event(body)
        sent = time.time()
        assert await dispatcher.dispatch(first) == 3
        (got,) = await receiver.wait_for(ok_path, 1)
        healthy_s = got.at - sent
        assert got.headers["X-AICash-Event-Id"] == first_id
        deadline = time.monotonic() + 60
        while not hanging.on(hang_path):
            assert time.monotonic() < deadline, "the hanging receiver got no request"
            await asyncio.sleep(0.05)
        # Not queued behind the hanging try: served before that try's timeout.
        assert got.at < hanging.on(hang_path)[0][0] + timeout, (got.at, hanging.on(hang_path))

        await _wait_webhook(client, hang["id"], "failures", 1, timeout_s=90)
        await _wait_webhook(client, fail["id"], "failures", 1, timeout_s=30)
        tries = hanging.on(hang_path)
        assert [a for _, a in tries] == ["1", "2", "3"]
        rows = sorted((await client.get(f"/v1/webhooks/{hang['id']}/deliveries")).json(), key=lambda d: d["attempt"])
        assert [(d["attempt"], d["status"], d["http_status"]) for d in rows] == [
            (1, "failed", None),
            (2, "failed", None),
            (3, "gave_up", None),
        ]
        assert all(f"no answer within {timeout:g} s" in d["error"] for d in rows)
        stamps = [datetime.fromisoformat(d["at"]).timestamp() for d in rows]  # each try's end
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        # Each gap: the backoff, then a whole try that timed out (never early).
        assert gaps[0] >= RETRY_BASE_SECONDS * 0.9 + timeout * 0.95, gaps
        assert gaps[1] >= 2 * RETRY_BASE_SECONDS * 0.9 + timeout * 0.95, gaps
        fail_tries = receiver.on(fail_path)
        assert [t.headers["X-AICash-Delivery-Attempt"] for t in fail_tries] == ["1", "2", "3"]
        fail_gaps = [b.at - a.at for a, b in zip(fail_tries, fail_tries[1:], strict=False)]
        assert fail_gaps[0] >= RETRY_BASE_SECONDS * 0.9 and fail_gaps[1] >= 2 * RETRY_BASE_SECONDS * 0.9, fail_gaps
        assert (await _webhook(client, ok["id"]))["failures"] == 0

        second, _ = _as_new_event(body)
        assert await dispatcher.dispatch(second) == 3
        await receiver.wait_for(ok_path, 2)
        paused_hang = await _wait_webhook(client, hang["id"], "paused", True, timeout_s=90)
        paused_at = time.time()
        paused_fail = await _wait_webhook(client, fail["id"], "paused", True, timeout_s=30)
        assert paused_hang["failures"] == PAUSE_AFTER and "no answer within" in paused_hang["paused_reason"]
        assert paused_fail["failures"] == PAUSE_AFTER and "HTTP 500" in paused_fail["paused_reason"]

        # Paused: only the healthy receiver gets the next event; the bad ones are sent nothing more.
        third, third_id = _as_new_event(body)
        assert await dispatcher.dispatch(third) == 1
        got3 = (await receiver.wait_for(ok_path, 3))[-1]
        assert got3.headers["X-AICash-Event-Id"] == third_id
        await asyncio.sleep(1.0)
        assert len(hanging.on(hang_path)) == 2 * MAX_ATTEMPTS
        assert len(receiver.on(fail_path)) == 2 * MAX_ATTEMPTS
        assert (await _webhook(client, ok["id"]))["paused"] is False
        print(
            f"\nhealthy receiver served {healthy_s:.2f} s after the dispatch; hanging tries ended at gaps "
            f"{[round(g, 2) for g in gaps]} s; hanging webhook paused {paused_at - sent:.1f} s after the first event"
        )
    finally:
        for hook in (hang, fail, ok):
            await client.delete(f"/v1/webhooks/{hook['id']}")
