"""Metrics (scikit-learn) and temperature calibration (scipy) on numpy arrays (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
)
from sklearn.metrics import log_loss as sk_log_loss

from shared.model_metadata import CLASSES

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_EPS = 1e-12
# Every metric is computed over all three classes, also those absent from a test set: a class the model
# never sees still counts (F1 0, not left out) and the probability columns keep their meaning.
LABELS = list(range(len(CLASSES)))


def calibrate(probs: FloatArray, temperature: float) -> FloatArray:
    """softmax(log(p) / T): the exact formula every reader applies to the ONNX/Keras output."""
    z = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)


def _normalised(probs: FloatArray) -> FloatArray:
    # sklearn refuses rows that do not sum to 1 within its tolerance; float32 model outputs and clipped
    # priors can miss it by more, so rows are renormalised (a no-op for a proper softmax).
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
    return np.asarray(p / p.sum(axis=1, keepdims=True), dtype=np.float64)


def log_loss(probs: FloatArray, y: IntArray) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    return float(sk_log_loss(y, _normalised(probs), labels=LABELS))


def brier(probs: FloatArray, y: IntArray) -> float:
    """Multiclass Brier score: mean over samples of the sum over classes of (p - onehot)^2, in [0, 2]."""
    # scikit-learn >= 1.7 takes (n, n_classes) probabilities; scale_by_half="auto" halves binary scores only.
    return float(brier_score_loss(y, _normalised(probs), labels=LABELS))


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
    """Unweighted mean of the per-class F1 over all three classes (a class never predicted nor present: 0)."""
    return float(f1_score(y_true, y_pred, labels=LABELS, average="macro", zero_division=0.0))


def prediction_metrics(probs: FloatArray, y: IntArray) -> dict[str, object]:
    """Accuracy, balanced accuracy, macro-F1, log-loss, Brier and confusion matrix of probabilities."""
    pred = probs.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        # mean recall over the classes present in y (sklearn's definition): 1/3 for any guess that ignores x
        "balanced_accuracy": float(_balanced_accuracy(y, pred)),
        "macro_f1": macro_f1(y, pred),
        "log_loss": log_loss(probs, y),
        "brier": brier(probs, y),
        # rows true class, columns predicted, CLASSES order
        "confusion": confusion_matrix(y, pred, labels=LABELS).tolist(),
    }


def _balanced_accuracy(y: IntArray, pred: IntArray) -> float:
    import warnings

    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected when a class is absent from a short test block
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, pred))


def classification_metrics(probs: FloatArray, y: IntArray, train_y: IntArray) -> dict[str, object]:
    """Test-split metrics of the model next to the baselines it must beat to be worth anything."""
    prior = np.bincount(train_y, minlength=3) / max(len(train_y), 1)
    majority = int(prior.argmax())
    baseline_pred = np.full_like(y, majority)
    prior_probs = np.tile(np.clip(prior, _EPS, 1.0), (len(y), 1))
    model = prediction_metrics(probs, y)
    return {
        "accuracy": model["accuracy"],
        "balanced_accuracy": model["balanced_accuracy"],
        "macro_f1": model["macro_f1"],
        "log_loss": model["log_loss"],
        "brier": model["brier"],
        "baseline_majority_class": CLASSES[majority],
        "baseline_accuracy": float(accuracy_score(y, baseline_pred)),
        "baseline_macro_f1": macro_f1(y, baseline_pred),
        "baseline_log_loss": log_loss(prior_probs, y),  # training class priors as the forecast
        "baseline_brier": brier(prior_probs, y),
        "confusion": model["confusion"],
        "test_sequences": len(y),
    }
