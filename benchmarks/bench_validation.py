"""Walk-forward validation benchmark: K folds of the LSTM and the four baselines on one series.

    .venv/bin/python -m benchmarks.bench_validation              # 60,000 H1 bars, 5 folds, epochs capped at 10
    .venv/bin/python -m benchmarks.bench_validation --quick      # 8,000 bars, 3 folds, 2 epochs

Data: `tests.data.generate_bars` (seeded geometric random walk, H1): nothing to learn, so the quality
figures only show that every model lands at chance. The default LSTM config (64+32, batch 256,
patience 5) with max epochs capped (default 10, production 30) keeps the run under 10 minutes on the
2-core dev machine. In-process on arrays: features, labels, per-fold datasets, LSTM fit + calibration,
logistic regression, gradient boosting, the prior and majority baselines, and a backtest per model and fold
plus the pooled ones. Prints a Markdown section to stdout.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(bars: int = 60_000, folds: int = 5, epochs: int = 10) -> list[str]:
    """Run the benchmark and return its Markdown lines."""
    from services.trainer.hyperparameters import TrainConfig
    from services.trainer.validation import walk_forward
    from shared.timeframes import Timeframe
    from tests.data import generate_bars

    cfg = TrainConfig(epochs=epochs)
    series = generate_bars("H1", bars, seed=42)
    t0 = time.perf_counter()
    report = walk_forward(series, Timeframe.H1, Timeframe.H1, "BENCH", cfg, folds=folds)
    wall = time.perf_counter() - t0
    lines = [
        f"## Walk-forward validation benchmark ({bars:,} synthetic H1 bars, {folds} folds)",
        "",
        f"Config: LSTM {list(cfg.lstm_units)}, batch {cfg.batch_size}, max epochs {cfg.epochs} (capped; production "
        f"default 30), patience {cfg.patience}; baselines majority, prior, logistic regression, gradient boosting; "
        f"backtests with risk sizing and {report.backtest_params['cost_bps']:g} bps round trip. "
        "Data: tests.data.generate_bars (seeded random walk).",
        "",
        "| fold | fit / val / test sequences | LSTM epochs | LSTM s | baselines s | backtests s | fold total s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in report.folds:
        s = f.seconds
        lines.append(
            f"| {f.fold} | {f.fit.sequences:,} / {f.val.sequences:,} / {f.test.sequences:,} | {f.epochs_run} | "
            f"{s.get('lstm', 0):.1f} | {s['baselines']:.1f} | {s['backtests']:.1f} | {s['total']:.1f} |"
        )
    lstm = report.models["lstm"].pooled.metrics
    best = min(
        (m for m in report.models.values() if m.kind == "baseline" and m.pooled.metrics.get("log_loss") is not None),
        key=lambda m: float(m.pooled.metrics["log_loss"] or 0.0),
    )
    lines += [
        "",
        f"Whole walk-forward: {wall:.1f} s ({wall / 60:.1f} min), of which folds "
        f"{sum(f.seconds['total'] for f in report.folds):.1f} s. Pooled out-of-sample: LSTM balanced accuracy "
        f"{lstm['balanced_accuracy']:.3f}, log-loss {lstm['log_loss']:.4f}; best baseline {best.label} "
        f"log-loss {best.pooled.metrics['log_loss']:.4f} (a random walk: all at chance, as they should be).",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8,000 bars, 3 folds, 2 epochs")
    parser.add_argument("--bars", type=int, default=None)
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="max LSTM epochs (default 10, quick 2)")
    args = parser.parse_args()
    bars = args.bars or (8_000 if args.quick else 60_000)
    folds = args.folds or (3 if args.quick else 5)
    epochs = args.epochs or (2 if args.quick else 10)
    print("\n".join(run(bars, folds, epochs)))


if __name__ == "__main__":
    main()
