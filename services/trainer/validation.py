"""Walk-forward validation of the LSTM against baselines on the same folds (docs/MODEL_QUALITY_METHOD.md).

Expanding window: K equal test blocks at the end of the series' usable sequences; fold i trains on everything
before its test block minus a purge gap, keeps the last part of that (after another gap) for early stopping
and temperature calibration, and retrains every model from scratch. Per fold and pooled over the folds'
out-of-sample predictions: scikit-learn's classification metrics and the backtest of trading the signals
with the predictor's risk sizing. A paired Student-t test across folds says whether the LSTM beats each
baseline (and the production model's hyperparameters, retrained on the same folds).

TensorFlow, scikit-learn and scipy.stats are imported inside the functions that need them (2 s each to
import on the 2-core dev machine), so the API can import the report model and the gate cheaply.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from services.trainer.dataset import ATR_PCT, BUY, HOLD, SELL, SeriesRows, make_dataset, series_rows
from services.trainer.folds import (
    MAX_FOLDS,
    MIN_FOLDS,
    MIN_TEST_SEQUENCES,
    min_bars_for_folds,
    plan_folds,
)
from services.trainer.hyperparameters import TrainConfig
from shared.errors import NotEnoughBars, ValidationFailed
from shared.model_metadata import CLASSES
from shared.signal_rules import DEFAULT_RISK_LIMITS, risk
from shared.timeframes import OHLCV, Timeframe

if TYPE_CHECKING:
    from services.trainer.backtest import BacktestParams, BacktestResult
    from services.trainer.dataset import Dataset

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Round-trip cost of the validation backtests: about a 1-pip EURUSD spread (0.9 bps) plus a commission
# of 1 bps, the order of a retail ECN account. BacktestParams passed by the caller replace it.
DEFAULT_COST_BPS = 2.0
PRIMARY_METRIC = "log_loss"
# Points of the pooled equity curve kept in a report (the report's PNG and the console read them).
EQUITY_POINTS = 500
CONFIDENCE = 0.95

CANDIDATE = "lstm"
PRODUCTION = "production"
BASELINES = ("majority", "prior", "logistic_regression", "gradient_boosting")
LABELS_OF: dict[str, str] = {
    CANDIDATE: "the LSTM",
    PRODUCTION: "the production model",
    "majority": "the majority class",
    "prior": "the training class prior",
    "logistic_regression": "logistic regression",
    "gradient_boosting": "gradient boosting",
}
ModelKind = Literal["candidate", "production", "baseline"]

# metric -> (where it lives, lower is better, words)
METRICS: dict[str, tuple[Literal["metrics", "backtest"], bool, str]] = {
    "log_loss": ("metrics", True, "log loss"),
    "brier": ("metrics", True, "Brier score"),
    "accuracy": ("metrics", False, "accuracy"),
    "balanced_accuracy": ("metrics", False, "balanced accuracy"),
    "macro_f1": ("metrics", False, "macro-F1"),
    "sharpe": ("backtest", False, "Sharpe ratio"),
    "total_return": ("backtest", False, "total return"),
    "max_drawdown": ("backtest", True, "maximum drawdown"),
    "profit_factor": ("backtest", False, "profit factor"),
    "win_rate": ("backtest", False, "win rate"),
}
Metric = float | None

# Baseline settings: fixed, common defaults, never tuned on any fold. No class weights: unweighted fits
# minimise the log-loss, the primary metric, so these are the strongest baselines on it.
LOGREG_C = 1.0
LOGREG_MAX_ITER = 2000
HGB_SETTINGS: dict[str, Any] = {
    "learning_rate": 0.05,
    "max_iter": 300,
    "max_leaf_nodes": 15,
    "min_samples_leaf": 20,
    "l2_regularization": 1.0,
    "early_stopping": True,
    "n_iter_no_change": 10,
    "scoring": "loss",
}


# --- the report -------------------------------------------------------------------------------------------


class Span(BaseModel):
    sequences: int
    start: str | None = Field(description="bar-open time of the first sequence's last bar (ISO, UTC)")
    end: str | None = Field(description="bar-open time of the last sequence's last bar (ISO, UTC)")


class FoldInfo(BaseModel):
    fold: int
    fit: Span
    val: Span
    test: Span
    temperature: float | None = None
    epochs_run: int | None = None
    production_temperature: float | None = None
    seconds: dict[str, float] = Field(default_factory=dict, description="wall time per step of this fold")


class Scores(BaseModel):
    """Scores of one model on one fold's test block, or pooled over every test block."""

    sequences: int
    metrics: dict[str, Metric] = Field(description="accuracy, balanced_accuracy, macro_f1, log_loss, brier")
    confusion: list[list[int]] = Field(description="rows true class, columns predicted, CLASSES order")
    backtest: dict[str, Metric] = Field(default_factory=dict, description="services.trainer.backtest metrics")
    equity: dict[str, list[float]] | None = Field(
        default=None, description="pooled only: the backtest's equity curve {ts, equity, drawdown}, <= 500 points"
    )


