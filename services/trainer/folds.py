"""The walk-forward fold plan and the bars it needs: pure arithmetic, cheap to import (the API checks a
validation request against it before queueing; services.trainer.validation runs the folds).

Expanding window: K equal test blocks at the end of the series' usable sequences; fold i trains on
everything before its test block minus a purge gap (docs/MODEL_QUALITY_METHOD.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from services.trainer.hyperparameters import MIN_SPLIT_SEQUENCES, TrainConfig
from shared.errors import ValidationFailed
from shared.warmup import WARMUP_BARS

IntArray = npt.NDArray[np.int64]

# Fewest test sequences per fold: at 100 a fold's accuracy has a standard error of at most 0.05 (p = 0.5),
# small enough that the per-fold differences of the paired test are not pure noise.
MIN_TEST_SEQUENCES = 100
# Fewest and most folds: the paired t-test needs at least 2; more than 20 leaves tiny early windows.
MIN_FOLDS, MAX_FOLDS = 2, 20

# --- the fold plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldPlan:
    """Half-open ranges [start, stop) of positions in the series' usable sequences (time order)."""

    fold: int
    fit: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]

    def seq(self, part: Literal["fit", "val", "test"]) -> IntArray:
        start, stop = getattr(self, part)
        return np.arange(start, stop, dtype=np.int64)


def _block(n_sequences: int, k: int) -> int:
    return n_sequences // (k + 1)


def _window_sizes(block: int, gap: int, val_fraction: float) -> tuple[int, int]:
    """(fit, val) of a training window of `block` sequences before its test block's purge gap: the
    smallest window any fold has, whatever the remainder of n_sequences / (k + 1)."""
    inner = block - 2 * gap
    n_val = int(max(inner, 0) * val_fraction)
    return inner - n_val, n_val


def plan_folds(
    n_sequences: int, k: int, gap: int, *, val_fraction: float, min_train: int, min_test: int
) -> list[FoldPlan]:
    """Expanding-window walk-forward folds over `n_sequences` usable sequences.

    The last k * b sequences (b = n_sequences // (k + 1)) form k equal, adjacent test blocks; the first
    window also keeps the remainder. Fold i trains on every sequence before its test block except the
    last `gap` ones (purge: no training label reads a bar a test input reads); of that window the last
    int(val_fraction * (window - gap)) sequences, after another `gap`, are the validation part. The sizes
    are checked on the smallest possible first window (b sequences), so having more sequences never makes a
    plan fail: fit + validation >= min_train, each >= MIN_SPLIT_SEQUENCES, a test block >= min_test.
    Raises ValueError saying which size is short.
    """
    if not MIN_FOLDS <= k <= MAX_FOLDS:
        raise ValueError(f"folds must be {MIN_FOLDS}..{MAX_FOLDS}, got {k}")
    if gap < 0 or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"need gap >= 0 and 0 < val_fraction < 1, got gap {gap}, val_fraction {val_fraction}")
    b = _block(n_sequences, k)
    fit, val = _window_sizes(b, gap, val_fraction)
    problems = []
    if b < min_test:
        problems.append(f"test blocks of {b} sequences (need {min_test})")
    if fit + val < min_train:
        problems.append(f"a first training window of {max(fit + val, 0)} sequences (need {min_train})")
    if min(fit, val) < MIN_SPLIT_SEQUENCES:
        problems.append(
            f"fit / validation parts of {max(fit, 0)} / {max(val, 0)} sequences (need {MIN_SPLIT_SEQUENCES} each)"
        )
    if problems:
        raise ValueError(
            f"{n_sequences} usable sequences in {k} folds (purge gap {gap}) give " + " and ".join(problems)
        )
    plans = []
    for i in range(k):
        test_start = n_sequences - (k - i) * b
        window = test_start - gap
        n_val = int((window - gap) * val_fraction)
        plans.append(
            FoldPlan(
                fold=i,
                fit=(0, window - gap - n_val),
                val=(window - n_val, window),
                test=(test_start, test_start + b),
            )
        )
    return plans


def _min_sequences_for_folds(cfg: TrainConfig, k: int) -> int:
    gap = cfg.purge_gap
    b = max(MIN_TEST_SEQUENCES, cfg.min_sequences + 2 * gap)
    while True:  # at most a few hundred steps: val grows by val_fraction per step
        fit, val = _window_sizes(b, gap, cfg.val_fraction)
        if fit + val >= cfg.min_sequences and min(fit, val) >= MIN_SPLIT_SEQUENCES:
            return (k + 1) * b
        b += 1


def min_bars_for_folds(cfg: TrainConfig, k: int) -> int:
    """Completed bars of the model's timeframe that `k` walk-forward folds need (no row lost to a non-finite
    feature): warm-up, one sequence, the label horizon, and (k + 1) blocks big enough for plan_folds."""
    if not MIN_FOLDS <= k <= MAX_FOLDS:
        raise ValidationFailed(f"folds must be {MIN_FOLDS}..{MAX_FOLDS}, got {k}")
    return WARMUP_BARS + cfg.sequence_length - 1 + cfg.horizon + _min_sequences_for_folds(cfg, k)
