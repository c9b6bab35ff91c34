"""Metrics and temperature calibration on numpy arrays (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar

from shared.model_metadata import CLASSES

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_EPS = 1e-12


def calibrate(probs: FloatArray, temperature: float) -> FloatArray:
    """softmax(log(p) / T): the exact formula every reader applies to the ONNX/Keras output."""
    z = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)


def log_loss(probs: FloatArray, y: IntArray) -> float:
    p = np.clip(probs[np.arange(len(y)), y], _EPS, 1.0)
    return float(-np.log(p).mean())


def fit_temperature(probs: FloatArray, y: IntArray) -> tuple[float, float, float]:
    """Temperature minimising validation log-loss; returns (T, nll_before, nll_after)."""
    before = log_loss(probs, y)
    res = minimize_scalar(
        lambda log_t: log_loss(calibrate(probs, float(np.exp(log_t))), y),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    t = float(np.exp(res.x))
    after = log_loss(calibrate(probs, t), y)
    if after > before:  # never ship a calibration that is worse than none
        return 1.0, before, before
    return t, before, after


def macro_f1(y_true: IntArray, y_pred: IntArray) -> float:
    f1s = []
    for c in range(len(CLASSES)):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s))


def classification_metrics(probs: FloatArray, y: IntArray, train_y: IntArray) -> dict[str, object]:
    """Test-split metrics of the model next to the baselines it must beat to be worth anything."""
    pred = probs.argmax(axis=1)
    prior = np.bincount(train_y, minlength=3) / max(len(train_y), 1)
    majority = int(prior.argmax())
    baseline_pred = np.full_like(y, majority)
    prior_probs = np.tile(np.clip(prior, _EPS, 1.0), (len(y), 1))
    confusion = np.zeros((3, 3), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    return {
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": macro_f1(y, pred),
        "log_loss": log_loss(probs, y),
        "baseline_majority_class": CLASSES[majority],
        "baseline_accuracy": float(np.mean(baseline_pred == y)),
        "baseline_macro_f1": macro_f1(y, baseline_pred),
        "baseline_log_loss": log_loss(prior_probs, y),  # training class priors as the forecast
        "confusion": confusion.tolist(),  # rows true class, columns predicted, CLASSES order
        "test_sequences": len(y),
    }