class ModelScores(BaseModel):
    name: str
    label: str
    kind: ModelKind
    folds: list[Scores]
    pooled: Scores


class Comparison(BaseModel):
    """`model` minus `against` on one metric: pooled difference and the paired t-test over folds."""

    model: str
    against: str
    metric: str
    lower_is_better: bool
    pooled_model: Metric
    pooled_against: Metric
    pooled_difference: Metric
    fold_differences: list[Metric]
    folds_used: int
    mean_difference: Metric
    ci_low: Metric
    ci_high: Metric
    p_value: Metric
    verdict: Literal["beats", "worse", "no significant difference"]
    summary: str


class TargetResult(BaseModel):
    name: str
    metric: str
    value: Metric
    threshold: float
    comparison: Literal[">", "<"]
    passed: bool


class ValidationReport(BaseModel):
    """Everything a walk-forward run found, JSON-serialisable (the API and the CLI show it as is)."""

    model_config = ConfigDict(protected_namespaces=())

    symbol: str
    timeframe: str
    base_timeframe: str
    bars: int
    data_start: str = Field(description="first bar whose features enter training (ISO, UTC)")
    data_end: str = Field(description="last bar whose close enters a test label (ISO, UTC)")
    n_folds: int
    purge_gap: int
    usable_sequences: int
    folds: list[FoldInfo]
    config: dict[str, Any]
    compare_config: dict[str, Any] | None = None
    seeds: dict[str, int | None]
    shuffled_labels: bool = False
    primary_metric: str = PRIMARY_METRIC
    backtest_params: dict[str, Any] = Field(default_factory=dict)
    models: dict[str, ModelScores]
    comparisons: list[Comparison] = Field(default_factory=list)
    business_targets: list[TargetResult] = Field(default_factory=list)
    seconds: float = 0.0


# --- comparisons ------------------------------------------------------------------------------------------


def _value(scores: Scores, metric: str) -> Metric:
    where = METRICS[metric][0]
    v = (scores.metrics if where == "metrics" else scores.backtest).get(metric)
    return float(v) if v is not None and math.isfinite(v) else None


def _fmt(x: float) -> str:
    return f"{x:+.2e}" if x != 0 and abs(x) < 1e-3 else f"{x:+.3f}"


def _cap(words: str) -> str:
    return words[:1].upper() + words[1:]


