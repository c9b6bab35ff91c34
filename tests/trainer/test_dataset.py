"""Dataset rules on deterministic synthetic bars: labels, purged chronological splits, train-only scaler."""

from __future__ import annotations

import numpy as np
import pytest

from services.trainer.dataset import BUY, HOLD, SELL, build_dataset, class_weights, labels, min_bars
from services.trainer.evaluation import calibrate, classification_metrics, fit_temperature, macro_f1
from services.trainer.hyperparameters import TrainConfig
from shared.errors import NotEnoughBars
from shared.features import FEATURE_NAMES, compute_features
from shared.timeframes import OHLCV, Timeframe, resample
from shared.warmup import WARMUP_BARS
from tests.data import generate_bars

CFG = TrainConfig(horizon=3, min_sequences=300)


@pytest.fixture(scope="module")
def bars() -> OHLCV:
    return generate_bars("H1", 3000, seed=7)


def test_labels_follow_the_atr_dead_band() -> None:
    close = np.array([100.0, 101.0, 100.5, 100.5, 99.0])
    atr_pct = np.full(5, 0.01)
    # log returns: +0.995%, -0.496%, 0, -1.504%; band 0.5 * 1% = 0.5%
    assert labels(close, atr_pct, 1, 0.5).tolist() == [BUY, HOLD, HOLD, SELL]
    assert labels(close, atr_pct, 2, 0.0).tolist() == [BUY, SELL, SELL]


def test_splits_are_chronological_with_a_purge_gap(bars: OHLCV) -> None:
    ds = build_dataset(bars, Timeframe.H1, Timeframe.H1, "SYN", CFG)
    step = Timeframe.H1.seconds
    length, h = CFG.sequence_length, CFG.horizon
    for a, b in ((ds.train, ds.val), (ds.val, ds.test)):
        last_label_bar = int(a.ts[-1]) + h * step  # the close the last label of `a` looks at
        first_input_bar = int(b.ts[0]) - (length - 1) * step  # the first bar `b` reads
        assert first_input_bar > last_label_bar
        assert (int(b.ts[0]) - int(a.ts[-1])) // step >= length + h
    assert ds.train.x.shape[1:] == (20, 17) and ds.train.x.dtype == np.float32
    assert len(ds.train) > len(ds.val) > 0 and len(ds.test) > 0
    assert ds.first_ts < int(ds.train.ts[0]) and ds.last_ts == int(ds.test.ts[-1]) + h * step


def test_scaler_is_fitted_on_training_rows_only(bars: OHLCV) -> None:
    ds = build_dataset(bars, Timeframe.H1, Timeframe.H1, "SYN", CFG)
    # Change every bar from the first one validation reads: scaler, training inputs and labels must not move.
    k = int(np.searchsorted(bars.ts, ds.val.ts[0])) - (CFG.sequence_length - 1)
    close = bars.close.copy()
    close[k:] *= 1.5
    volume = bars.volume.copy()
    volume[k:] *= 3
    changed = OHLCV(bars.ts, bars.open, np.maximum(bars.high, close), np.minimum(bars.low, close), close, volume)
    ds2 = build_dataset(changed, Timeframe.H1, Timeframe.H1, "SYN", CFG)
    assert np.array_equal(ds.scaler_mean, ds2.scaler_mean) and np.array_equal(ds.scaler_scale, ds2.scaler_scale)
    assert np.array_equal(ds.train.x, ds2.train.x) and np.array_equal(ds.train.y, ds2.train.y)
    assert not np.array_equal(ds.test.x, ds2.test.x)
    # The scaled training inputs are standardised.
    rows = ds.train.x[:, -1, :]
    assert np.all(np.abs(rows.mean(axis=0)) < 0.2)
    assert set(ds.reference) == set(FEATURE_NAMES)
    assert all(abs(sum(r.shares) - 1.0) < 1e-9 for r in ds.reference.values())


