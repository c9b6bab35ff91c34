"""Training throughput of the production model on whatever Keras backend and device is at hand.

The trainer's model is plain Keras 3 (services/trainer/model.py), so the same `build_model` runs on
TensorFlow (CPU, this project's default), JAX or PyTorch (a GPU machine). Run here and on a GPU machine:

    KERAS_BACKEND=tensorflow python -m benchmarks.gpu_training --bars 60000 --epochs 3
    KERAS_BACKEND=jax        python -m benchmarks.gpu_training --bars 60000 --epochs 3

Data: tests.data.generate_bars (seeded H1 random walk) through the shared features and the trainer's dataset
code. Measures fit throughput after one warm-up epoch (compilation), with a fixed epoch count (no early
stopping), and batched inference throughput. Prints one Markdown table row and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def device_name(backend: str) -> str:
    try:
        if backend == "jax":
            import jax

            d = jax.devices()[0]
            return f"{d.platform}:{getattr(d, 'device_kind', d)}"
        if backend == "torch":
            import torch

            return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return f"gpu:{gpus[0].name}" if gpus else f"cpu ({os.cpu_count()} cores)"
    except Exception as exc:  # report, don't fail, a device query
        return f"unknown ({type(exc).__name__})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bars", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()

    import keras

    from services.trainer.dataset import build_dataset
    from services.trainer.hyperparameters import TrainConfig
    from services.trainer.model import build_model
    from shared.timeframes import Timeframe
    from tests.data import generate_bars

    backend = keras.backend.backend()
    overrides: dict[str, object] = {}
    if args.batch:
        overrides["batch_size"] = args.batch
    cfg = TrainConfig.model_validate(overrides)
    t0 = time.perf_counter()
    ds = build_dataset(generate_bars("H1", args.bars, seed=42), Timeframe.H1, Timeframe.H1, "BENCH", cfg)
    dataset_s = time.perf_counter() - t0
    model = build_model(cfg)
    n = len(ds.train.x)
    t0 = time.perf_counter()
    model.fit(ds.train.x, ds.train.y, epochs=1, batch_size=cfg.batch_size, verbose=0)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.fit(ds.train.x, ds.train.y, epochs=args.epochs, batch_size=cfg.batch_size, verbose=0)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.predict(ds.val.x, batch_size=1024, verbose=0)
    infer_s = time.perf_counter() - t0
    result = {
        "backend": backend,
        "device": device_name(backend),
        "keras": keras.__version__,
        "python": platform.python_version(),
        "train_sequences": n,
        "batch_size": cfg.batch_size,
        "lstm_units": list(cfg.lstm_units),
        "dataset_s": round(dataset_s, 2),
        "first_epoch_s": round(warm_s, 2),
        "train_seq_per_s": round(n * args.epochs / fit_s),
        "epoch_s": round(fit_s / args.epochs, 2),
        "infer_seq_per_s": round(len(ds.val.x) / infer_s),
    }
    print(
        f"| {result['backend']} | {result['device']} | {n:,} | {cfg.batch_size} | {result['first_epoch_s']} s | "
        f"{result['epoch_s']} s | {result['train_seq_per_s']:,} | {result['infer_seq_per_s']:,} |"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
