"""Fault cases of a model's artifacts (issue 12, cases 8 and 13; docs/RELIABILITY.md, docs/SECURITY.md).

Case 13: the store fails while a job saves its model: the disk under a file store fills up (a real tmpfs of a
few hundred KiB, mounted by the test: root only) or the S3 server (a seaweedfs of the test's own) is killed
mid-training. Pass: the attempt fails cleanly (the job row says why, no model_versions row, nothing half-written
that a reader could load) and the job's next attempt succeeds once the store is back, with one version.

Case 8 (trainer side; the predictor's side is in tests/predictor/test_model_manager.py): a Keras file with a
Lambda layer is refused even with matching checksums (Keras safe mode), and a metadata.json that names a file
outside its version's prefix, or describes another version, is refused before anything is read through it.

The jobs run in-process through `run_job` with `retry=True`, exactly as the Celery task calls it: a failed attempt
raises RetryLater after putting the job back to queued, and the test makes the next delivery itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from services.trainer import repository as repo
from services.trainer.artifacts import (
    ArtifactIntegrityError,
    fetch_verified,
    load_keras_verified,
    publish,
)
from services.trainer.errors import RetryLater
from services.trainer.jobs import run_job
from services.trainer.settings import TrainerSettings
from shared.model_metadata import ModelMetadata, artifact_prefix
from shared.storage import FileStore, ObjectStore, sha256_hex, store_from_url
from shared.timeframes import OHLCV, Timeframe
from tests.support.trainer import BUCKET, TINY, fetch_job, ingest, new_job, versions_of
from tests.support.trainer_faults import fill, seaweed, tiny_tmpfs

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SYMBOL = "SPXFAULT"  # a series of its own: these jobs' versions never meet the other trainer tests'
PAGE = 4096


@pytest.fixture(scope="module")
async def fault_bars(database_url: str, sp500: OHLCV) -> str:
    await ingest(database_url, SYMBOL, Timeframe.D1, sp500)
    return SYMBOL


async def _finish(database_url: str, job_id: str) -> None:
    """A job a failed test left queued must not block the series for the rest of the run."""
    job = await fetch_job(database_url, job_id)
    if job.status not in ("succeeded", "failed"):
        conn = await asyncpg.connect(database_url)
        try:
            await repo.fail_job(conn, job_id, "test: abandoned")
        finally:
            await conn.close()


def _job_files(store: ObjectStore, job_id: str) -> list[str]:
    return [k for k in store.list(f"{SYMBOL}/D1/") if k.split("/")[2].endswith("-" + job_id)]


def _pages(n: int) -> int:
    return -(-n // PAGE)


async def test_disk_full_while_saving_fails_the_attempt_cleanly_and_the_next_one_succeeds(
    trained: dict[str, Any],
    s3_store: ObjectStore,
    trainer_settings: TrainerSettings,
    database_url: str,
    fault_bars: str,
    tmp_path: Path,
) -> None:
    """A file store on a real 2 MiB tmpfs, filled so that model.keras fits and model.onnx does not (sizes of the
    same TINY recipe, from the session's trained model): the save dies half-way with ENOSPC. Measured: model.keras
    69 KB, model.onnx 11 KB; the failed attempt (11 s) leaves one complete model.keras and no .tmp file; the next
    attempt (11 s) removes it and registers."""
    prefix = artifact_prefix("SPXTRAIN", "D1", trained["result"]["version"])
    keras_size = len(s3_store.get(prefix + "model.keras"))
    onnx_size = len(s3_store.get(prefix + "model.onnx"))
    with tiny_tmpfs(tmp_path / "disk", 2 * 1024 * 1024) as disk:
        root = disk / "models"
        root.mkdir()
        store = FileStore(root, f"file://{root}")
        settings = trainer_settings.model_copy(
            update={"model_store_url": store.url, "trainer_validate_after_train": False}
        )
        # Room for model.keras and all but one page of model.onnx (which has several: a zip a page larger
        # than the reference one still leaves model.onnx short).
        assert _pages(onnx_size) >= 2, onnx_size
        filler = fill(disk, (_pages(keras_size) + _pages(onnx_size) - 1) * PAGE)
        job_id = await new_job(database_url, SYMBOL, "D1", TINY)
        try:
            t0 = time.monotonic()
            with pytest.raises(RetryLater, match="No space left on device"):
                await asyncio.to_thread(run_job, job_id, settings=settings, store=store, retry=True)
            failed_s = time.monotonic() - t0
            job = await fetch_job(database_url, job_id)
            assert job.status == "queued" and job.attempts == 1, job  # back in the queue, the attempt counted
            assert job.error is not None and "No space left on device" in job.error
            assert await versions_of(database_url, job_id) == []  # no registry row: no reader can find it
            left = _job_files(store, job_id)
            # Half-written means: model.keras whole, model.onnx absent, and no temporary file left to fill the disk.
            assert [k.rsplit("/", 1)[1] for k in left] == ["model.keras"], left
            assert not list(root.rglob("*.tmp"))

            filler.unlink()  # the disk has room again
            t1 = time.monotonic()
            result = await asyncio.to_thread(run_job, job_id, settings=settings, store=store, retry=True)
            next_s = time.monotonic() - t1
        finally:
            await _finish(database_url, job_id)
        job = await fetch_job(database_url, job_id)
        assert job.status == "succeeded" and job.attempts == 2, job
        assert await versions_of(database_url, job_id) == [result["version"]]
        version_prefix = artifact_prefix(SYMBOL, "D1", result["version"])
        assert _job_files(store, job_id) == [version_prefix + n for n in ("metadata.json", "model.keras", "model.onnx")]
        fetch_verified(store, SYMBOL, "D1", result["version"], result["sha256"])  # every checksum holds
    print(
        f"\ndisk full: model.keras {keras_size} B, model.onnx {onnx_size} B; failed attempt {failed_s:.1f} s, "
        f"next attempt {next_s:.1f} s"
    )


async def test_s3_down_while_saving_fails_the_attempt_cleanly_and_the_next_one_succeeds(
    trainer_settings: TrainerSettings, database_url: str, fault_bars: str, tmp_path: Path
) -> None:
    """The S3 server is SIGKILLed while the model trains (so it is gone when the files are uploaded), then
    restarted on the same ports and data. Measured on a loaded 2-core machine: the attempt ended 10.6 s after the
    kill (the rest of the training, then boto3's 3 tries against a closed port); the restarted server answered
    after 17 s; the next attempt succeeded."""
    with seaweed(tmp_path, BUCKET) as server:
        url = f"s3://{BUCKET}/faults"
        store = store_from_url(url, server.endpoint)
        settings = trainer_settings.model_copy(
            update={"model_store_url": url, "s3_endpoint_url": server.endpoint, "trainer_validate_after_train": False}
        )
        job_id = await new_job(database_url, SYMBOL, "D1", {**TINY, "epochs": 10, "patience": 10})
        try:
            attempt = asyncio.create_task(
                asyncio.to_thread(run_job, job_id, settings=settings, store=store, retry=True)
            )
            deadline = time.monotonic() + 300
            while len((await fetch_job(database_url, job_id)).history) < 1:
                assert not attempt.done(), attempt
                assert time.monotonic() < deadline, "training did not start"
                await asyncio.sleep(0.1)
            server.kill()  # mid-training: the store is gone when the model is saved
            killed = time.monotonic()
            with pytest.raises(RetryLater) as raised:
                await attempt
            after_kill_s = time.monotonic() - killed
            job = await fetch_job(database_url, job_id)
            assert job.status == "queued" and job.attempts == 1, job
            assert job.error is not None and "connect" in job.error.lower(), job.error  # names the store failure
            assert str(raised.value) == job.error
            assert await versions_of(database_url, job_id) == []

            restart_s = server.start()
            assert _job_files(store, job_id) == []  # nothing reached the store
            result = await asyncio.to_thread(run_job, job_id, settings=settings, store=store, retry=True)
        finally:
            await _finish(database_url, job_id)
        job = await fetch_job(database_url, job_id)
        assert job.status == "succeeded" and job.attempts == 2, job
        assert await versions_of(database_url, job_id) == [result["version"]]
        version_prefix = artifact_prefix(SYMBOL, "D1", result["version"])
        assert _job_files(store, job_id) == [version_prefix + n for n in ("metadata.json", "model.keras", "model.onnx")]
        fetch_verified(store, SYMBOL, "D1", result["version"], result["sha256"])
    print(f"\nS3 down: attempt ended {after_kill_s:.1f} s after the kill; restart took {restart_s:.1f} s")


# --- refused artifacts (case 8, trainer side) ---


def _metadata(store: ObjectStore, at_version: str, **update: Any) -> ModelMetadata:
    """The metadata.json of a (made-up) model written at `at_version`, with `update` applied."""
    from tests.predictor.model_factory import write_model

    sha = write_model(store, SYMBOL, "D1", at_version)
    raw = store.get(artifact_prefix(SYMBOL, "D1", at_version) + "metadata.json")
    assert sha256_hex(raw) == sha
    return ModelMetadata.model_validate_json(raw).model_copy(update=update)


def test_a_keras_file_with_a_lambda_layer_is_refused_even_with_matching_checksums(tmp_path: Path) -> None:
    import keras

    store = FileStore(tmp_path, f"file://{tmp_path}")
    # A Lambda layer is Python code inside the file: whoever can write to the store would run it on the worker.
    net = keras.Sequential(
        [
            keras.Input((20, 17)),
            keras.layers.Lambda(lambda x: x * 2.0),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    path = tmp_path / "lambda.keras"
    net.save(path)
    files = {"model.keras": path.read_bytes(), "model.onnx": b"onnx placeholder"}
    meta = _metadata(store, "vlambda", artifacts={n: sha256_hex(b) for n, b in files.items()})
    _, sha = publish(store, artifact_prefix(SYMBOL, "D1", "vlambda"), files, meta)
    fetch_verified(store, SYMBOL, "D1", "vlambda", sha, ("model.keras",))  # every checksum matches
    with pytest.raises(ArtifactIntegrityError, match="refused by Keras safe mode.*Lambda"):
        load_keras_verified(store, SYMBOL, "D1", "vlambda", sha)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../other/model.onnx", "not a bare file name"),
        ("/etc/passwd", "not a bare file name"),
        ("SPXTRAIN/D1/v1/model.onnx", "not a bare file name"),
        ("..", "not a bare file name"),
        ("model.onnx\\..\\x", "not a bare file name"),
    ],
)
def test_metadata_naming_a_file_outside_the_prefix_is_refused(tmp_path: Path, name: str, why: str) -> None:
    store = FileStore(tmp_path, f"file://{tmp_path}")
    meta = _metadata(store, "vpath")
    raw = meta.model_dump_json().replace('"model.onnx"', orjson.dumps(name).decode()).encode()
    prefix = artifact_prefix(SYMBOL, "D1", "vpath")
    store.put(prefix + "metadata.json", raw)
    with pytest.raises(ArtifactIntegrityError, match=why):
        fetch_verified(store, SYMBOL, "D1", "vpath", sha256_hex(raw), ())


def test_metadata_describing_another_version_is_refused(tmp_path: Path) -> None:
    """A metadata.json copied from another version (checksum recomputed) names that version's identity."""
    store = FileStore(tmp_path, f"file://{tmp_path}")
    meta = _metadata(store, "vother", version="v-someone-else")
    raw = meta.model_dump_json().encode()
    store.put(artifact_prefix(SYMBOL, "D1", "vother") + "metadata.json", raw)
    with pytest.raises(ArtifactIntegrityError, match="describes SPXFAULT/D1/v-someone-else"):
        fetch_verified(store, SYMBOL, "D1", "vother", sha256_hex(raw), ())
