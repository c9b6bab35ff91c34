"""Training benchmark: throughput, a full retrain of one symbol, ONNX export, model sizes.

    .venv/bin/python -m benchmarks.bench_training                 # 60,000 H1 bars, production config
    .venv/bin/python -m benchmarks.bench_training --bars 8000 --epochs 2   # a quick version
    .venv/bin/python -m benchmarks.bench_training --device-report # also list TensorFlow's devices

Data: `tests.data.generate_bars` (seeded geometric random walk, H1, realistic hourly volatility and
volume), so the model has nothing real to learn: the quality numbers only show the baseline comparison
works. The run is in-process on arrays: dataset build (the 17 shared features, labels, purged splits,
scaler) + fit + calibration + evaluation + ONNX export and check + writing the artifacts to a local
FileStore. Reading bars from PostgreSQL is not included (not measured here).
Prints a Markdown section to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bars", type=int, default=60_000, help="H1 bars of the synthetic series")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: TrainConfig's)")
    parser.add_argument("--units", type=str, default=None, help="LSTM units, e.g. 64,32 (default: TrainConfig's)")
    parser.add_argument("--device-report", action="store_true", help="print TensorFlow's physical devices")
    args = parser.parse_args()

    from services.trainer import pipeline
    from services.trainer.artifacts import publish, version_string
    from services.trainer.dataset import build_dataset
    from services.trainer.hyperparameters import TrainConfig
    from shared.model_metadata import artifact_prefix
    from shared.storage import FileStore
    from shared.timeframes import Timeframe
    from tests.data import generate_bars

    overrides: dict[str, object] = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.units:
        overrides["lstm_units"] = tuple(int(u) for u in args.units.split(","))
    cfg = TrainConfig.model_validate(overrides)

    wall0 = time.perf_counter()
    t0 = time.perf_counter()
    import tensorflow as tf

    import_s = time.perf_counter() - t0
    bars = generate_bars("H1", args.bars, seed=42)
    t0 = time.perf_counter()
    ds = build_dataset(bars, Timeframe.H1, Timeframe.H1, "BENCH", cfg)
    dataset_s = time.perf_counter() - t0
    job_id = "bench0000000000000000000000000000"
    version = version_string(job_id, __import__("datetime").datetime.now(__import__("datetime").UTC))
    trained = pipeline.train(ds, cfg, version=version, job_id=job_id)
    with tempfile.TemporaryDirectory() as d:
        store = FileStore(Path(d), f"file://{d}")
        t0 = time.perf_counter()
        publish(store, artifact_prefix("BENCH", "H1", version), trained.files, trained.metadata)
        publish_s = time.perf_counter() - t0
    wall_s = time.perf_counter() - wall0
    m = trained.metadata.metrics
    t = trained.timings

    print(f"## Training benchmark ({args.bars:,} synthetic H1 bars)\n")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}. Data: tests.data.generate_bars (seeded random walk)."
    )
    print(
        f"Config: LSTM {list(cfg.lstm_units)}, dropout {cfg.dropout}, batch {cfg.batch_size}, "
        f"max epochs {cfg.epochs}, patience {cfg.patience}, sequence {cfg.sequence_length} x 17.\n"
    )
    print("| measure | value |")
    print("| --- | --- |")
    rows = [
        ("sequences train / val / test", f"{len(ds.train):,} / {len(ds.val):,} / {len(ds.test):,}"),
        ("import tensorflow", f"{import_s:.1f} s"),
        ("dataset build (features, labels, splits, scaler)", f"{dataset_s:.2f} s"),
        ("epochs run (early stopping)", f"{m['epochs_run']} of {cfg.epochs}"),
        ("fit wall time", f"{t['fit_seconds']:.1f} s"),
        ("training throughput", f"{t['sequences_per_second']:,.0f} sequences/s (train sequences x epochs / fit time)"),
        ("ONNX export (tf2onnx, opset 17)", f"{t['onnx_export_seconds']:.2f} s"),
        ("Keras vs ONNX max abs diff (validation set)", f"{m['onnx_max_abs_diff']:.2e}"),
        ("model.keras size", f"{len(trained.files['model.keras']) / 1024:.1f} KiB"),
        ("model.onnx size", f"{len(trained.files['model.onnx']) / 1024:.1f} KiB"),
        ("upload + re-read verify (local FileStore)", f"{publish_s:.2f} s"),
        ("full retrain wall time (import to registered artifacts)", f"{wall_s:.1f} s ({wall_s / 60:.1f} min)"),
        ("test accuracy / majority baseline", f"{m['accuracy']:.3f} / {m['baseline_accuracy']:.3f}"),
        ("test log-loss / prior baseline", f"{m['log_loss']:.4f} / {m['baseline_log_loss']:.4f}"),
        ("temperature", f"{trained.metadata.calibration.temperature:.3f}"),
    ]
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.device_report:
        print("\nTensorFlow physical devices:\n")
        for dev in tf.config.list_physical_devices():
            print(f"- {dev.device_type}: {dev.name}")


if __name__ == "__main__":
    main()