def test_sequences_hold_the_shared_feature_rows(bars: OHLCV) -> None:
    ds = build_dataset(bars, Timeframe.H1, Timeframe.H1, "SYN", CFG)
    feats = compute_features(bars)
    i = int(np.searchsorted(bars.ts, ds.test.ts[5]))
    expected = (feats[i - 19 : i + 1] - ds.scaler_mean) / ds.scaler_scale
    assert np.allclose(ds.test.x[5], expected.astype(np.float32), atol=1e-6)


def test_higher_timeframe_uses_completed_resampled_bars(bars: OHLCV) -> None:
    m30 = generate_bars("M30", 6001, seed=3)  # ends mid-hour: the last H1 bar is still forming
    ds = build_dataset(m30, Timeframe.M30, Timeframe.H1, "SYN", CFG)
    h1 = resample(m30, Timeframe.M30, Timeframe.H1)
    assert len(h1) == 3000 and ds.bars == 3000
    assert ds.last_ts <= int(h1.ts[-1])


def test_too_few_bars_is_a_clear_error(bars: OHLCV) -> None:
    need = min_bars(CFG)
    assert need > WARMUP_BARS
    with pytest.raises(NotEnoughBars, match=rf"need at least {need} bars for H1, have 700"):
        build_dataset(bars.tail(700), Timeframe.H1, Timeframe.H1, "SYN", CFG)


def test_a_split_too_small_to_use_is_a_clear_error_not_a_crash(bars: OHLCV) -> None:
    # min_sequences is met, but 5% of ~150 usable sequences leaves 6 for validation and test.
    cfg = TrainConfig(min_sequences=30, val_fraction=0.05, test_fraction=0.05)
    with pytest.raises(NotEnoughBars, match=r"need at least 10 sequences per split; .* validation 6, test 6"):
        build_dataset(bars.tail(700), Timeframe.H1, Timeframe.H1, "SYN", cfg)


def test_hyperparameters_are_bounded_per_element() -> None:
    from pydantic import ValidationError

    assert TrainConfig(lstm_units=(1, 1024, 1024, 1)).lstm_units == (1, 1024, 1024, 1)
    for bad in ({"lstm_units": (0,)}, {"lstm_units": (1025,)}, {"lstm_units": (8,) * 5}, {"seed": -1}):
        with pytest.raises(ValidationError):
            TrainConfig.model_validate(bad)


def test_class_weights_balance_the_classes() -> None:
    y = np.array([0] * 10 + [1] * 30 + [2] * 20)
    w = class_weights(y)
    assert [round(w[c] * n, 6) for c, n in ((0, 10), (1, 30), (2, 20))] == [20.0, 20.0, 20.0]


def test_temperature_scaling_fixes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(size=(2000, 3))
    logits[np.arange(2000), y] += 1.0
    sharp = np.exp(4 * logits) / np.exp(4 * logits).sum(axis=1, keepdims=True)  # overconfident
    t, before, after = fit_temperature(sharp, y)
    assert t > 2.0 and after < before
    assert np.allclose(calibrate(sharp, t).sum(axis=1), 1.0)
    assert macro_f1(y, y) == 1.0


def test_a_class_absent_from_training_keeps_weight_one() -> None:
    y = np.array([0] * 10 + [2] * 30)
    assert class_weights(y) == {0: pytest.approx(40 / 30), 1: 1.0, 2: pytest.approx(40 / 90)}


def test_metrics_are_sklearns_over_all_three_classes() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([1.0, 1.0, 1.0], 300)
    y = rng.integers(0, 2, 300)  # BUY never occurs in this test set
    m = classification_metrics(probs, y, train_y=np.array([0, 1, 1, 2]))
    assert {"accuracy", "balanced_accuracy", "macro_f1", "log_loss", "brier", "confusion"} <= set(m)
    onehot = np.eye(3)[y]
    assert m["brier"] == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    assert m["log_loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(300), y])))
    assert np.asarray(m["confusion"]).shape == (3, 3) and np.asarray(m["confusion"])[2].sum() == 0
    pred = probs.argmax(axis=1)
    recalls = [np.mean(pred[y == c] == c) for c in (0, 1)]  # the mean recall of the classes present
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["baseline_majority_class"] == "HOLD"