def paired_comparison(model: ModelScores, against: ModelScores, metric: str) -> Comparison:
    """`model` minus `against` on `metric`: pooled difference, per-fold differences, their mean, a 95 %
    Student-t interval and the paired t-test p-value (folds where either value is undefined are left
    out). "beats" only when the whole interval lies on the better side, "worse" when on the worse side."""
    from scipy import stats

    _, lower, words = METRICS[metric]
    pm, pa = _value(model.pooled, metric), _value(against.pooled, metric)
    diffs: list[Metric] = []
    a_vals, b_vals = [], []
    for fm, fa in zip(model.folds, against.folds, strict=True):
        vm, va = _value(fm, metric), _value(fa, metric)
        diffs.append(None if vm is None or va is None else vm - va)
        if vm is not None and va is not None:
            a_vals.append(vm)
            b_vals.append(va)
    m = len(a_vals)
    mean = lo = hi = p = None
    verdict: Literal["beats", "worse", "no significant difference"] = "no significant difference"
    who, other = LABELS_OF.get(model.name, model.label), LABELS_OF.get(against.name, against.label)
    direction = "lower is better" if lower else "higher is better"
    if m >= 2:
        d = np.asarray(a_vals) - np.asarray(b_vals)
        mean = float(d.mean())
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, m - 1) * d.std(ddof=1) / math.sqrt(m))
        lo, hi = mean - half, mean + half
        if float(d.std(ddof=1)) > 0:
            p = float(stats.ttest_rel(a_vals, b_vals).pvalue)
        better_side = hi < 0 if lower else lo > 0
        worse_side = lo > 0 if lower else hi < 0
        verdict = "beats" if better_side else ("worse" if worse_side else "no significant difference")
        verb = {"beats": "beats", "worse": "is worse than", "no significant difference": "does not beat"}[verdict]
        ptext = f", p = {p:.3g}" if p is not None else ""
        summary = (
            f"{_cap(who)} {verb} {other} on {words} (difference {_fmt(mean)}, {direction}, "
            f"95% CI [{_fmt(lo)}, {_fmt(hi)}] over {m} folds{ptext})"
        )
    else:
        summary = (
            f"{_cap(who)} cannot be compared with {other} on {words}: "
            f"{m} fold(s) with a value for both, the paired test needs 2"
        )
    return Comparison(
        model=model.name,
        against=against.name,
        metric=metric,
        lower_is_better=lower,
        pooled_model=pm,
        pooled_against=pa,
        pooled_difference=None if pm is None or pa is None else pm - pa,
        fold_differences=diffs,
        folds_used=m,
        mean_difference=mean,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        verdict=verdict,
        summary=summary,
    )


def compare_all(models: Mapping[str, ModelScores]) -> list[Comparison]:
    """The candidate against every baseline and the production model, on every metric both have."""
    if CANDIDATE not in models:
        return []
    cand = models[CANDIDATE]
    out = []
    for name, other in models.items():
        if name == CANDIDATE:
            continue
        for metric in METRICS:
            if _value(other.pooled, metric) is None and all(_value(f, metric) is None for f in other.folds):
                continue  # e.g. the majority class has no log-loss: a hard forecast has no probabilities
            out.append(paired_comparison(cand, other, metric))
    return out


# --- business targets -------------------------------------------------------------------------------------

# The design's targets for the LSTM's pooled out-of-sample results: (name, metric, threshold, comparison).
TARGETS: tuple[tuple[str, str, float, Literal[">", "<"]], ...] = (
    ("win rate above 55 %", "win_rate", 0.55, ">"),
    ("profit factor above 1.2", "profit_factor", 1.2, ">"),
    ("maximum drawdown below 15 %", "max_drawdown", 0.15, "<"),
    ("Sharpe ratio above 0.8", "sharpe", 0.8, ">"),
    ("accuracy above 65 %", "accuracy", 0.65, ">"),
)


def business_targets(pooled: Scores) -> list[TargetResult]:
    """The design targets checked on pooled out-of-sample scores; an undefined value (e.g. a profit
    factor without a losing trade, a win rate without trades) does not pass."""
    out = []
    for name, metric, threshold, cmp in TARGETS:
        v = _value(pooled, metric)
        passed = v is not None and (v > threshold if cmp == ">" else v < threshold)
        out.append(TargetResult(name=name, metric=metric, value=v, threshold=threshold, comparison=cmp, passed=passed))
    return out


# --- walk-forward -----------------------------------------------------------------------------------------


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def _span(series: SeriesRows, seq: IntArray) -> Span:
    if seq.size == 0:
        return Span(sequences=0, start=None, end=None)
    bars = series.bar_of(seq)
    return Span(
        sequences=int(seq.size),
        start=_iso(int(series.bars.ts[bars[0]])),
        end=_iso(int(series.bars.ts[bars[-1]])),
    )


def default_backtest_params() -> BacktestParams:
    """What the predictor recommends: risk sizing with its default limits, ATR stop and target, 2 bps."""
    from services.trainer.backtest import BacktestParams

    return BacktestParams(
        cost_bps=DEFAULT_COST_BPS,
        sizing="risk",
        max_position_fraction=DEFAULT_RISK_LIMITS.max_position_fraction,
        stop_atr=DEFAULT_RISK_LIMITS.stop_atr_multiple,
        take_profit_atr=DEFAULT_RISK_LIMITS.take_profit_atr_multiple,
    )


