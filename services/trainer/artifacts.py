"""Publishing a model version's files to the object store and reading them back verified.

TensorFlow-free except `load_keras_verified`, which imports the model module lazily.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from shared.errors import AppError
from shared.model_metadata import ModelMetadata, artifact_prefix
from shared.storage import ObjectNotFound, ObjectStore, sha256_hex

log = logging.getLogger(__name__)

KERAS_FILE = "model.keras"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
MODEL_FILES = (KERAS_FILE, ONNX_FILE)


class ArtifactIntegrityError(AppError):
    """A stored artifact is missing or its sha256 differs from the recorded one: never load it."""

    status_code = 409
    code = "artifact_integrity"


def version_string(job_id: str, at: datetime) -> str:
    """Sortable UTC timestamp plus the whole job id: 20261126T041500Z-3f9a1c0e5b7d4e2fa1b2c3d4e5f60718.

    The whole id (not a prefix) makes a version folder belong to exactly one job, so the cleanup of an
    interrupted attempt can never touch another job's files.
    """
    return f"{at.strftime('%Y%m%dT%H%M%SZ')}-{job_id}"


def job_of_version(version: str) -> str | None:
    """The job id a version string was made for (the timestamp part holds no hyphen)."""
    _, sep, job_id = version.partition("-")
    return job_id if sep else None


def _check(name: str, data: bytes, expected: str, where: str) -> None:
    got = sha256_hex(data)
    if got != expected:
        raise ArtifactIntegrityError(f"sha256 mismatch for {where}{name}: expected {expected}, got {got}; refusing it")


def publish(store: ObjectStore, prefix: str, models: dict[str, bytes], metadata: ModelMetadata) -> tuple[str, str]:
    """Upload the model files, then metadata.json, re-read every one and compare checksums.

    Returns (artifact URI of the version prefix, sha256 of metadata.json). The caller writes the registry row
    only after this returns, so no reader can find a version whose files are incomplete.
    """
    for name in MODEL_FILES:
        if metadata.artifacts.get(name) != sha256_hex(models[name]):
            raise ArtifactIntegrityError(f"metadata lists a sha256 for {name} that is not the file's")
    meta_bytes = metadata.model_dump_json(indent=2).encode()
    files = {**models, METADATA_FILE: meta_bytes}
    for name in (*MODEL_FILES, METADATA_FILE):
        store.put(prefix + name, files[name])
    for name, data in files.items():
        try:
            _check(name, store.get(prefix + name), sha256_hex(data), prefix)
        except ObjectNotFound:
            raise ArtifactIntegrityError(f"{prefix}{name} is missing right after upload") from None
    return store.uri(prefix), sha256_hex(meta_bytes)


def fetch_verified(
    store: ObjectStore,
    symbol: str,
    timeframe: str,
    version: str,
    metadata_sha256: str,
    files: tuple[str, ...] = MODEL_FILES,
) -> tuple[ModelMetadata, dict[str, bytes]]:
    """metadata.json checked against the registry's sha256, then each requested file against metadata."""
    prefix = artifact_prefix(symbol, timeframe, version)
    try:
        raw = store.get(prefix + METADATA_FILE)
    except ObjectNotFound:
        raise ArtifactIntegrityError(f"{prefix}{METADATA_FILE} is missing") from None
    _check(METADATA_FILE, raw, metadata_sha256, prefix)
    try:
        metadata = ModelMetadata.model_validate_json(raw)
    except ValidationError as exc:  # e.g. a file named outside the prefix (shared/model_metadata.py)
        raise ArtifactIntegrityError(f"{prefix}{METADATA_FILE} is not valid model metadata: {exc}") from None
    if (why := metadata.identity_error(symbol, timeframe, version)) is not None:
        raise ArtifactIntegrityError(f"{prefix}{why}")
    out: dict[str, bytes] = {}
    for name in files:
        expected = metadata.artifacts.get(name)
        if expected is None:
            raise ArtifactIntegrityError(f"{prefix}{METADATA_FILE} lists no sha256 for {name}")
        try:
            data = store.get(prefix + name)
        except ObjectNotFound:
            raise ArtifactIntegrityError(f"{prefix}{name} is missing") from None
        _check(name, data, expected, prefix)
        out[name] = data
    return metadata, out


def load_keras_verified(
    store: ObjectStore, symbol: str, timeframe: str, version: str, metadata_sha256: str
) -> tuple[Any, ModelMetadata]:
    """The Keras model of a registered version, loaded in safe mode only after every checksum matched.

    A file whose checksums match but that Keras's safe mode refuses (a Lambda layer: arbitrary Python) raises
    ArtifactIntegrityError: it is never loaded."""
    metadata, files = fetch_verified(store, symbol, timeframe, version, metadata_sha256, (KERAS_FILE,))
    from services.trainer.model import load_keras

    try:
        return load_keras(files[KERAS_FILE]), metadata
    except ValueError as exc:  # Keras raises ValueError for what safe_mode refuses (and for a corrupt file)
        where = artifact_prefix(symbol, timeframe, version) + KERAS_FILE
        raise ArtifactIntegrityError(f"{where} refused by Keras safe mode: {exc}") from None


def remove_unregistered(
    store: ObjectStore, symbol: str, timeframe: str, job_id: str, registered: set[str]
) -> list[str]:
    """Delete files an earlier, interrupted attempt of this job left behind (never registered, never read).

    A folder is this job's only when its version names the whole job id.
    """
    removed: list[str] = []
    for key in store.list(f"{symbol}/{timeframe}/"):
        parts = key.split("/")
        if len(parts) >= 4 and job_of_version(parts[2]) == job_id and parts[2] not in registered:
            store.delete(key)
            removed.append(key)
    if removed:
        log.info("removed %d files of an interrupted attempt of job %s", len(removed), job_id)
    return removed
