"""Plays the trainer's role in tests and benchmarks: ONNX models built with the onnx helper API (no
TensorFlow), artifacts and metadata.json in a store, a registry row."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from shared.model_metadata import CLASSES, Calibration, LabelDefinition, ModelMetadata, Scaler, artifact_prefix
from shared.storage import ObjectStore, sha256_hex

FEATURES = [
    "rsi_14",
    "macd_line",
    "macd_signal",
    "macd_hist",
    "bb_percent_b",
    "bb_bandwidth",
    "sma20_dist",
    "sma50_dist",
    "atr_14_pct",
    "stoch_k",
    "stoch_d",
    "adx_14",
    "cci_20",
    "willr_14",
    "mfi_14",
    "roc_10",
    "obv_slope_20",
]


def linear_softmax_onnx(sequence_length: int, n_features: int, seed: int, bias: list[float] | None = None) -> bytes:
    """(batch, L, F) float32 -> Flatten -> MatMul + Add -> Softmax: probabilities in CLASSES order."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (sequence_length * n_features, 3)).astype(np.float32)
    b = np.asarray(bias if bias is not None else [0.0, 0.0, 0.0], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["features"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "linear_softmax",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", sequence_length, n_features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="aicash-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write_model(
    store: ObjectStore,
    symbol: str,
    timeframe: str,
    version: str,
    *,
    seed: int = 1,
    sequence_length: int = 20,
    bias: list[float] | None = None,
    mean: list[float] | None = None,
    scale: list[float] | None = None,
    temperature: float = 1.0,
    onnx_bytes: bytes | None = None,
) -> str:
    """Write model.onnx and metadata.json; returns sha256(metadata.json) for the registry row."""
    n = len(FEATURES)
    onnx_bytes = onnx_bytes or linear_softmax_onnx(sequence_length, n, seed, bias)
    meta = ModelMetadata(
        symbol=symbol,
        timeframe=timeframe,
        version=version,
        created_at=datetime.now(UTC),
        training_job_id=f"job-{symbol}-{timeframe}-{version}",
        feature_names=FEATURES,
        sequence_length=sequence_length,
        classes=list(CLASSES),
        scaler=Scaler(mean=mean or [0.0] * n, scale=scale or [1.0] * n),
        calibration=Calibration(temperature=temperature),
        labels=LabelDefinition(horizon=5, dead_band_atr=0.5),
        hyperparameters={"kind": "linear-softmax test model"},
        training_range={"start": datetime(2020, 1, 1, tzinfo=UTC), "end": datetime(2020, 6, 1, tzinfo=UTC)},
        reference_distributions={},
        metrics={},
        library_versions={"onnx": onnx.__version__},
        artifacts={"model.onnx": sha256_hex(onnx_bytes)},
    )
    meta_bytes = meta.model_dump_json(indent=2).encode()
    prefix = artifact_prefix(symbol, timeframe, version)
    store.put(prefix + "model.onnx", onnx_bytes)
    store.put(prefix + "metadata.json", meta_bytes)
    return sha256_hex(meta_bytes)


async def register(
    database_url: str,
    store: ObjectStore,
    symbol: str,
    timeframe: str,
    version: str,
    sha256: str,
    status: str = "production",
) -> None:
    """Insert a registry row; a new production row archives the previous one in the same transaction."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            if status == "production":
                await conn.execute(
                    "UPDATE model_versions SET status = 'archived' "
                    "WHERE symbol = $1 AND timeframe = $2 AND status = 'production'",
                    symbol,
                    timeframe,
                )
            await conn.execute(
                "INSERT INTO model_versions (symbol, timeframe, version, status, artifact_uri, sha256, "
                "training_job_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                symbol,
                timeframe,
                version,
                status,
                store.uri(artifact_prefix(symbol, timeframe, version)),
                sha256,
                f"job-{symbol}-{timeframe}-{version}",
            )
    finally:
        await conn.close()


def feature_scaler(values: npt.NDArray[np.float64]) -> tuple[list[float], list[float]]:
    """Mean and standard deviation per feature column, as the trainer fits them."""
    return values.mean(axis=0).tolist(), np.where(values.std(axis=0) > 0, values.std(axis=0), 1.0).tolist()
