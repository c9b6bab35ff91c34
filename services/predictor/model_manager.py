"""Production models and rollout candidates in memory: verified, loaded off the event loop, swapped
atomically, with the promotion gate's current verdict on each, and the rollouts rows that route between them.

The serving tables are dicts held in attributes. A refresh reads the production rows and the rollouts table
(with each rollout's candidate, status candidate) in one snapshot, builds new dicts (reusing models whose
version and checksum did not change, in either table) and replaces the attributes together, so a request
sees one consistent state; a half-loaded model is never in any table. A version whose quality verdict
changed is replaced by a copy carrying the new verdict and the same onnxruntime session: the ONNX file is
not read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

import anyio
import asyncpg
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import orjson
from pydantic import ValidationError

from services.predictor import repository
from services.predictor.metrics import ACTIVE_MODELS, MODEL_LOAD_FAILURES, MODEL_LOAD_REFUSED
from services.predictor.repository import RegistryRow
from shared.background import cancel_and_wait
from shared.db import PgListener
from shared.model_metadata import CLASSES, ModelMetadata, ModelQuality, artifact_prefix
from shared.rollouts import Rollout
from shared.storage import ObjectStore, sha256_hex

log = logging.getLogger("predictor.models")

FloatArray = npt.NDArray[np.float32]


RefusalReason = Literal["checksum", "path", "metadata", "onnx"]


class ModelLoadError(RuntimeError):
    """A version that cannot serve. `reason` is set when a stored artifact was refused (counted in
    ml_model_load_refused_total); None when the store could not be read."""

    def __init__(self, message: str, reason: RefusalReason | None = None) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class LoadedModel:
    symbol: str
    timeframe: str
    version: str
    sha256: str
    metadata: ModelMetadata
    session: ort.InferenceSession
    mean: FloatArray
    scale: FloatArray
    temperature: float
    # Maps the model's class order to CLASSES (SELL, HOLD, BUY).
    class_order: list[int] = field(default_factory=lambda: [0, 1, 2])
    registry_id: int = 0
    quality: ModelQuality = field(default_factory=lambda: ModelQuality(gate="not_validated"))
    # `quality` as JSON, rendered once per verdict: every response splices it in (docs/PREDICTOR.md, Cache).
    quality_json: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality_json", orjson.dumps(self.quality.model_dump(mode="json")))

    def with_quality(self, quality: ModelQuality) -> LoadedModel:
        """The same loaded model (same session) carrying another verdict."""
        return dataclasses.replace(self, quality=quality)

    @property
    def sequence_length(self) -> int:
        return self.metadata.sequence_length

    @property
    def feature_names(self) -> list[str]:
        return self.metadata.feature_names

    def predict(self, window: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Calibrated probabilities in CLASSES order for one raw (sequence_length, n_features) window.

        Runs inline on the event loop: one sequence takes about 50 µs with one thread (docs/PREDICTOR.md),
        less than a hop to a worker thread would cost.
        """
        x = ((window.astype(np.float32) - self.mean) / self.scale)[np.newaxis, :, :]
        out = self.session.run(None, {self.metadata.input_name: x})[0]
        p = np.asarray(out, dtype=np.float64).reshape(-1)[self.class_order]
        return calibrate(p, self.temperature)


def calibrate(p: npt.NDArray[np.float64], temperature: float) -> npt.NDArray[np.float64]:
    """Temperature scaling of probabilities: softmax(log(p) / T)."""
    logits = np.log(np.clip(p, 1e-12, 1.0)) / temperature
    logits -= logits.max()
    e = np.exp(logits)
    return np.asarray(e / e.sum(), dtype=np.float64)


