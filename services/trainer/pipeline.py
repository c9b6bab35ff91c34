"""One training run on a built dataset: fit, calibrate, evaluate, export to ONNX, check, describe.

TensorFlow is imported inside `train`, so importing this module stays cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from services.trainer.artifacts import KERAS_FILE, ONNX_FILE
from services.trainer.dataset import LABEL_DESCRIPTION, Dataset
from services.trainer.evaluation import calibrate, classification_metrics, fit_temperature
from services.trainer.hyperparameters import TrainConfig
from shared.features import FEATURE_NAMES
from shared.model_metadata import Calibration, LabelDefinition, ModelMetadata, Scaler
from shared.storage import sha256_hex

# epoch, epochs, logs
ProgressFn = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class Trained:
    files: dict[str, bytes]  # model.keras, model.onnx
    metadata: ModelMetadata
    timings: dict[str, float]


def train(
    ds: Dataset,
    cfg: TrainConfig,
    *,
    version: str,
    job_id: str | None,
    created_at: datetime | None = None,
    on_epoch: ProgressFn | None = None,
) -> Trained:
    from services.trainer import model as m

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    net = m.build_model(cfg)
    fit_summary = m.fit(net, ds, cfg, (lambda e, logs: on_epoch(e, cfg.epochs, logs)) if on_epoch else None)
    timings["fit_seconds"] = time.perf_counter() - t0
    timings["sequences_per_second"] = len(ds.train) * fit_summary["epochs_run"] / timings["fit_seconds"]

    val_probs = m.predict(net, ds.val.x)
    temperature, nll_before, nll_after = fit_temperature(val_probs, ds.val.y)
    test_probs = m.predict(net, ds.test.x)
    metrics: dict[str, Any] = classification_metrics(calibrate(test_probs, temperature), ds.test.y, ds.train.y)
    metrics["uncalibrated_test_log_loss"] = classification_metrics(test_probs, ds.test.y, ds.train.y)["log_loss"]
    metrics["val_log_loss"] = nll_after
    metrics.update(fit_summary)

    t1 = time.perf_counter()
    onnx_bytes = m.export_onnx(net, cfg)
    timings["onnx_export_seconds"] = time.perf_counter() - t1
    diff = m.check_onnx(onnx_bytes, val_probs, ds.val.x)
    keras_bytes = m.save_keras(net)
    metrics["onnx_max_abs_diff"] = diff

    files = {KERAS_FILE: keras_bytes, ONNX_FILE: onnx_bytes}
    metadata = ModelMetadata(
        symbol=ds.symbol,
        timeframe=ds.timeframe.value,
        version=version,
        created_at=created_at or datetime.now(UTC),
        training_job_id=job_id,
        feature_names=list(FEATURE_NAMES),
        sequence_length=cfg.sequence_length,
        scaler=Scaler(mean=ds.scaler_mean.tolist(), scale=ds.scaler_scale.tolist()),
        calibration=Calibration(temperature=temperature, nll_before=nll_before, nll_after=nll_after),
        labels=LabelDefinition(horizon=cfg.horizon, dead_band_atr=cfg.dead_band_atr, description=LABEL_DESCRIPTION),
        hyperparameters={
            **cfg.model_dump(mode="json"),
            "purge_gap": cfg.purge_gap,
            "class_weights": {str(k): v for k, v in ds.class_weights.items()},
            "architecture": f"LSTM x {len(cfg.lstm_units)} (BatchNorm + Dropout after each) -> Dense(3, softmax)",
            "base_timeframe": ds.base_timeframe.value,
            "calibration_formula": "p = softmax(log(p_onnx) / temperature)",
            "scaler_formula": "x' = (x - mean) / scale",
            "onnx_output": "probabilities: softmax, uncalibrated, classes in `classes` order",
        },
        training_range={
            "start": datetime.fromtimestamp(ds.first_ts, UTC),
            "end": datetime.fromtimestamp(ds.last_ts, UTC),
        },
        splits={**ds.splits_info(), "purge_gap_sequences": {"value": ds.purge_gap}, "bars": {"value": ds.bars}},
        reference_distributions=ds.reference,
        metrics=metrics,
        library_versions=m.library_versions(),
        artifacts={name: sha256_hex(data) for name, data in files.items()},
        onnx_max_abs_diff=diff,
    )
    timings["total_seconds"] = time.perf_counter() - t0
    return Trained(files=files, metadata=metadata, timings=timings)


def summary_metrics(metadata: ModelMetadata) -> dict[str, Any]:
    """The registry row's `metrics`: the headline numbers, the full set stays in metadata.json."""
    keep = (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "log_loss",
        "brier",
        "baseline_accuracy",
        "baseline_macro_f1",
        "baseline_log_loss",
        "baseline_brier",
        "baseline_majority_class",
        "test_sequences",
        "epochs_run",
        "best_val_loss",
        "onnx_max_abs_diff",
    )
    out = {k: metadata.metrics[k] for k in keep if k in metadata.metrics}
    out["temperature"] = metadata.calibration.temperature
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}
