"""The BentoML peer of the predictor, for `benchmarks/bench_peer_bentoml.py`: the same ONNX model, the same
input scaling and calibration, served by BentoML.

Runs only in the BentoML venv the benchmark makes (var/bench/bentoml-venv), never in the project's: BentoML
pins its own starlette and OpenTelemetry. Started as `bentoml serve benchmarks.peers.bentoml_service:PeerPredictor
--working-dir <repo>`, so `shared.features` (numpy + TA-Lib, no TensorFlow) imports from this checkout.

Environment: PEER_MODEL_DIR, the folder holding the model's `model.onnx` and `metadata.json` (what the
predictor loads from its store); PEER_WORKERS, BentoML worker processes (default 2, the predictor's count).

Per request, each endpoint does what the predictor does after it has a feature window, and no more:
- `POST /ping` {}: nothing (BentoML's own floor, as the predictor's `GET /health` is ours);
- `POST /window` {"features": 20 x 17 floats}: check the shape, scale with the model's scaler, one ONNX run,
  temperature calibration, argmax; answers signal, confidence and the three probabilities.
- `POST /bars` {"bars": [{ts, open, high, low, close, volume}, ...]}: the 17 features over the sent bars with
  `shared.features.feature_rows` (the indicators service's code, 500 warm-up bars), the newest 20 rows, then
  as `/window`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel

from shared.features import FEATURE_NAMES, feature_rows
from shared.model_metadata import CLASSES, ModelMetadata
from shared.timeframes import OHLCV
from shared.warmup import WARMUP_BARS


class BarIn(BaseModel):
    ts: str  # ISO 8601 UTC, as `shared.bars.bars_to_rows` writes it
    open: float
    high: float
    low: float
    close: float
    volume: float


class Prediction(BaseModel):
    signal: str
    confidence: float
    probabilities: dict[str, float]
    model_version: str


# Access log off and metrics on, as the predictor runs (uvicorn --no-access-log; its Prometheus metrics).
@bentoml.service(
    workers=int(os.environ.get("PEER_WORKERS", "2")),
    logging={"access": {"enabled": False}},
    traffic={"timeout": 30},
)
class PeerPredictor:
    def __init__(self) -> None:
        folder = Path(os.environ["PEER_MODEL_DIR"])
        meta = ModelMetadata.model_validate_json((folder / "metadata.json").read_bytes())
        self.version = meta.version
        self.sequence_length = meta.sequence_length
        self.input_name = meta.input_name
        self.n_features = len(meta.feature_names)
        # Columns of shared.features' matrix in the model's feature order.
        self.columns = [FEATURE_NAMES.index(n) for n in meta.feature_names]
        self.mean = np.asarray(meta.scaler.mean, dtype=np.float32)
        self.scale = np.asarray(meta.scaler.scale, dtype=np.float32)
        self.temperature = meta.calibration.temperature
        self.class_order = [meta.classes.index(c) for c in CLASSES]
        # The predictor's session options (services/predictor/model_manager.py): one thread per inference.
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            (folder / "model.onnx").read_bytes(), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    @bentoml.api  # type: ignore[untyped-decorator]  # bentoml is not installed in the project venv
    async def ping(self) -> dict[str, str]:
        """The framework's floor: an API that does nothing, through the same middleware."""
        return {"status": "ok"}

    # async, so the work runs inline on the event loop, as the predictor runs it (a sync API would hop to a
    # thread pool per request).
    @bentoml.api  # type: ignore[untyped-decorator]  # bentoml is not installed in the project venv
    async def window(self, features: list[list[float]]) -> Prediction:
        x = np.asarray(features, dtype=np.float64)
        if x.shape != (self.sequence_length, self.n_features):
            raise InvalidArgument(
                f"features must be {self.sequence_length} rows of {self.n_features} floats, got shape {x.shape}"
            )
        return self._predict(x)

    @bentoml.api  # type: ignore[untyped-decorator]  # bentoml is not installed in the project venv
    async def bars(self, bars: list[BarIn]) -> Prediction:
        need = WARMUP_BARS + self.sequence_length
        if len(bars) < need:
            raise InvalidArgument(f"need at least {need} bars ({WARMUP_BARS} warm-up + the window), got {len(bars)}")
        ts = np.array([b.ts.removesuffix("Z") for b in bars], dtype="datetime64[s]").astype(np.int64)
        cols = np.array([(b.open, b.high, b.low, b.close, b.volume) for b in bars], dtype=np.float64).T
        rows = feature_rows(OHLCV(ts, cols[0], cols[1], cols[2], cols[3], cols[4]))
        if len(rows) < self.sequence_length:
            raise InvalidArgument(f"{len(rows)} finite feature rows, need {self.sequence_length}")
        return self._predict(rows.values[-self.sequence_length :, self.columns])

    def _predict(self, window: npt.NDArray[np.float64]) -> Prediction:
        x = ((window.astype(np.float32) - self.mean) / self.scale)[np.newaxis, :, :]
        out: Any = self.session.run(None, {self.input_name: x})[0]
        p = np.asarray(out, dtype=np.float64).reshape(-1)[self.class_order]
        logits = np.log(np.clip(p, 1e-12, 1.0)) / self.temperature
        e = np.exp(logits - logits.max())
        q = e / e.sum()
        k = int(np.argmax(q))
        return Prediction(
            signal=CLASSES[k],
            confidence=round(float(q[k]), 6),
            probabilities={c: round(float(q[i]), 6) for i, c in enumerate(CLASSES)},
            model_version=self.version,
        )