def _session(onnx_bytes: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # Many concurrent requests on few cores: parallelism comes from requests, not from inside one inference.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def load_model(store: ObjectStore, row: RegistryRow) -> LoadedModel:
    """Fetch, verify and load one version (blocking: call it in a thread). Raises ModelLoadError."""
    prefix = artifact_prefix(row.symbol, row.timeframe, row.version)
    try:
        meta_bytes = store.get(prefix + "metadata.json")
    except Exception as exc:  # any store failure is a failed load
        raise ModelLoadError(f"cannot read {prefix}metadata.json: {exc}") from exc
    if sha256_hex(meta_bytes) != row.sha256:
        raise ModelLoadError(
            f"{prefix}metadata.json: sha256 {sha256_hex(meta_bytes)} != registry {row.sha256}", "checksum"
        )
    try:
        meta = ModelMetadata.model_validate_json(meta_bytes)
    except ValidationError as exc:
        # A file named outside the version's prefix (shared/model_metadata.py) is a refusal of its own.
        reason: RefusalReason = "path" if any(e["loc"][:1] == ("artifacts",) for e in exc.errors()) else "metadata"
        raise ModelLoadError(f"{prefix}metadata.json is not valid model metadata: {exc}", reason) from exc
    if (why := meta.identity_error(row.symbol, row.timeframe, row.version)) is not None:
        raise ModelLoadError(f"{prefix}{why}", "metadata")
    expected = meta.artifacts.get("model.onnx")
    if not expected:
        raise ModelLoadError(f"{prefix}metadata.json lists no sha256 for model.onnx", "metadata")
    try:
        onnx_bytes = store.get(prefix + "model.onnx")
    except Exception as exc:
        raise ModelLoadError(f"cannot read {prefix}model.onnx: {exc}") from exc
    if sha256_hex(onnx_bytes) != expected:
        raise ModelLoadError(f"{prefix}model.onnx: sha256 {sha256_hex(onnx_bytes)} != metadata {expected}", "checksum")

    n = len(meta.feature_names)
    if len(meta.scaler.mean) != n or len(meta.scaler.scale) != n:
        raise ModelLoadError(f"{prefix}: scaler has {len(meta.scaler.mean)} means for {n} features", "metadata")
    if sorted(meta.classes) != sorted(CLASSES):
        raise ModelLoadError(f"{prefix}: classes {meta.classes} are not {list(CLASSES)}", "metadata")
    try:
        session = _session(onnx_bytes)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"{prefix}model.onnx does not load in onnxruntime: {exc}", "onnx") from exc
    scale = np.asarray(meta.scaler.scale, dtype=np.float32)
    scale[scale == 0] = 1.0  # a constant training feature: centre it, do not divide by zero
    model = LoadedModel(
        symbol=row.symbol,
        timeframe=row.timeframe,
        version=row.version,
        sha256=row.sha256,
        metadata=meta,
        session=session,
        mean=np.asarray(meta.scaler.mean, dtype=np.float32),
        scale=scale,
        temperature=meta.calibration.temperature,
        class_order=[meta.classes.index(c) for c in CLASSES],
        registry_id=row.id,
        quality=row.quality,
    )
    # A model that cannot answer a zero window fails here, at load, not on a client's request.
    try:
        p = model.predict(np.zeros((meta.sequence_length, n), dtype=np.float64))
    except Exception as exc:
        raise ModelLoadError(
            f"{prefix}model.onnx fails on a ({meta.sequence_length}, {n}) window: {exc}", "onnx"
        ) from exc
    if p.shape != (3,) or not np.isfinite(p).all():
        raise ModelLoadError(f"{prefix}model.onnx returns {p.shape} values, not 3 finite probabilities", "onnx")
    return model


ModelKey = tuple[str, str]


