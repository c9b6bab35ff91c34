"""End to end in-process: real bars -> dataset -> training -> ONNX check -> S3 upload -> registry row."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np
import pytest

from services.trainer import repository as repo
from services.trainer.artifacts import ArtifactIntegrityError, fetch_verified, load_keras_verified
from services.trainer.jobs import run_job
from services.trainer.settings import TrainerSettings
from shared.model_metadata import CLASSES, ModelMetadata, artifact_prefix
from shared.storage import ObjectStore, sha256_hex
from shared.timeframes import Timeframe
from tests.support.trainer import TINY, ingest, new_job


async def test_training_registers_a_production_model_with_consistent_artifacts(
    trained: dict[str, Any], trainer_settings: TrainerSettings, s3_store: ObjectStore
) -> None:
    assert trainer_settings.database_url
    conn = await asyncpg.connect(trainer_settings.database_url)
    try:
        job = await repo.get_job(conn, trained["job_id"])
        versions = await repo.list_versions(conn, "SPXTRAIN", "D1")
    finally:
        await conn.close()
    assert job is not None and job.status == "succeeded", job
    assert job.progress == 1.0 and job.attempts == 1
    assert [h.epoch for h in job.history] == [1, 2]
    assert all(h.loss is not None and h.val_loss is not None for h in job.history)

    assert len(versions) == 1
    v = versions[0]
    assert v.status == "production"  # the first model of a series serves
    assert v.training_job_id == trained["job_id"]
    assert v.version.endswith("-" + trained["job_id"])  # the whole job id: one job per version folder
    prefix = artifact_prefix("SPXTRAIN", "D1", v.version)
    assert v.artifact_uri == s3_store.uri(prefix)
    assert sorted(s3_store.list(prefix)) == [prefix + n for n in ("metadata.json", "model.keras", "model.onnx")]

    raw = s3_store.get(prefix + "metadata.json")
    assert sha256_hex(raw) == v.sha256
    meta = ModelMetadata.model_validate_json(raw)
    for name in ("model.keras", "model.onnx"):
        assert meta.artifacts[name] == sha256_hex(s3_store.get(prefix + name))
    assert meta.classes == list(CLASSES)
    assert meta.sequence_length == 20 and len(meta.feature_names) == 17
    assert len(meta.scaler.mean) == 17 and all(s > 0 for s in meta.scaler.scale)
    assert set(meta.reference_distributions) == set(meta.feature_names)
    assert meta.labels.horizon == 1
    assert meta.calibration.temperature > 0
    assert meta.onnx_max_abs_diff is not None and meta.onnx_max_abs_diff <= 1e-5
    assert meta.hyperparameters["lstm_units"] == [8, 8]
    assert meta.training_range["start"] < meta.training_range["end"]
    # Honest metrics, next to the baseline they have to beat.
    for key in ("accuracy", "macro_f1", "log_loss", "baseline_accuracy", "baseline_log_loss"):
        assert isinstance(meta.metrics[key], float)
    assert json.loads(json.dumps(v.metrics))["accuracy"] == meta.metrics["accuracy"]
    # Chronological splits with a purge gap: train < val < test with at least horizon + sequence length between.
    s = meta.splits
    assert str(s["train"]["end"]) < str(s["val"]["start"]) and str(s["val"]["end"]) < str(s["test"]["start"])


async def test_onnx_equals_keras_on_real_sequences(
    trained: dict[str, Any], s3_store: ObjectStore, spx_bars: str
) -> None:
    import onnxruntime as ort

    v = trained["result"]
    model, meta = await asyncio.to_thread(load_keras_verified, s3_store, "SPXTRAIN", "D1", v["version"], v["sha256"])
    _, files = fetch_verified(s3_store, "SPXTRAIN", "D1", v["version"], v["sha256"], ("model.onnx",))
    session = ort.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == meta.input_name == "features"
    x = np.random.default_rng(0).normal(size=(64, 20, 17)).astype(np.float32)
    onnx_p = session.run(None, {"features": x})[0]
    keras_p = np.asarray(model(x, training=False))
    assert np.allclose(onnx_p.sum(axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(onnx_p - keras_p)) <= 1e-5


async def test_redelivered_job_is_a_no_op(trained: dict[str, Any], trainer_settings: TrainerSettings) -> None:
    again = await asyncio.to_thread(run_job, trained["job_id"], settings=trainer_settings)
    assert again["version"] == trained["result"]["version"]
    assert trainer_settings.database_url
    conn = await asyncpg.connect(trainer_settings.database_url)
    try:
        n = await conn.fetchval("SELECT count(*) FROM model_versions WHERE training_job_id = $1", trained["job_id"])
    finally:
        await conn.close()
    assert n == 1


async def test_corrupted_artifact_is_refused(trained: dict[str, Any], s3_store: ObjectStore) -> None:
    v = trained["result"]
    key = artifact_prefix("SPXTRAIN", "D1", v["version"]) + "model.keras"
    good = s3_store.get(key)
    s3_store.put(key, good[:-1] + bytes([good[-1] ^ 0xFF]))
    try:
        with pytest.raises(ArtifactIntegrityError, match=r"sha256 mismatch for .*model\.keras"):
            load_keras_verified(s3_store, "SPXTRAIN", "D1", v["version"], v["sha256"])
        with pytest.raises(ArtifactIntegrityError, match=r"metadata\.json"):
            fetch_verified(s3_store, "SPXTRAIN", "D1", v["version"], "0" * 64)
    finally:
        s3_store.put(key, good)


async def test_too_few_bars_fails_clearly_and_registers_nothing(
    database_url: str, trainer_settings: TrainerSettings, sp500: Any
) -> None:
    from shared.timeframes import Timeframe

    await ingest(database_url, "SHORTTRAIN", Timeframe.D1, sp500.tail(700))
    job_id = await new_job(database_url, "SHORTTRAIN", "D1", TINY)
    result = await asyncio.to_thread(run_job, job_id, settings=trainer_settings)
    assert result["status"] == "failed"
    assert "need at least" in result["error"] and "bars for D1, have 700" in result["error"]
    conn = await asyncpg.connect(database_url)
    try:
        job = await repo.get_job(conn, job_id)
        n = await conn.fetchval("SELECT count(*) FROM model_versions WHERE symbol = 'SHORTTRAIN'")
    finally:
        await conn.close()
    assert job is not None and job.status == "failed" and job.error == result["error"]
    assert n == 0


async def test_job_whose_splits_would_be_too_small_fails_at_once_with_the_reason(
    database_url: str, trainer_settings: TrainerSettings, sp500: Any
) -> None:
    # Enough bars for min_sequences, but a 5% validation split of ~140 sequences holds 6 of them.
    await ingest(database_url, "SPLITTRAIN", Timeframe.D1, sp500.tail(700))
    params = {**TINY, "min_sequences": 30, "val_fraction": 0.05, "test_fraction": 0.05}
    job_id = await new_job(database_url, "SPLITTRAIN", "D1", params)
    result = await asyncio.to_thread(run_job, job_id, settings=trainer_settings)
    assert result["status"] == "failed"
    assert "need at least 10 sequences per split" in result["error"] and "validation 6" in result["error"]
    conn = await asyncpg.connect(database_url)
    try:
        job = await repo.get_job(conn, job_id)
    finally:
        await conn.close()
    assert job is not None and job.status == "failed" and job.attempts == 1  # an operator error: not retried


async def test_onnx_that_disagrees_with_keras_is_refused_and_nothing_is_registered(
    database_url: str,
    trainer_settings: TrainerSettings,
    s3_store: ObjectStore,
    sp500: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import onnx
    from onnx import numpy_helper

    from services.trainer import model as m

    real_export = m.export_onnx

    def perturbed_export(net: Any, cfg: Any) -> bytes:
        # The real export, then the output layer's weights for SELL nudged: a converter bug in miniature.
        proto = onnx.load_from_string(real_export(net, cfg))
        weights = [
            i for i in proto.graph.initializer if i.dims and i.dims[-1] == 3 and i.data_type == onnx.TensorProto.FLOAT
        ]
        assert weights, "no float initializer of the 3-class output layer in the exported graph"
        for init in weights:
            arr = numpy_helper.to_array(init).copy()
            arr[..., 0] += np.float32(0.05)  # one class only: a shift of all three would cancel in the softmax
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return bytes(proto.SerializeToString())

    monkeypatch.setattr(m, "export_onnx", perturbed_export)
    await ingest(database_url, "ONNXTRAIN", Timeframe.D1, sp500.tail(1200))
    job_id = await new_job(database_url, "ONNXTRAIN", "D1", TINY)
    result = await asyncio.to_thread(run_job, job_id, settings=trainer_settings)

    assert result["status"] == "failed"
    assert result["error"].startswith("ONNX and Keras disagree by ") and "limit 1e-05" in result["error"]
    conn = await asyncpg.connect(database_url)
    try:
        job = await repo.get_job(conn, job_id)
        n = await conn.fetchval("SELECT count(*) FROM model_versions WHERE symbol = 'ONNXTRAIN'")
    finally:
        await conn.close()
    assert job is not None and job.status == "failed" and job.attempts == 1  # OnnxMismatch is not retried
    assert n == 0
    assert s3_store.list("ONNXTRAIN/") == []  # refused before anything was uploaded


def test_cleanup_of_an_interrupted_attempt_touches_only_its_own_job(s3_store: ObjectStore) -> None:
    from services.trainer.artifacts import remove_unregistered, version_string

    # Two live jobs whose ids share their first 6 (and more) characters.
    mine, theirs = "abcdef0123" + "0" * 22, "abcdef0123" + "1" * 22
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    my_left, my_registered = version_string(mine, at), version_string(mine, at.replace(minute=9))
    their_partial = version_string(theirs, at)
    for version in (my_left, my_registered, their_partial):
        for name in ("model.keras", "model.onnx"):
            s3_store.put(artifact_prefix("CLEANUP", "H1", version) + name, b"x")

    removed = remove_unregistered(s3_store, "CLEANUP", "H1", mine, {my_registered})

    assert sorted(removed) == [artifact_prefix("CLEANUP", "H1", my_left) + n for n in ("model.keras", "model.onnx")]
    left = {k.split("/")[2] for k in s3_store.list("CLEANUP/H1/")}
    assert left == {my_registered, their_partial}
