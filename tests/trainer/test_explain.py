"""Per-prediction explanations: shape of the answer, fidelity to the raw window, and the planted feature
ranked first where the planted rule decides the prediction."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from services.trainer.explain import METHOD, explain_window, gradient_shap
from shared.features import FEATURE_NAMES
from shared.model_metadata import CLASSES
from tests.trainer.planted import PLANTED_FEATURE, PlantedModel, planted_model

# Every test here explains the planted model, trained once per run (about 15 s on 2 cores).
pytestmark = pytest.mark.slow

NAMES = list(FEATURE_NAMES)
WINDOWS = 20


@pytest.fixture(scope="module")
def planted() -> PlantedModel:
    return planted_model()


def _background(p: PlantedModel) -> npt.NDArray[np.float32]:
    return p.ds.train.x[:: max(len(p.ds.train) // 50, 1)][:50]


def _raw(p: PlantedModel, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    return x.astype(np.float64) * p.ds.scaler_scale + p.ds.scaler_mean


def _predicted(p: PlantedModel, x: npt.NDArray[np.float32]) -> int:
    import keras

    return int(np.argmax(keras.ops.convert_to_numpy(p.model(x[None], training=False))[0]))


def test_explanation_lists_the_top_inputs_of_the_window(planted: PlantedModel) -> None:
    x = planted.ds.val.x[7]
    raw = _raw(planted, x)
    steps = x.shape[0]
    out = explain_window(planted.model, _background(planted), x, raw, NAMES, class_index=2, top=7)
    assert out["class"] == CLASSES[2] == "BUY"
    assert out["method"] == METHOD
    contributions = out["contributions"]
    assert len(contributions) == 7
    size = [abs(c["contribution"]) for c in contributions]
    assert size == sorted(size, reverse=True)
    for c in contributions:
        assert 0 <= c["step"] < steps
        # step 0 is the newest bar, the window's last row; value is the unscaled feature there
        assert c["value"] == raw[steps - 1 - c["step"], NAMES.index(c["feature"])]
    # Expected gradients nearly add up to output - base_value (measured gap 0.01-0.04 with 200 samples).
    assert out["sum_of_contributions"] == pytest.approx(out["output"] - out["base_value"], abs=0.1)


def test_contributions_are_the_window_shap_values(planted: PlantedModel) -> None:
    x = planted.ds.val.x[3]
    bg = _background(planted)
    out = explain_window(planted.model, bg, x[None], _raw(planted, x), NAMES, class_index=0, top=10_000)
    phi = gradient_shap(planted.model, bg, x[None], seed=0, classes=[0])[0, :, :, 0]
    assert len(out["contributions"]) == phi.size  # top beyond steps x features: every input once
    for c in out["contributions"]:
        assert c["contribution"] == phi[x.shape[0] - 1 - c["step"], NAMES.index(c["feature"])]
    assert out["sum_of_contributions"] == pytest.approx(float(phi.sum()))


def test_explanations_are_deterministic_and_leave_numpy_randomness_alone(planted: PlantedModel) -> None:
    x = planted.ds.val.x[11]
    args = (planted.model, _background(planted), x, _raw(planted, x), NAMES, 1)
    np.random.seed(123)  # noqa: NPY002 - the legacy global generator is what shap would disturb
    first = explain_window(*args, seed=5)
    after = np.random.random(3)  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    np.testing.assert_array_equal(after, np.random.random(3))  # noqa: NPY002
    assert explain_window(*args, seed=5) == first


def test_planted_feature_at_the_newest_bar_ranks_first(planted: PlantedModel) -> None:
    # Explaining the predicted class of the first WINDOWS validation windows: mfi_14 at step 0 ranked first
    # in 17 of 20 when measured (43 of the first 60: 0.72); asserted with margin.
    bg = _background(planted)
    xs = planted.ds.val.x[:WINDOWS]
    first = 0
    for x in xs:
        top = explain_window(planted.model, bg, x, _raw(planted, x), NAMES, _predicted(planted, x), top=1)
        c = top["contributions"][0]
        first += c["feature"] == PLANTED_FEATURE and c["step"] == 0
    assert first / WINDOWS >= 0.6


def test_bad_arguments_say_what_is_expected(planted: PlantedModel) -> None:
    x = planted.ds.val.x[0]
    bg = _background(planted)
    raw = _raw(planted, x)
    with pytest.raises(ValueError, match="class_index must be 0..2"):
        explain_window(planted.model, bg, x, raw, NAMES, 3)
    with pytest.raises(ValueError, match="raw_window must have the scaled window's shape"):
        explain_window(planted.model, bg, x, raw[1:], NAMES, 0)
    with pytest.raises(ValueError, match="feature_names has 16 names"):
        explain_window(planted.model, bg, x, raw, NAMES[:-1], 0)
    with pytest.raises(ValueError, match="top must be at least 1"):
        explain_window(planted.model, bg, x, raw, NAMES, 0, top=0)
    with pytest.raises(ValueError, match="background must be"):
        explain_window(planted.model, bg[:, 1:], x, raw, NAMES, 0)
