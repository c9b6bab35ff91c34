"""Training datasets from bars: 17 features, BUY/SELL/HOLD labels, purged chronological splits, scaling.

Pure numpy (no TensorFlow): the API and the tests of the data rules import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from services.trainer.hyperparameters import MIN_SPLIT_SEQUENCES, TrainConfig
from shared import drift
from shared.errors import NotEnoughBars
from shared.features import FEATURE_NAMES, N_FEATURES, compute_features
from shared.model_metadata import CLASSES, ReferenceDistribution
from shared.timeframes import OHLCV, Timeframe, resample
from shared.warmup import WARMUP_BARS

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

SELL, HOLD, BUY = 0, 1, 2
assert (CLASSES[SELL], CLASSES[HOLD], CLASSES[BUY]) == ("SELL", "HOLD", "BUY")
ATR_PCT = FEATURE_NAMES.index("atr_14_pct")

LABEL_DESCRIPTION = (
    "r = ln(close[t+horizon] / close[t]); band = dead_band_atr * atr_14_pct[t] (ATR(14)/close at bar t); "
    "BUY if r > band, SELL if r < -band, else HOLD. The input sequence ending at bar t uses feature rows "
    "t-sequence_length+1..t; bars are completed bars of the model's timeframe."
)


@dataclass(frozen=True)
class Split:
    x: npt.NDArray[np.float32]  # (n, sequence_length, 17), scaled
    y: IntArray  # (n,) class index in CLASSES order
    ts: IntArray  # bar-open epoch seconds of each sequence's last bar

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def info(self) -> dict[str, object]:
        counts = np.bincount(self.y, minlength=3)
        return {
            "sequences": len(self),
            "start": _iso(int(self.ts[0])) if len(self) else None,
            "end": _iso(int(self.ts[-1])) if len(self) else None,
            "label_counts": {c: int(n) for c, n in zip(CLASSES, counts, strict=True)},
        }


@dataclass(frozen=True)
class Dataset:
    symbol: str
    timeframe: Timeframe
    base_timeframe: Timeframe
    bars: int  # completed bars of `timeframe` available
    train: Split
    val: Split
    test: Split
    scaler_mean: FloatArray
    scaler_scale: FloatArray
    class_weights: dict[int, float]
    reference: dict[str, ReferenceDistribution]
    first_ts: int  # first bar whose features enter a sequence
    last_ts: int  # last bar whose close enters a label
    purge_gap: int

    def splits_info(self) -> dict[str, dict[str, object]]:
        return {"train": self.train.info(), "val": self.val.info(), "test": self.test.info()}


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def min_bars(cfg: TrainConfig) -> int:
    """Completed bars needed: warm-up, one sequence, the label horizon, two purge gaps and `min_sequences`."""
    return WARMUP_BARS + cfg.sequence_length - 1 + cfg.horizon + 2 * cfg.purge_gap + cfg.min_sequences


def labels(close: FloatArray, atr_pct: FloatArray, horizon: int, dead_band_atr: float) -> IntArray:
    """Label of every bar that has a bar `horizon` ahead (len(close) - horizon of them)."""
    ret = np.log(close[horizon:] / close[:-horizon])
    band = dead_band_atr * atr_pct[: len(ret)]
    y = np.full(len(ret), HOLD, dtype=np.int64)
    y[ret > band] = BUY
    y[ret < -band] = SELL
    return y


def class_weights(y: IntArray) -> dict[int, float]:
    """'Balanced' weights n / (3 * count) (scikit-learn's compute_class_weight); a class absent from training
    gets 1."""
    from sklearn.utils.class_weight import compute_class_weight  # 2 s to import: only when training

    present = np.unique(y)
    weights = dict.fromkeys(range(len(CLASSES)), 1.0)
    if present.size:
        balanced = compute_class_weight("balanced", classes=present, y=y)
        # sklearn balances over the classes present (n / (k * count)); the documented rule divides by all 3.
        weights.update({int(c): float(w) * present.size / len(CLASSES) for c, w in zip(present, balanced, strict=True)})
    return weights


def reference_distribution(values: FloatArray, bins: int, null_window_bars: int | None = None) -> ReferenceDistribution:
    """Quantile bins of one feature's training rows (in time order) and their shares; with `null_window_bars`,
    also the PSI/KS null thresholds of windows of that many consecutive rows (shared/drift.py)."""
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:  # a constant feature: one bin around the value
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    hist, _ = np.histogram(values, bins=edges)
    ref = ReferenceDistribution(
        edges=edges.tolist(),
        shares=(hist / max(len(values), 1)).tolist(),
        mean=float(values.mean()),
        std=float(values.std()),
    )
    return drift.calibrated(ref, values, null_window_bars)


def drift_window_bars(timeframe: Timeframe) -> int:
    """The predictor's drift window in bars of `timeframe`, at its default settings (shared/drift.py)."""
    return drift.window_bars(timeframe, drift.DEFAULT_WINDOW_HOURS, drift.DEFAULT_MIN_BARS)


@dataclass(frozen=True)
class SeriesRows:
    """A series prepared once for any split of it: the completed bars of the model's timeframe, the finite
    feature rows after warm-up, the label of every bar and the usable sequence ends.

    `build_dataset` (one chronological split) and walk-forward validation (K folds) both cut their
    splits from this, so the feature, label and sequence rules have one code path.
    """

    symbol: str
    timeframe: Timeframe
    base_timeframe: Timeframe
    bars: OHLCV  # completed bars of `timeframe`
    rows_idx: IntArray  # bar index of each feature row (rows with a non-finite value left out)
    values: FloatArray  # (rows, 17) raw feature rows
    y_all: IntArray  # label of bar i (len(bars) - horizon of them)
    ends: IntArray  # row positions of the last row of each usable sequence, in time order
    source: str  # "" or " (completed bars resampled from M30)", for error messages

    def bar_of(self, seq: IntArray) -> IntArray:
        """Bar index of the last bar of the sequences `seq` (positions in `ends`)."""
        return self.rows_idx[self.ends[seq]]


def series_rows(bars: OHLCV, base: Timeframe, target: Timeframe, symbol: str, cfg: TrainConfig) -> SeriesRows:
    """Resample, compute features and labels, and find every sequence that may enter a split."""
    tbars = resample(bars, base, target)
    n = len(tbars)
    feats = compute_features(tbars)
    finite = np.isfinite(feats[WARMUP_BARS:]).all(axis=1)
    rows_idx: IntArray = np.arange(WARMUP_BARS, n, dtype=np.int64)[finite]
    y_all = labels(tbars.close, feats[:, ATR_PCT], cfg.horizon, cfg.dead_band_atr)
    length, h = cfg.sequence_length, cfg.horizon
    r = np.arange(length - 1, len(rows_idx))
    # A sequence needs `length` consecutive bars (no row dropped inside it) and a label `horizon` ahead.
    contiguous = rows_idx[r] - rows_idx[r - length + 1] == length - 1
    labelled = rows_idx[r] + h < n
    return SeriesRows(
        symbol=symbol,
        timeframe=target,
        base_timeframe=base,
        bars=tbars,
        rows_idx=rows_idx,
        values=feats[rows_idx],
        y_all=y_all,
        ends=r[contiguous & labelled].astype(np.int64),
        source="" if base is target else f" (completed bars resampled from {base.value})",
    )


def make_dataset(
    series: SeriesRows,
    train_seq: IntArray,
    val_seq: IntArray,
    test_seq: IntArray,
    cfg: TrainConfig,
    *,
    train_y: IntArray | None = None,
    val_y: IntArray | None = None,
) -> Dataset:
    """The dataset of three sequence sets (positions in `series.ends`, each in time order, training first).

    Scaler, class weights, reference distributions and their drift null thresholds come from the feature rows
    the training sequences read, nothing later. `train_y` / `val_y` replace the true labels (the shuffled-label
    leakage control).
    """
    length, h = cfg.sequence_length, cfg.horizon
    train_ends, val_ends, test_ends = series.ends[train_seq], series.ends[val_seq], series.ends[test_seq]
    fit_rows = series.values[train_ends[0] - length + 1 : train_ends[-1] + 1]
    mean = fit_rows.mean(axis=0)
    std = fit_rows.std(axis=0)
    scale = np.where(std > 1e-12, std, 1.0)
    # Only the rows some sequence reads are scaled: a fold of a long series needs a small part of it.
    lo = int(min(e[0] for e in (train_ends, val_ends, test_ends) if e.size)) - length + 1
    hi = int(max(e[-1] for e in (train_ends, val_ends, test_ends) if e.size)) + 1
    scaled = ((series.values[lo:hi] - mean) / scale).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(scaled, length, axis=0)  # (rows-length+1, 17, length)

    def split(sel: IntArray, y: IntArray | None) -> Split:
        x = np.ascontiguousarray(windows[sel - length + 1 - lo].transpose(0, 2, 1))
        bar = series.rows_idx[sel]
        return Split(x=x, y=series.y_all[bar] if y is None else y, ts=series.bars.ts[bar].astype(np.int64))

    train, val, test = split(train_ends, train_y), split(val_ends, val_y), split(test_ends, None)
    assert train.x.shape[1:] == (length, N_FEATURES)
    return Dataset(
        symbol=series.symbol,
        timeframe=series.timeframe,
        base_timeframe=series.base_timeframe,
        bars=len(series.bars),
        train=train,
        val=val,
        test=test,
        scaler_mean=mean,
        scaler_scale=scale,
        class_weights=class_weights(train.y),
        reference={
            name: reference_distribution(fit_rows[:, i], cfg.reference_bins, drift_window_bars(series.timeframe))
            for i, name in enumerate(FEATURE_NAMES)
        },
        first_ts=int(series.bars.ts[series.rows_idx[train_ends[0] - length + 1]]),
        last_ts=int(series.bars.ts[series.rows_idx[test_ends[-1]] + h]),
        purge_gap=cfg.purge_gap,
    )


def build_dataset(bars: OHLCV, base: Timeframe, target: Timeframe, symbol: str, cfg: TrainConfig) -> Dataset:
    """Everything training needs from the stored bars of one series (resampled from `base` when needed)."""
    series = series_rows(bars, base, target, symbol, cfg)
    n = len(series.bars)
    need = min_bars(cfg)
    source = series.source
    if n < need:
        raise NotEnoughBars(f"need at least {need} bars for {target.value}, have {n}{source} for {symbol}")
    gap = cfg.purge_gap
    usable = len(series.ends) - 2 * gap
    if usable < cfg.min_sequences:
        raise NotEnoughBars(
            f"need at least {need} bars for {target.value} with {cfg.min_sequences} usable sequences, "
            f"have {n}{source} for {symbol} giving {max(usable, 0)}"
        )
    n_test = int(usable * cfg.test_fraction)
    n_val = int(usable * cfg.val_fraction)
    n_train = usable - n_val - n_test
    if min(n_train, n_val, n_test) < MIN_SPLIT_SEQUENCES:
        raise NotEnoughBars(
            f"need at least {MIN_SPLIT_SEQUENCES} sequences per split; {usable} usable sequences of {symbol} "
            f"{target.value} split {cfg.val_fraction:g} / {cfg.test_fraction:g} give train {n_train}, "
            f"validation {n_val}, test {n_test}: store more bars or raise val_fraction / test_fraction"
        )
    seq = np.arange(len(series.ends), dtype=np.int64)
    return make_dataset(
        series,
        seq[:n_train],
        seq[n_train + gap : n_train + gap + n_val],
        seq[n_train + 2 * gap + n_val :],
        cfg,
    )
