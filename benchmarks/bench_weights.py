"""Indicator weights and explanations: optimize_weights for one default-size model, explain_window per prediction.

    .venv/bin/python -m benchmarks.bench_weights            # 5,000 D1 bars, LSTM 64+32, seq 20, 10 epochs max
    .venv/bin/python -m benchmarks.bench_weights --quick    # 2,500 bars, 2 epochs, 50 background, 50 explained

Data: `tests.trainer.planted.planted_bars` (one feature, mfi_14, sets the next bar's direction), so the
timings come with a check that the weights find it. In-process on arrays: dataset build and training are
timed but are not the subject; `optimize_weights` (shap.GradientExplainer over `explained` validation
sequences x 3 classes, correlation, vote hit rates, the combination rule) and `explain_window` (cold: the
first call builds the explainer and traces the class's gradient; warm: later calls) are. Prints a
Markdown section to stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(
    bars: int = 5_000, epochs: int = 10, background: int = 100, explained: int = 200, windows: int = 10
) -> list[str]:
    """Run the benchmark and return its Markdown lines."""
    import numpy as np

    from services.trainer.dataset import build_dataset
    from services.trainer.explain import SHAP_NSAMPLES, explain_window
    from services.trainer.hyperparameters import TrainConfig
    from services.trainer.model import build_model, fit, predict
    from services.trainer.weights import optimize_weights
    from shared.features import FEATURE_NAMES
    from shared.timeframes import Timeframe
    from tests.trainer.planted import PLANTED_FEATURE, planted_bars

    cfg = TrainConfig(epochs=epochs)
    t0 = time.perf_counter()
    ds = build_dataset(planted_bars(bars), Timeframe.D1, Timeframe.D1, "BENCH", cfg)
    model = build_model(cfg)
    summary = fit(model, ds, cfg)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = optimize_weights(model, ds, background=background, explained=explained, seed=0)
    weights_s = time.perf_counter() - t0
    ranked = sorted(result.weights, key=lambda k: -result.weights[k])
    by_importance = sorted(result.importances, key=lambda k: -result.importances[k])

    # Not optimize_weights' background: its explainer is cached, and the first call here must build its own.
    bg = ds.train.x[-background:]
    xs = ds.val.x[:windows]
    raw = xs.astype(np.float64) * ds.scaler_scale + ds.scaler_mean
    # One class for every window: the first call for a class traces its gradient, later ones reuse it.
    cls = int(np.bincount(predict(model, xs).argmax(axis=1), minlength=3).argmax())
    names = list(FEATURE_NAMES)
    times = []
    for x, r in zip(xs, raw, strict=True):
        t0 = time.perf_counter()
        explain_window(model, bg, x, r, names, cls, top=10)
        times.append(time.perf_counter() - t0)
    cold, warm = times[0], times[1:]

    top3 = ", ".join(f"{k} {result.weights[k]:.3f}" for k in ranked[:3])
    lines = [
        f"## Indicator weights and explanations ({bars:,} planted D1 bars)",
        "",
        f"Model: LSTM {list(cfg.lstm_units)}, sequence {cfg.sequence_length}, trained in {train_s:.1f} s "
        f"({summary['epochs_run']} epochs, max {cfg.epochs}; not part of the figures below). "
        f"SHAP: shap.GradientExplainer, {SHAP_NSAMPLES} expected-gradient samples per explained sequence and class, "
        f"{result.inputs['background_sequences']} background training sequences.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| optimize_weights, {result.inputs['explained_sequences']} validation sequences x 3 classes | "
        f"{weights_s:.1f} s |",
        f"| per explained sequence | {weights_s / result.inputs['explained_sequences'] * 1e3:.0f} ms |",
        f"| explain_window, first call (builds the explainer, traces the class's gradient) | {cold * 1e3:.0f} ms |",
    ]
    if warm:
        lines.append(
            f"| explain_window, later calls (median of {len(warm)}) | {statistics.median(warm) * 1e3:.0f} ms |"
        )
    lines += [
        "",
        f"Planted feature {PLANTED_FEATURE}: rank {ranked.index(PLANTED_FEATURE) + 1} by weight, "
        f"rank {by_importance.index(PLANTED_FEATURE) + 1} by SHAP importance (of 17). Top weights: {top3}. "
        f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,500 bars, 2 epochs, 50 background, 50 explained")
    parser.add_argument("--bars", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        lines = run(args.bars or 2_500, args.epochs or 2, background=50, explained=50, windows=5)
    else:
        lines = run(args.bars or 5_000, args.epochs or 10)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
