"""Models in memory: picked up without restart, checksums enforced, a failed load keeps the old model."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from services.predictor.deps import predictor_of
from services.predictor.model_manager import ModelLoadError, load_model
from services.predictor.repository import RegistryRow
from shared.bars import bars_to_rows
from shared.model_metadata import artifact_prefix
from shared.storage import ObjectStore, sha256_hex
from tests.data import generate_bars
from tests.predictor.model_factory import register, write_model
from tests.support.keys import WRITE_KEY

SYMBOL = "PRED4"
NO_CACHE = {"Cache-Control": "no-cache"}
BUY, SELL = [0.0, 0.0, 60.0], [60.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def fit(scaler: tuple[list[float], list[float]]) -> dict[str, list[float]]:
    return {"mean": scaler[0], "scale": scaler[1]}


@pytest.fixture(scope="module")
def pred4_bars(indicators_url: str) -> None:
    bars = generate_bars("H1", 600, seed=11)
    r = httpx.post(
        f"{indicators_url}/v1/bars/{SYMBOL}/H1",
        json={"bars": bars_to_rows(bars)},
        headers={"X-API-Key": WRITE_KEY},
        timeout=60,
    )
    assert r.status_code == 200, r.text


async def _wait_for_version(client: httpx.AsyncClient, version: str, timeout_s: float = 15.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, object] = {}
    while time.monotonic() < deadline:
        r = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"}, headers=NO_CACHE)
        if r.status_code == 200:
            body = r.json()
            if body["model_version"] == version:
                return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"version {version} not served within {timeout_s} s; last answer {body}")


async def _metric(client: httpx.AsyncClient, prefix: str) -> float:
    text = (await client.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def test_new_production_version_is_picked_up_without_restart(
    client: httpx.AsyncClient,
    app: FastAPI,
    database_url: str,
    store: ObjectStore,
    pred4_bars: None,
    fit: dict[str, list[float]],
) -> None:
    assert (await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"})).status_code == 404
    sha = write_model(store, SYMBOL, "H1", "v1", bias=BUY, mean=fit["mean"], scale=fit["scale"])
    await register(database_url, store, SYMBOL, "H1", "v1", sha)
    body = await _wait_for_version(client, "v1")
    assert body["signal"] == "BUY"

    sha = write_model(store, SYMBOL, "H1", "v2", bias=SELL, mean=fit["mean"], scale=fit["scale"])
    await register(database_url, store, SYMBOL, "H1", "v2", sha)
    body = await _wait_for_version(client, "v2")
    assert body["signal"] == "SELL"
    models = (await client.get("/v1/models")).json()
    assert {"symbol": SYMBOL, "timeframe": "H1", "version": "v2"}.items() <= next(
        m for m in models if m["symbol"] == SYMBOL
    ).items()


@pytest.mark.faults
async def test_bad_checksum_keeps_the_previous_model_serving(
    client: httpx.AsyncClient,
    database_url: str,
    store: ObjectStore,
    pred4_bars: None,
    fit: dict[str, list[float]],
) -> None:
    # Runs alone too (`pytest -m faults`): v2 is the first test's; registered here when that one did not run.
    models = (await client.get("/v1/models")).json()
    if not any(m["symbol"] == SYMBOL and m["version"] == "v2" for m in models):
        sha = write_model(store, SYMBOL, "H1", "v2", bias=SELL, mean=fit["mean"], scale=fit["scale"])
        await register(database_url, store, SYMBOL, "H1", "v2", sha)
    await _wait_for_version(client, "v2")
    failures = await _metric(client, "ml_model_load_failures_total{")
    # v3's model.onnx is replaced after metadata.json recorded its checksum: tampered, must not load.
    sha = write_model(store, SYMBOL, "H1", "v3", bias=BUY, mean=fit["mean"], scale=fit["scale"])
    store.put(artifact_prefix(SYMBOL, "H1", "v3") + "model.onnx", b"not the model that was trained")
    await register(database_url, store, SYMBOL, "H1", "v3", sha)
    deadline = time.monotonic() + 15
    while await _metric(client, "ml_model_load_failures_total{") == failures:
        assert time.monotonic() < deadline, "the failed load was not counted"
        await asyncio.sleep(0.2)
    r = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"}, headers=NO_CACHE)
    assert r.status_code == 200
    assert r.json()["model_version"] == "v2" and r.json()["signal"] == "SELL"


async def test_requests_during_a_swap_see_one_whole_model(
    client: httpx.AsyncClient,
    database_url: str,
    store: ObjectStore,
    pred4_bars: None,
    fit: dict[str, list[float]],
) -> None:
    await _wait_for_version(client, "v2")
    sha = write_model(store, SYMBOL, "H1", "v4", bias=BUY, mean=fit["mean"], scale=fit["scale"])

    async def hammer() -> list[tuple[str, str]]:
        seen = []
        for _ in range(40):
            r = await client.post("/v1/predictions", json={"symbol": SYMBOL, "timeframe": "H1"}, headers=NO_CACHE)
            assert r.status_code == 200, r.text
            seen.append((r.json()["model_version"], r.json()["signal"]))
            await asyncio.sleep(0.02)
        return seen

    task = asyncio.create_task(hammer())
    await asyncio.sleep(0.1)
    await register(database_url, store, SYMBOL, "H1", "v4", sha)
    seen = await task
    await _wait_for_version(client, "v4")
    # Every answer pairs a version with that version's behaviour: never a mix.
    assert set(seen) <= {("v2", "SELL"), ("v4", "BUY")}


def test_load_refuses_metadata_that_does_not_match_the_registry(store: ObjectStore) -> None:
    sha = write_model(store, "PRED5", "H1", "v1")
    with pytest.raises(ModelLoadError, match="metadata.json: sha256"):
        load_model(store, RegistryRow("PRED5", "H1", "v1", "", "0" * 64))
    model = load_model(store, RegistryRow("PRED5", "H1", "v1", "", sha))
    assert model.sequence_length == 20


def test_load_refuses_a_missing_artifact(store: ObjectStore) -> None:
    sha = write_model(store, "PRED5", "H1", "v2")
    store.delete(artifact_prefix("PRED5", "H1", "v2") + "model.onnx")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(store, RegistryRow("PRED5", "H1", "v2", "", sha))


QSYMBOL = "PRED6"
PASSED = {"gate": "passed", "reasons": ["beat every baseline on 5 walk-forward folds"], "validation_id": 41}


@pytest.fixture(scope="module")
def pred6_bars(indicators_url: str) -> None:
    r = httpx.post(
        f"{indicators_url}/v1/bars/{QSYMBOL}/H1",
        json={"bars": bars_to_rows(generate_bars("H1", 600, seed=13))},
        headers={"X-API-Key": WRITE_KEY},
        timeout=60,
    )
    assert r.status_code == 200, r.text


async def _set_quality(database_url: str, quality: dict[str, object]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE model_versions SET quality = $1::jsonb "
            "WHERE symbol = $2 AND timeframe = 'H1' AND status = 'production'",
            orjson.dumps(quality).decode(),
            QSYMBOL,
        )
    finally:
        await conn.close()


async def test_every_answer_carries_the_current_quality_verdict(
    client: httpx.AsyncClient,
    app: FastAPI,
    database_url: str,
    store: ObjectStore,
    pred6_bars: None,
    fit: dict[str, list[float]],
) -> None:
    predictor = predictor_of(app)
    sha = write_model(store, QSYMBOL, "H1", "v1", mean=fit["mean"], scale=fit["scale"])
    await register(database_url, store, QSYMBOL, "H1", "v1", sha)
    deadline = time.monotonic() + 15
    while predictor.models.get(QSYMBOL, "H1") is None:
        assert time.monotonic() < deadline, "the model was not loaded"
        await asyncio.sleep(0.05)
    body = {"symbol": QSYMBOL, "timeframe": "H1"}
    first = (await client.post("/v1/predictions", json=body, headers=NO_CACHE)).json()
    # A new version is not validated until the trainer's validation judges it; the migration says so.
    assert first["quality"]["gate"] == "not_validated" and first["quality"]["validation_id"] is None
    assert first["quality"]["reasons"]
    loaded = predictor.models.get(QSYMBOL, "H1")
    assert loaded is not None

    await _set_quality(database_url, PASSED)
    while (m := predictor.models.get(QSYMBOL, "H1")) is None or m.quality.gate != "passed":
        assert time.monotonic() < deadline + 15, "the new verdict was not picked up"
        await asyncio.sleep(0.05)
    assert m.session is loaded.session  # only the verdict changed: the ONNX file was not loaded again
    cached = (await client.post("/v1/predictions", json=body)).json()
    assert cached["cached"] is True and cached["prediction_id"] != first["prediction_id"]
    assert cached["quality"] == PASSED  # the entry was computed under not_validated; the answer is current
    signal = (await client.get(f"/v1/signals/{QSYMBOL}/H1")).json()
    assert signal["cached"] is True and signal["quality"] == PASSED
    models = (await client.get("/v1/models")).json()
    assert next(x for x in models if x["symbol"] == QSYMBOL)["quality"] == PASSED

    failed = {"gate": "failed", "reasons": ["log loss no better than the class-prior baseline"], "validation_id": 42}
    await _set_quality(database_url, failed)
    while (m := predictor.models.get(QSYMBOL, "H1")) is None or m.quality.gate != "failed":
        assert time.monotonic() < deadline + 30, "the new verdict was not picked up"
        await asyncio.sleep(0.05)
    again = (await client.post("/v1/predictions", json=body)).json()
    assert again["cached"] is True and again["quality"] == failed


async def test_an_unreadable_verdict_is_served_as_not_validated() -> None:
    from services.predictor.repository import parse_quality

    q = parse_quality('{"gate": "great"}', "PRED6 H1 v9")
    assert q.gate == "not_validated" and "unreadable" in q.reasons[0] and "PRED6 H1 v9" in q.reasons[0]


# --- fault case 8: tampered or hostile artifacts (docs/SECURITY.md) ---

RSYMBOL = "PRED8"  # PRED7 is test_weights.py's


@pytest.fixture(scope="module")
def pred7_bars(indicators_url: str) -> None:
    r = httpx.post(
        f"{indicators_url}/v1/bars/{RSYMBOL}/H1",
        json={"bars": bars_to_rows(generate_bars("H1", 600, seed=17))},
        headers={"X-API-Key": WRITE_KEY},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def _flip_one_byte(store: ObjectStore, key: str) -> None:
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0x01
    store.put(key, bytes(data))


@pytest.mark.faults
async def test_refused_artifacts_are_counted_by_reason_and_the_previous_model_keeps_serving(
    client: httpx.AsyncClient,
    database_url: str,
    store: ObjectStore,
    pred7_bars: None,
    fit: dict[str, list[float]],
) -> None:
    """Each new production version below is hostile; each is refused, counted in
    ml_model_load_refused_total{reason}, and v1 serves throughout: one byte flipped in model.onnx (checksum), one
    byte flipped in metadata.json (checksum, against the registry), a metadata.json whose artifacts name a file
    outside the version's prefix (path: its sha256 re-recorded in the registry, as an attacker with write access
    to both would), and a metadata.json copied from another version (metadata)."""
    body = {"symbol": RSYMBOL, "timeframe": "H1"}
    sha = write_model(store, RSYMBOL, "H1", "v1", bias=BUY, mean=fit["mean"], scale=fit["scale"])
    await register(database_url, store, RSYMBOL, "H1", "v1", sha)
    deadline = time.monotonic() + 15
    while True:
        r = await client.post("/v1/predictions", json=body, headers=NO_CACHE)
        if r.status_code == 200 and r.json()["model_version"] == "v1":
            break
        assert time.monotonic() < deadline, r.text
        await asyncio.sleep(0.2)

    def onnx_flipped(version: str) -> str:
        sha = write_model(store, RSYMBOL, "H1", version, bias=SELL, mean=fit["mean"], scale=fit["scale"])
        _flip_one_byte(store, artifact_prefix(RSYMBOL, "H1", version) + "model.onnx")
        return sha

    def metadata_flipped(version: str) -> str:
        sha = write_model(store, RSYMBOL, "H1", version, bias=SELL, mean=fit["mean"], scale=fit["scale"])
        _flip_one_byte(store, artifact_prefix(RSYMBOL, "H1", version) + "metadata.json")
        return sha

    def rewritten(version: str, old: bytes, new: bytes) -> str:
        write_model(store, RSYMBOL, "H1", version, bias=SELL, mean=fit["mean"], scale=fit["scale"])
        key = artifact_prefix(RSYMBOL, "H1", version) + "metadata.json"
        raw = store.get(key).replace(old, new)
        store.put(key, raw)
        return sha256_hex(raw)

    cases = [
        ("v2", "checksum", lambda: onnx_flipped("v2")),
        ("v3", "checksum", lambda: metadata_flipped("v3")),
        ("v4", "path", lambda: rewritten("v4", b'"model.onnx"', b'"../../v1/model.onnx"')),
        ("v5", "path", lambda: rewritten("v5", b'"model.onnx"', b'"/etc/passwd"')),
        ("v6", "metadata", lambda: rewritten("v6", b'"version": "v6"', b'"version": "v1"')),
    ]
    for version, reason, make in cases:
        metric = f'ml_model_load_refused_total{{reason="{reason}"}}'
        before = await _metric(client, metric)
        await register(database_url, store, RSYMBOL, "H1", version, make())
        deadline = time.monotonic() + 15
        while await _metric(client, metric) == before:
            assert time.monotonic() < deadline, f"{version}: the refusal ({reason}) was not counted"
            await asyncio.sleep(0.1)
        assert await _metric(client, metric) == before + 1
        r = await client.post("/v1/predictions", json=body, headers=NO_CACHE)
        assert r.status_code == 200, r.text
        assert (r.json()["model_version"], r.json()["signal"]) == ("v1", "BUY"), (version, r.json())


@pytest.mark.faults
def test_load_refuses_metadata_naming_a_file_outside_its_prefix(store: ObjectStore) -> None:
    write_model(store, "PRED5", "H1", "v3")
    key = artifact_prefix("PRED5", "H1", "v3") + "metadata.json"
    raw = store.get(key).replace(b'"model.onnx"', b'"../v2/model.onnx"')
    store.put(key, raw)
    with pytest.raises(ModelLoadError, match="not a bare file name") as refused:
        load_model(store, RegistryRow("PRED5", "H1", "v3", "", sha256_hex(raw)))
    assert refused.value.reason == "path"