_SIGNAL_OF = {SELL: -1, HOLD: 0, BUY: 1}


def _clean(d: Mapping[str, Any]) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue  # e.g. the session name
        out[k] = float(v) if math.isfinite(float(v)) else None
    return out


def _backtest(
    series: SeriesRows,
    atr_pct: FloatArray,
    seq: IntArray,
    probs: FloatArray,
    params: BacktestParams,
) -> tuple[dict[str, Metric], BacktestResult]:
    """Trade the signals of `probs` (one row per sequence of `seq`) over the bars of those sequences plus
    the next bar (where the last signal is filled); bars without a sequence are flat."""
    from services.trainer.backtest import run_backtest

    bar = series.bar_of(seq)
    b0, b1 = int(bar[0]), int(bar[-1]) + 1  # bar[-1] + 1 exists: every sequence has a label ahead
    bars = series.bars.window(b0, b1 + 1)
    n = len(bars)
    cls = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    signals = np.zeros(n, dtype=np.int8)
    fraction = np.zeros(n, dtype=np.float64)
    atr = np.zeros(n, dtype=np.float64)
    close = series.bars.close
    local = bar - b0
    for j, (i, c, conf) in enumerate(zip(bar.tolist(), cls.tolist(), confidence.tolist(), strict=True)):
        signals[local[j]] = _SIGNAL_OF[c]
        if c != HOLD:
            r = risk(CLASSES[c], conf, float(close[i]), float(atr_pct[i]), DEFAULT_RISK_LIMITS)
            fraction[local[j]] = float(r["position_fraction"])  # type: ignore[arg-type]
    a = atr_pct[b0 : b1 + 1] * close[b0 : b1 + 1]
    atr[:] = np.where(np.isfinite(a) & (a > 0), a, 0.0)
    # The backtester refuses a trade without a positive ATR for its stops; risk() sizes such a bar at 0.
    signals[(atr <= 0) & (signals != 0)] = 0
    result = run_backtest(bars, signals, series.timeframe, params, position_fraction=fraction, atr=atr)
    return _clean(result.metrics), result


def _scores(probs: FloatArray, y: IntArray, backtest: dict[str, Metric], hard: bool = False) -> Scores:
    from services.trainer.evaluation import prediction_metrics

    m = prediction_metrics(probs, y)
    metrics: dict[str, Metric] = {k: float(v) for k, v in m.items() if k != "confusion"}  # type: ignore[arg-type]
    if hard:
        metrics["log_loss"] = None  # a hard forecast puts probability 0 on every miss: no finite log-loss
    return Scores(sequences=len(y), metrics=metrics, confusion=m["confusion"], backtest=backtest)


@dataclass
class _Run:
    probs: list[FloatArray]
    ys: list[IntArray]
    scores: list[Scores]


def _baseline_probs(ds: Dataset, seed: int) -> dict[str, FloatArray]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    n_test = len(ds.test)
    counts = np.bincount(ds.train.y, minlength=len(CLASSES)).astype(np.float64)
    prior = counts / counts.sum()
    onehot = np.zeros(len(CLASSES))
    onehot[int(prior.argmax())] = 1.0
    # The last bar's 17 features of each sequence, already scaled with the fold's training-row scaler.
    x_fit, x_val, x_test = ds.train.x[:, -1, :], ds.val.x[:, -1, :], ds.test.x[:, -1, :]
    out = {"majority": np.tile(onehot, (n_test, 1)), "prior": np.tile(prior, (n_test, 1))}
    out["logistic_regression"] = _full_probs(
        LogisticRegression(C=LOGREG_C, max_iter=LOGREG_MAX_ITER).fit(x_fit, ds.train.y), x_test
    )
    hgb = HistGradientBoostingClassifier(random_state=seed, **HGB_SETTINGS)
    # early stopping on the fold's chronological validation part, as the LSTM's
    hgb.fit(x_fit, ds.train.y, X_val=x_val, y_val=ds.val.y)
    out["gradient_boosting"] = _full_probs(hgb, x_test)
    return out


