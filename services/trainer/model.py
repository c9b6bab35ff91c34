"""The Keras LSTM classifier, its training loop, ONNX export and the ONNX-vs-Keras check.

Only training code imports this module, lazily (the API never does). Building and fitting are plain Keras 3,
so they run on any Keras backend (TensorFlow here; JAX or PyTorch on a GPU machine, see
benchmarks/gpu_training.py); the ONNX export goes through tf2onnx and needs the TensorFlow backend.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before keras is imported: TensorFlow reads its log level once, when it loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from services.trainer.dataset import Dataset
from services.trainer.errors import OnnxMismatch
from services.trainer.hyperparameters import TrainConfig
from shared.features import N_FEATURES
from shared.model_metadata import CLASSES

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
ONNX_OPSET = 17
# Export is refused when ONNX and Keras probabilities differ by more than this anywhere on the validation set.
ONNX_TOLERANCE = 1e-5

EpochCallback = Callable[[int, dict[str, float]], None]


def build_model(cfg: TrainConfig) -> Any:
    keras.utils.set_random_seed(cfg.seed)
    inputs = keras.Input((cfg.sequence_length, N_FEATURES), name=INPUT_NAME)
    x = inputs
    for i, units in enumerate(cfg.lstm_units):
        x = keras.layers.LSTM(units, return_sequences=i < len(cfg.lstm_units) - 1, name=f"lstm_{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
        x = keras.layers.Dropout(cfg.dropout, seed=cfg.seed + i, name=f"dropout_{i}")(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs, name="aicash_lstm")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


class _EpochReporter(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, fn: EpochCallback) -> None:
        super().__init__()
        self.fn = fn

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.fn(epoch + 1, {k: float(v) for k, v in (logs or {}).items()})


def fit(model: Any, ds: Dataset, cfg: TrainConfig, on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train with early stopping on validation loss (best weights restored); returns a fit summary."""
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True)
    callbacks: list[Any] = [stop]
    if on_epoch is not None:
        callbacks.append(_EpochReporter(on_epoch))
    hist = model.fit(
        ds.train.x,
        ds.train.y,
        validation_data=(ds.val.x, ds.val.y),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        class_weight=ds.class_weights,
        shuffle=True,
        callbacks=callbacks,
        verbose=0,
    )
    val_loss = [float(v) for v in hist.history.get("val_loss", [])]
    return {
        "epochs_run": len(val_loss),
        "best_epoch": int(np.argmin(val_loss)) + 1 if val_loss else 0,
        "best_val_loss": min(val_loss) if val_loss else None,
        "stopped_early": len(val_loss) < cfg.epochs,
    }


def predict(model: Any, x: npt.NDArray[np.float32], batch_size: int = 1024) -> npt.NDArray[np.float64]:
    """Uncalibrated class probabilities, inference mode (dropout off, batch-norm moving statistics)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # A traced function: on one (1, 20, 17) sequence of this LSTM (Keras 3.15, TF 2.21, 2 cores) it took
        # p50 1.6 ms, where model.predict() took 55 ms and an eager model(x) call 71 ms (30-40x).
        fn = tf.function(lambda t: model(t, training=False), reduce_retracing=True)
        out = [fn(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    else:
        out = [
            keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False))
            for i in range(0, len(x), batch_size)
        ]
    if not out:
        return np.empty((0, len(CLASSES)), dtype=np.float64)
    return np.asarray(np.concatenate(out), dtype=np.float64)


def save_keras(model: Any) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.keras"
        model.save(path)
        return path.read_bytes()


def load_keras(data: bytes) -> Any:
    """Load `.keras` bytes in safe mode (no Lambda layers, no arbitrary code). Verify the checksum first."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.keras"
        path.write_bytes(data)
        return keras.saving.load_model(path, safe_mode=True, compile=False)


def export_onnx(model: Any, cfg: TrainConfig) -> bytes:
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, cfg.sequence_length, N_FEATURES), tf.float32, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=ONNX_OPSET)
    return bytes(proto.SerializeToString())


def onnx_predict(onnx_bytes: bytes, x: npt.NDArray[np.float32], batch_size: int = 4096) -> npt.NDArray[np.float64]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    out = [np.asarray(session.run(None, {INPUT_NAME: x[i : i + batch_size]})[0]) for i in range(0, len(x), batch_size)]
    return np.asarray(np.concatenate(out), dtype=np.float64)


def check_onnx(onnx_bytes: bytes, keras_probs: npt.NDArray[np.float64], x: npt.NDArray[np.float32]) -> float:
    """Max |ONNX - Keras| on `x`; raises OnnxMismatch above ONNX_TOLERANCE or when the graph does not run
    (the same export would fail the same way on a retry)."""
    try:
        onnx_probs = onnx_predict(onnx_bytes, x)
    except Exception as exc:  # onnxruntime raises its own types (InvalidGraph, Fail, ...)
        raise OnnxMismatch(f"the exported ONNX graph does not run in onnxruntime: {type(exc).__name__}: {exc}") from exc
    diff = float(np.max(np.abs(onnx_probs - keras_probs)))
    if not diff <= ONNX_TOLERANCE:  # also catches NaN
        raise OnnxMismatch(f"ONNX and Keras disagree by {diff:.3g} on the validation set (limit {ONNX_TOLERANCE})")
    return diff


def library_versions() -> dict[str, str]:
    import platform

    import onnx
    import tensorflow as tf
    import tf2onnx

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "onnx_opset": str(ONNX_OPSET),
    }