class ModelManager:
    def __init__(self, store: ObjectStore, pool: asyncpg.Pool, database_url: str, poll_seconds: float) -> None:
        self.store = store
        self.pool = pool
        self.database_url = database_url
        self.poll_seconds = poll_seconds
        # The serving tables: production models, rollout candidates and the rollouts rows. Each is replaced
        # whole, never mutated, and the three are assigned together with no await in between, so a request
        # (one event-loop step) sees all three from the same refresh.
        self.models: dict[ModelKey, LoadedModel] = {}
        self.candidates: dict[ModelKey, LoadedModel] = {}
        self.rollouts: dict[ModelKey, Rollout] = {}
        self.loaded_once = False
        self.last_error: str | None = None
        # (symbol, timeframe, version, sha256) that failed: not retried until the registry row changes.
        self._failed: set[tuple[str, str, str, str]] = set()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The registry's triggers and the rollouts table's trigger both NOTIFY this channel.
        self._listener = PgListener(
            database_url,
            "model_registry",
            "aicash-predictor-listen",
            on_notify=lambda _payload: self._wake.set(),
            on_lost=self._wake.set,
        )

    def get(self, symbol: str, timeframe: str) -> LoadedModel | None:
        return self.models.get((symbol, timeframe))

    def candidate(self, symbol: str, timeframe: str) -> LoadedModel | None:
        """The loaded candidate of the series' rollout; None when it has none or it failed to load."""
        return self.candidates.get((symbol, timeframe))

    def rollout(self, symbol: str, timeframe: str) -> Rollout | None:
        """The series' `rollouts` row as last read; None when it has no row."""
        return self.rollouts.get((symbol, timeframe))

    async def refresh(self) -> None:
        """Bring the serving tables in line with the registry's production rows and the rollouts table."""
        async with self._lock:
            # One snapshot for both reads: a promotion that makes the candidate production and clears the
            # rollout in one transaction is seen entirely or not at all.
            async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
                rows = await repository.production_models(conn)
                rollout_rows = await repository.rollouts(conn)
            # Loaded models by identity, whatever table they were in: a promoted candidate is not loaded again.
            loaded = {(m.symbol, m.timeframe, m.version, m.sha256): m for m in self.candidates.values()}
            loaded.update({(m.symbol, m.timeframe, m.version, m.sha256): m for m in self.models.values()})
            models: dict[ModelKey, LoadedModel] = {}
            for row in rows:
                key = (row.symbol, row.timeframe)
                model = await self._serving(row, self.models.get(key), loaded, "production")
                if model is not None:
                    models[key] = model
            candidates: dict[ModelKey, LoadedModel] = {}
            rollouts: dict[ModelKey, Rollout] = {}
            for rr in rollout_rows:
                key = (rr.rollout.symbol, rr.rollout.timeframe)
                rollouts[key] = rr.rollout
                if rr.candidate is not None:
                    model = await self._serving(rr.candidate, self.candidates.get(key), loaded, "candidate")
                    if model is not None:
                        candidates[key] = model
            # The atomic swap (no await between the three).
            self.models, self.candidates, self.rollouts = models, candidates, rollouts
            self.loaded_once = True
            ACTIVE_MODELS.set(len(models))

    async def _serving(
        self,
        row: RegistryRow,
        have: LoadedModel | None,
        loaded: dict[tuple[str, str, str, str], LoadedModel],
        role: str,
    ) -> LoadedModel | None:
        """The model that serves `row` in `role` after this refresh: the one already loaded when version and
        checksum match, else a fresh verified load. A failed load keeps the previous production version
        serving; a candidate that fails serves nobody (production serves its traffic)."""
        ident = (row.symbol, row.timeframe, row.version, row.sha256)
        if have is not None and have.version == row.version and have.sha256 == row.sha256:
            return have if have.quality == row.quality else self._requalified(have, row.quality)
        fallback = have if role == "production" else None
        if ident in loaded:
            same = loaded[ident]
            return same if same.quality == row.quality else self._requalified(same, row.quality)
        if ident in self._failed:
            return fallback
        try:
            model = await anyio.to_thread.run_sync(load_model, self.store, row)
        except ModelLoadError as exc:
            self._failed.add(ident)
            MODEL_LOAD_FAILURES.labels(row.symbol, row.timeframe).inc()
            if exc.reason is not None:
                MODEL_LOAD_REFUSED.labels(exc.reason).inc()
            self.last_error = str(exc)
            if fallback is not None:
                outcome = "the previous version keeps serving"
            elif role == "candidate":
                outcome = "production serves its traffic"
            else:
                outcome = "no model serves this series"
            log.error(
                "%s model load failed; %s",
                role,
                outcome,
                extra={
                    "symbol": row.symbol,
                    "timeframe": row.timeframe,
                    "version": row.version,
                    "role": role,
                    "reason": exc.reason or "unreadable",
                    "error": str(exc),
                },
            )
            return fallback
        log.info(
            "model loaded",
            extra={
                "symbol": row.symbol,
                "timeframe": row.timeframe,
                "version": row.version,
                "role": role,
                "replaces": have.version if have else None,
            },
        )
        return model

    @staticmethod
    def _requalified(have: LoadedModel, quality: ModelQuality) -> LoadedModel:
        log.info(
            "model quality changed",
            extra={
                "symbol": have.symbol,
                "timeframe": have.timeframe,
                "version": have.version,
                "gate": quality.gate,
                "was": have.quality.gate,
            },
        )
        return have.with_quality(quality)

    async def start(self) -> None:
        try:
            await self.refresh()
        except Exception:  # the loop below retries; readiness says models are not loaded
            log.exception("initial model load failed")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        await self._listener.close()

    async def _ensure_listener(self) -> None:
        if self._listener.connected:
            return
        try:
            await self._listener.connect()
        except Exception as exc:  # polling covers the gap; try again next round
            log.warning("cannot LISTEN on model_registry; polling only", extra={"error": str(exc)})
            return
        # Changes made while no one listened are picked up by the refresh this wake-up triggers.
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._ensure_listener()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception as exc:  # the database may be down: keep serving what is loaded
                log.warning("model refresh failed; serving the loaded models", extra={"error": str(exc)})