def _full_probs(model: Any, x: npt.NDArray[np.float32]) -> FloatArray:
    """predict_proba with a column for every class, also those absent from the fold's training labels."""
    p = np.asarray(model.predict_proba(x), dtype=np.float64)
    full = np.zeros((len(x), len(CLASSES)))
    full[:, np.asarray(model.classes_, dtype=np.int64)] = p
    return full


def _lstm_probs(ds: Dataset, cfg: TrainConfig) -> tuple[FloatArray, float, int]:
    import keras

    from services.trainer import model as m
    from services.trainer.evaluation import calibrate, fit_temperature

    keras.backend.clear_session()  # each fold retrains from scratch; frees the previous fold's graph
    net = m.build_model(cfg)
    summary = m.fit(net, ds, cfg)
    temperature, _, _ = fit_temperature(m.predict(net, ds.val.x), ds.val.y)
    return calibrate(m.predict(net, ds.test.x), temperature), temperature, int(summary["epochs_run"])


_LABEL_FIELDS = ("sequence_length", "horizon", "dead_band_atr")


def walk_forward(
    bars: OHLCV,
    base: Timeframe,
    target: Timeframe,
    symbol: str,
    cfg: TrainConfig,
    *,
    folds: int = 5,
    compare_cfg: TrainConfig | None = None,
    shuffle_labels_seed: int | None = None,
    backtest: BacktestParams | None = None,
    on_fold: Callable[[int, int], None] | None = None,
    lstm: bool = True,
) -> ValidationReport:
    """Walk-forward validation of `cfg`'s LSTM against the baselines (and `compare_cfg`'s model) on the
    same folds. `shuffle_labels_seed` permutes each fold's training and validation labels (a leakage
    control: every model must then score at chance). `on_fold(done, total)` is called after each fold.
    `lstm=False` runs the baselines only. Raises NotEnoughBars naming the bars K folds need."""
    t_start = time.perf_counter()
    if not MIN_FOLDS <= folds <= MAX_FOLDS:
        raise ValidationFailed(f"folds must be {MIN_FOLDS}..{MAX_FOLDS}, got {folds}")
    if compare_cfg is not None:
        differ = [f for f in _LABEL_FIELDS if getattr(compare_cfg, f) != getattr(cfg, f)]
        if differ:
            raise ValidationFailed(
                "the production model must be compared on the same sequences and labels, but its "
                + ", ".join(f"{f} {getattr(compare_cfg, f)} != {getattr(cfg, f)}" for f in differ)
                + "; validate a candidate with the production model's sequence_length, horizon and dead_band_atr"
            )
    params = backtest if backtest is not None else default_backtest_params()
    series = series_rows(bars, base, target, symbol, cfg)
    n_bars = len(series.bars)
    need = min_bars_for_folds(cfg, folds)
    if n_bars < need:
        raise NotEnoughBars(
            f"need at least {need} bars for {folds} folds of {target.value} (min_sequences {cfg.min_sequences}, "
            f"{MIN_TEST_SEQUENCES} test sequences per fold), have {n_bars}{series.source} for {symbol}"
        )
    try:
        plan = plan_folds(
            len(series.ends),
            folds,
            cfg.purge_gap,
            val_fraction=cfg.val_fraction,
            min_train=cfg.min_sequences,
            min_test=MIN_TEST_SEQUENCES,
        )
    except ValueError as exc:  # rows lost to non-finite features: fewer sequences than the bars promise
        raise NotEnoughBars(
            f"need at least {need} bars with finite features for {folds} folds of {target.value}, have "
            f"{n_bars}{series.source} for {symbol}: {exc}"
        ) from exc
    atr_pct = _atr_pct(series)

    names: list[tuple[str, ModelKind]] = []
    if lstm:
        names.append((CANDIDATE, "candidate"))
        if compare_cfg is not None:
            names.append((PRODUCTION, "production"))
    names += [(b, "baseline") for b in BASELINES]
    runs = {name: _Run([], [], []) for name, _ in names}
    infos: list[FoldInfo] = []
    for fp in plan:
        t0 = time.perf_counter()
        seconds: dict[str, float] = {}
        fit_seq, val_seq, test_seq = fp.seq("fit"), fp.seq("val"), fp.seq("test")
        train_y = val_y = None
        if shuffle_labels_seed is not None:
            rng = np.random.default_rng([shuffle_labels_seed, fp.fold])
            train_y = rng.permutation(series.y_all[series.bar_of(fit_seq)])
            val_y = rng.permutation(series.y_all[series.bar_of(val_seq)])
        ds = make_dataset(series, fit_seq, val_seq, test_seq, cfg, train_y=train_y, val_y=val_y)
        seconds["dataset"] = time.perf_counter() - t0
        probs: dict[str, FloatArray] = {}
        info = FoldInfo(
            fold=fp.fold, fit=_span(series, fit_seq), val=_span(series, val_seq), test=_span(series, test_seq)
        )
        if lstm:
            t = time.perf_counter()
            probs[CANDIDATE], info.temperature, info.epochs_run = _lstm_probs(ds, cfg)
            seconds["lstm"] = time.perf_counter() - t
            if compare_cfg is not None:
                t = time.perf_counter()
                probs[PRODUCTION], info.production_temperature, _ = _lstm_probs(ds, compare_cfg)
                seconds["production"] = time.perf_counter() - t
        t = time.perf_counter()
        probs.update(_baseline_probs(ds, cfg.seed))
        seconds["baselines"] = time.perf_counter() - t
        t = time.perf_counter()
        for name, _ in names:
            run = runs[name]
            run.probs.append(probs[name])
            run.ys.append(ds.test.y)
            bt, _ = _backtest(series, atr_pct, test_seq, probs[name], params)
            run.scores.append(_scores(probs[name], ds.test.y, bt, hard=name == "majority"))
        seconds["backtests"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        info.seconds = seconds
        infos.append(info)
        if on_fold is not None:
            on_fold(fp.fold + 1, folds)

    from services.trainer.backtest import downsample_indices

    all_test = np.arange(plan[0].test[0], plan[-1].test[1], dtype=np.int64)
    models: dict[str, ModelScores] = {}
    for name, kind in names:
        run = runs[name]
        pooled_probs, pooled_y = np.concatenate(run.probs), np.concatenate(run.ys)
        bt, result = _backtest(series, atr_pct, all_test, pooled_probs, params)
        pooled = _scores(pooled_probs, pooled_y, bt, hard=name == "majority")
        idx = downsample_indices(result.equity, result.drawdown, EQUITY_POINTS)
        pooled.equity = {
            "ts": result.ts[idx].astype(float).tolist(),
            "equity": result.equity[idx].tolist(),
            "drawdown": result.drawdown[idx].tolist(),
        }
        models[name] = ModelScores(name=name, label=LABELS_OF[name], kind=kind, folds=run.scores, pooled=pooled)
    first_row = series.ends[plan[0].fit[0]] - cfg.sequence_length + 1
    last_bar = int(series.bar_of(all_test[-1:])[0]) + cfg.horizon
    return ValidationReport(
        symbol=symbol,
        timeframe=target.value,
        base_timeframe=base.value,
        bars=n_bars,
        data_start=_iso(int(series.bars.ts[series.rows_idx[first_row]])),
        data_end=_iso(int(series.bars.ts[last_bar])),
        n_folds=folds,
        purge_gap=cfg.purge_gap,
        usable_sequences=len(series.ends),
        folds=infos,
        config=cfg.model_dump(mode="json"),
        compare_config=compare_cfg.model_dump(mode="json") if compare_cfg is not None else None,
        seeds={
            "lstm": cfg.seed if lstm else None,
            "production": compare_cfg.seed if lstm and compare_cfg is not None else None,
            "baselines": cfg.seed,
            "shuffle_labels": shuffle_labels_seed,
        },
        shuffled_labels=shuffle_labels_seed is not None,
        backtest_params=params.model_dump(mode="json"),
        models=models,
        comparisons=compare_all(models),
        business_targets=business_targets(models[CANDIDATE].pooled) if CANDIDATE in models else [],
        seconds=time.perf_counter() - t_start,
    )


def _atr_pct(series: SeriesRows) -> FloatArray:
    """ATR(14)/close of every bar (NaN where no finite feature row exists)."""
    out = np.full(len(series.bars), np.nan)
    out[series.rows_idx] = series.values[:, ATR_PCT]
    return out
