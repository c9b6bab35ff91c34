"""SHAP explanations of the LSTM: which feature at which bar of the input window moved a prediction.

`shap.GradientExplainer` (expected gradients): DeepExplainer fails on Keras 3 LSTMs, and KernelExplainer
would need thousands of model calls per window of 20 x 17 inputs. shap and Keras are imported inside the
functions, so importing this module costs numpy only.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from shared.model_metadata import CLASSES

# Expected-gradient samples (background row, interpolation point) per explained sequence: shap's default.
# Each explained sequence and class costs one batched gradient call of this size.
SHAP_NSAMPLES: Final = 200
METHOD: Final = "shap.GradientExplainer"

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]


@dataclass
class _Cached:
    digest: bytes
    nsamples: int
    explainer: Any
    base: Float64Array  # mean class probabilities over the background


# One explainer per (model, background, nsamples): building one traces new gradient functions, which cost
# about 3 s per explained window on 2 cores when redone on every call, 0.3 s when reused (measured with a
# 16-unit LSTM, 50 background sequences). Weak keys: a model dropped by its owner leaves the cache too.
_CACHE: weakref.WeakKeyDictionary[Any, _Cached] = weakref.WeakKeyDictionary()
# shap draws from numpy's global generator, whose state is saved and restored around each call: one call at
# a time, or two threads would interleave their draws and restore each other's state.
_LOCK = threading.Lock()


def _probabilities(model: Any, x: Float32Array) -> Float64Array:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)


def _explainer(model: Any, background: Float32Array, nsamples: int) -> _Cached:
    import shap

    bg = np.ascontiguousarray(background, dtype=np.float32)
    digest = hashlib.blake2b(bg.tobytes() + repr(bg.shape).encode(), digest_size=16).digest()
    hit = _CACHE.get(model)
    if hit is not None and hit.digest == digest and hit.nsamples == nsamples:
        return hit
    # batch_size = nsamples: all samples of one explained sequence in one gradient call.
    entry = _Cached(
        digest=digest,
        nsamples=nsamples,
        explainer=shap.GradientExplainer(model, bg, batch_size=nsamples),
        base=_probabilities(model, bg).mean(axis=0),
    )
    _CACHE[model] = entry
    return entry


def gradient_shap(
    model: Any,
    background: Float32Array,
    x: Float32Array,
    *,
    seed: int,
    classes: Sequence[int] | None = None,
    nsamples: int = SHAP_NSAMPLES,
) -> Float64Array:
    """SHAP values of the model's class probabilities for each sequence of `x`: shape (n, steps, features, k).

    `k` runs over `classes` (all three, in CLASSES order, when None). Deterministic for a given seed: shap
    draws from numpy's global generator, so its state is saved and restored around the call and no caller's
    randomness changes.
    """
    if x.ndim != 3 or background.ndim != 3 or x.shape[1:] != background.shape[1:]:
        raise ValueError(
            f"x and background must be (n, steps, features) with the same steps and features; "
            f"got x {x.shape}, background {background.shape}"
        )
    chosen = list(range(len(CLASSES))) if classes is None else list(classes)
    with _LOCK:
        explainer = _explainer(model, background, nsamples).explainer
        state = np.random.get_state()  # noqa: NPY002 - shap itself uses the legacy global generator
        try:
            with warnings.catch_warnings():
                # shap hands Keras 3 a list where the functional model names its one input: harmless, but
                # it warns once per traced batch shape.
                warnings.filterwarnings(
                    "ignore", message="The structure of `inputs` doesn't match", category=UserWarning
                )
                phis, _ = explainer.shap_values(
                    np.asarray(x, dtype=np.float32),
                    nsamples=nsamples,
                    ranked_outputs=np.tile(np.asarray(chosen), (x.shape[0], 1)),
                    output_rank_order="custom",
                    rseed=seed,
                )
        finally:
            np.random.set_state(state)  # noqa: NPY002
    out = np.asarray(phis, dtype=np.float64)
    return out.reshape(*x.shape, len(chosen))


def explain_window(
    model: Any,
    background: Float32Array,
    window_scaled: Float32Array,
    raw_window: Float64Array,
    feature_names: list[str],
    class_index: int,
    top: int = 10,
    *,
    seed: int = 0,
    nsamples: int = SHAP_NSAMPLES,
) -> dict[str, Any]:
    """The `top` (feature, bar) inputs that moved one prediction's probability of class `class_index` most.

    `window_scaled` is the model's input, (steps, features) or (1, steps, features), oldest bar first;
    `raw_window` the same bars' unscaled feature values; `background` (m, steps, features) scaled training
    sequences, the reference the contributions are measured against.

    Returns {"class", "method", "contributions", "base_value", "output", "sum_of_contributions",
    "nsamples", "background"}. Each contribution is {"feature", "step", "value", "contribution"}: `step` 0 is
    the newest bar of the window, 1 the bar before...; `value` the raw feature value at that bar;
    `contribution` its SHAP value in probability units. Sorted by |contribution|, largest first (ties: the
    newer bar, then feature order). `base_value` is the mean probability over the background and `output`
    this window's probability; expected gradients make `sum_of_contributions` (over all steps x features,
    not only the top ones) approximately `output - base_value`.
    """
    window = np.asarray(window_scaled, dtype=np.float32)
    if window.ndim == 3 and window.shape[0] == 1:
        window = window[0]
    if window.ndim != 2:
        raise ValueError(f"window_scaled must be (steps, features) or (1, steps, features), got {window_scaled.shape}")
    steps, n_features = window.shape
    raw = np.asarray(raw_window, dtype=np.float64)
    if raw.shape != window.shape:
        raise ValueError(f"raw_window must have the scaled window's shape {window.shape}, got {raw.shape}")
    if len(feature_names) != n_features:
        raise ValueError(f"feature_names has {len(feature_names)} names for a window of {n_features} features")
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"class_index must be 0..{len(CLASSES) - 1} ({', '.join(CLASSES)}), got {class_index}")
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if background.ndim != 3 or background.shape[1:] != window.shape or background.shape[0] < 1:
        raise ValueError(f"background must be (m >= 1, {steps}, {n_features}) scaled sequences, got {background.shape}")

    phi = gradient_shap(model, background, window[None], seed=seed, classes=[class_index], nsamples=nsamples)[
        0, :, :, 0
    ]
    # Row steps-1 is the newest bar; order by |phi| descending, then newest bar first, then feature order.
    age = np.broadcast_to((steps - 1 - np.arange(steps))[:, None], phi.shape)
    feat = np.broadcast_to(np.arange(n_features)[None, :], phi.shape)
    order = np.lexsort((feat.ravel(), age.ravel(), -np.abs(phi).ravel()))[: min(top, phi.size)]
    contributions = []
    for flat in order:
        row, col = divmod(int(flat), n_features)
        contributions.append(
            {
                "feature": feature_names[col],
                "step": steps - 1 - row,
                "value": float(raw[row, col]),
                "contribution": float(phi[row, col]),
            }
        )
    base = float(_explainer(model, background, nsamples).base[class_index])
    output = float(_probabilities(model, window[None])[0, class_index])
    return {
        "class": CLASSES[class_index],
        "method": METHOD,
        "contributions": contributions,
        "base_value": base,
        "output": output,
        "sum_of_contributions": float(phi.sum()),
        "nsamples": nsamples,
        "background": int(background.shape[0]),
    }
