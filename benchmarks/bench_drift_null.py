"""False-flag rate and detection delay of the drift check's thresholds on driftless / shifted random walks.

Usage: .venv/bin/python -m benchmarks.bench_drift_null [--seeds 6 7 8] [--quantile 0.99999]   (about 90 s)
For each window class: the trainer's reference and null thresholds from the first N feature rows of a seeded
random walk (tests/predictor/test_drift.synthetic_bars), then live windows sliding hourly over the next 300,000
rows of the same generator: share of checks and of days with any feature flagged, fixed (PSI 0.25 / KS 0.3) vs
calibrated. Detection: a walk whose volatility is multiplied from one bar on; shifted bars the window must hold
before the check flags it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import numpy.typing as npt

from services.trainer.dataset import reference_distribution
from shared.drift import bins_of, calibrated, effective_thresholds, ks_rows, psi_rows
from shared.features import feature_rows
from shared.model_metadata import ReferenceDistribution
from shared.timeframes import Timeframe
from shared.warmup import WARMUP_BARS
from tests.predictor.test_drift import synthetic_bars

Array = npt.NDArray[np.float64]

# name, window bars, bars per hourly check, distinct checks per day, training rows
CASES = [
    ("M1", 1440, 60, 24, 50000),
    ("M1 small", 1440, 60, 24, 10000),
    ("M5", 288, 12, 24, 20000),
    ("M15", 96, 4, 24, 10000),
    ("M30", 50, 2, 24, 10000),
    ("H1", 50, 1, 24, 5000),
    ("H4", 50, 1, 6, 3000),
    ("D1", 50, 1, 1, 3000),
    ("M30 min_bars=100", 100, 2, 24, 10000),
    ("H1 min_bars=100", 100, 1, 24, 5000),
    ("H4 min_bars=100", 100, 1, 6, 3000),
    ("D1 min_bars=100", 100, 1, 1, 3000),
]


def refs(train: Array, w: int, q: float) -> list[ReferenceDistribution]:
    return [calibrated(reference_distribution(train[:, i], 10), train[:, i], w, q) for i in range(train.shape[1])]


def stats_of(
    rows: Array, rf: list[ReferenceDistribution], w: int, starts: npt.NDArray[np.int64]
) -> tuple[Array, Array]:
    p = np.zeros((len(starts), len(rf)))
    k = np.zeros_like(p)
    for i, r in enumerate(rf):
        b = bins_of(r, rows[:, i])
        c = np.zeros((len(b) + 1, len(r.shares)))
        c[np.arange(1, len(b) + 1), b] = 1
        np.cumsum(c, axis=0, out=c)
        live = (c[starts + w] - c[starts]) / w
        p[:, i] = psi_rows(live, np.asarray(r.shares))
        k[:, i] = ks_rows(live, np.asarray(r.shares))
    return p, k


def thresholds(rf: list[ReferenceDistribution], w: int) -> tuple[Array, Array]:
    t = np.array([effective_thresholds(r, w, 0.25, 0.3) for r in rf])
    return t[:, 0], t[:, 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[6, 7, 8])
    ap.add_argument("--quantile", type=float, default=0.99999)
    a = ap.parse_args()
    walks = [feature_rows(synthetic_bars(Timeframe.M1, 400_000, 1_800_000_000, seed=100 + s)).values for s in a.seeds]
    start = 60_000 - WARMUP_BARS  # first shifted feature row
    shifted = {}
    for f in (1.5, 2.0, 3.0):
        vol = np.ones(70_000)
        vol[60_000:] = f
        shifted[f] = feature_rows(synthetic_bars(Timeframe.M1, 70_000, 1_800_000_000, seed=7, vol=vol)).values
    for name, w, step, per_day, n in CASES:
        acc = {"fixed": [0, 0, 0, 0], "calibrated": [0, 0, 0, 0]}
        cost = 0.0
        for x in walks:
            t0 = time.perf_counter()
            rf = refs(x[:n], w, a.quantile)
            cost += time.perf_counter() - t0
            live = x[n : n + 300_000]
            st = np.arange(0, len(live) - w + 1, step)
            p, k = stats_of(live, rf, w, st)
            days = len(st) // per_day
            for label, (tp, tk) in (("fixed", (0.25, 0.3)), ("calibrated", thresholds(rf, w))):
                flag: npt.NDArray[np.bool_] = np.asarray(((p > tp) | (k > tk)).any(1))
                day = flag[: days * per_day].reshape(days, per_day).any(1)
                r = acc[label]
                r[0] += int(flag.sum())
                r[1] += len(flag)
                r[2] += int(day.sum())
                r[3] += days
        det: dict[float, int | None] = {}
        for f, x in shifted.items():
            rf = refs(x[start - n : start], w, a.quantile)
            tp, tk = thresholds(rf, w)
            kk = np.arange(1, w + 1)
            p, k = stats_of(x, rf, w, start + kk - w)
            hit = ((p > tp) | (k > tk)).any(1)
            det[f] = int(kk[np.argmax(hit)]) if hit.any() else None
        fx, cl = acc["fixed"], acc["calibrated"]
        print(
            f"{name:17s} window {w:5d} train {n:6d} calibration {cost / len(walks) * 1000:4.0f} ms | "
            f"fixed: checks {fx[0] / fx[1]:.4f} days {fx[2] / fx[3]:.4f} | "
            f"calibrated: checks {cl[0] / cl[1]:.5f} days {cl[2]}/{cl[3]} = {cl[2] / cl[3]:.4f} | "
            f"shifted bars to flag x1.5/x2/x3: {det[1.5]}/{det[2.0]}/{det[3.0]}"
        )


if __name__ == "__main__":
    main()
