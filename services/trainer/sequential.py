"""The automatic decision's statistics: an always-valid two-sided test on the mean paired log-loss difference
between a candidate and the production model (docs/LIFECYCLE.md, "Automatic promotion and rollback").

Pure numpy, no I/O: services/trainer/judge.py reads the pairs, this module decides.

The test. d_i = logloss(candidate, bar i) - logloss(production, bar i) on the bars both scored, probabilities
clipped to [1e-6, 1]. With S_n = sum d_i and V_n = n * sigma^2, H0 (mean d = 0) is rejected at the first n with

    |S_n| >= sqrt((V_n + rho) * ln((V_n + rho) / (rho * alpha^2)))

Robbins' two-sided normal mixture: M_n = sqrt(rho / (V_n + rho)) * exp(S_n^2 / (2 (V_n + rho))) is a
nonnegative (super)martingale with M_0 = 1 for sigma^2-sub-Gaussian increments, so by Ville's inequality it
ever reaches 1/alpha (the boundary above) with probability <= alpha: the test may be looked at after every
pair, every run, for ever, at no cost in errors (Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2), eq. (14), the two-sided normal
mixture boundary). Dividing the boundary by n gives the confidence sequence for the mean: mean +- boundary / n.

sigma^2 is the running sample variance of the d_i seen so far, floored at SD_FLOOR^2. Plugging in the estimate
makes this the asymptotic confidence sequence of Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas 2024
("Time-uniform central limit theory and asymptotic confidence sequences", Ann. Statist. 52(6); arXiv
2103.06476, Robbins' normal mixture AsympCS, mean +- sd * sqrt(2 (n rho2 + 1) / (n^2 rho2) * ln(sqrt(n rho2 + 1)
/ alpha)), identical to the boundary above with rho = sd^2 / rho2). Its guarantee is asymptotic, so the error rate
is measured, not assumed: tests/trainer/test_sequential.py runs 2,000 A/A streams with heavy-tailed d and
checks the false-decision rate. A bound from clipping alone (d in [-13.8, 13.8], sigma^2 <= 190) would be exact
but needs tens of thousands of bars to detect anything a model change plausibly does; min_pairs (100 by
default) keeps the plug-in variance from being judged on a handful of bars.

rho is chosen before any data: the boundary is tightest at n = PLANNED_PAIRS settled pairs, with
rho = sigma^2 * n_opt / (2 ln(1/alpha) + ln(1 + 2 ln(1/alpha))) (the approximate minimiser of the boundary at
n_opt; Waudby-Smith et al. 2024, best rho2 for a time t_opt, as in their package: `best_rho2_approx(t_opt,
alpha) = (2 log(1/alpha) + log(1 + 2 log(1/alpha))) / t_opt`; tests check it against a numerical minimiser).

A second rule guards against a candidate that is plainly wrong: its wrong-way rate (BUY or SELL calls the
market then moved against) is rolled back when the lower end of that rate's confidence sequence (the same
mixture boundary with the exact Bernoulli variance bound 1/4, so valid at every look) exceeds max_error_rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Decision = Literal["promote", "rollback", "continue", "insufficient"]
DECISIONS: tuple[Decision, ...] = ("continue", "promote", "rollback", "insufficient")  # index = code
CONTINUE, PROMOTE, ROLLBACK, INSUFFICIENT = range(4)

# Probabilities are clipped to [PROB_FLOOR, 1] before the log: one confident miss costs at most ln(1e6) = 13.8
# nats, not infinity.
PROB_FLOOR = 1e-6
# The settled pairs at which the boundary is tightest. 500: about two years of D1 bars, three weeks of H1; an
# improvement that needs far more bars than this to show is not one the canary is meant to find. Fixed here,
# before any data, never tuned on outcomes.
PLANNED_PAIRS = 500
# Floor of the plug-in standard deviation of d (nats per bar): two models that differ by less than this on
# every bar differ by float32 rounding of the stored probabilities, not by skill; without a floor a constant
# tiny d would have zero variance and cross at once.
SD_FLOOR = 1e-3
# A {0, 1} variable is sub-Gaussian with variance proxy 1/4 (Hoeffding): the wrong-way rate's boundary is exact.
BERNOULLI_VARIANCE_BOUND = 0.25

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class SequentialParams:
    alpha: float
    min_pairs: int
    max_error_rate: float
    planned_pairs: int = PLANNED_PAIRS

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_pairs < 2:
            raise ValueError(f"min_pairs must be >= 2 (a variance needs two pairs), got {self.min_pairs}")
        if not 0 < self.max_error_rate <= 1:
            raise ValueError(f"max_error_rate must be in (0, 1], got {self.max_error_rate}")
        if self.planned_pairs < 1:
            raise ValueError(f"planned_pairs must be >= 1, got {self.planned_pairs}")


def unit_rho(planned: float, alpha: float) -> float:
    """rho per unit variance (rho / sigma^2) that makes the boundary tightest at `planned` observations."""
    two_log = 2.0 * math.log(1.0 / alpha)
    return planned / (two_log + math.log1p(two_log))


def unit_boundary(n: ArrayLike, rho: float, alpha: float) -> FloatArray:
    """The mixture boundary for unit variance: sqrt((n + rho) ln((n + rho) / (rho alpha^2))); times sigma
    gives the boundary for S_n (V_n = n sigma^2 and rho scaled by sigma^2 alike)."""
    v = np.asarray(n, dtype=np.float64) + rho
    result: FloatArray = np.sqrt(v * np.log(v / (rho * alpha * alpha)))
    return result


def log_loss(probabilities: ArrayLike, labels: ArrayLike) -> FloatArray:
    """Per-row log loss -ln p[label], probabilities clipped to [PROB_FLOOR, 1]."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    picked = np.take_along_axis(p, y[..., None], axis=-1)[..., 0]
    result: FloatArray = -np.log(np.clip(picked, PROB_FLOOR, 1.0))
    return result


def decide_many(
    n: ArrayLike,
    sum_d: ArrayLike,
    sum_d2: ArrayLike,
    wrong: ArrayLike,
    directional: ArrayLike,
    params: SequentialParams,
) -> dict[str, NDArray[Any]]:
    """The decision from running sums, vectorised over any shape (streams x looks in the simulations, one
    value in `evaluate`): n pairs, sum and sum of squares of d, wrong-way and directional call counts.

    Returns arrays: code (index into DECISIONS), mean, sd, boundary, lower, upper, error_rate, error_lower.
    """
    n_f = np.asarray(n, dtype=np.float64)
    s = np.asarray(sum_d, dtype=np.float64)
    s2 = np.asarray(sum_d2, dtype=np.float64)
    k = np.asarray(wrong, dtype=np.float64)
    m = np.asarray(directional, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_f > 0, s / n_f, 0.0)
        var = np.where(n_f > 1, (s2 - s * mean) / (n_f - 1.0), 0.0)
    sd = np.maximum(np.sqrt(np.maximum(var, 0.0)), SD_FLOOR)
    rho = unit_rho(params.planned_pairs, params.alpha)
    boundary = sd * unit_boundary(n_f, rho, params.alpha)
    crossed = np.abs(s) >= boundary
    half = np.where(n_f > 0, boundary / np.maximum(n_f, 1.0), np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        error_rate = np.where(m > 0, k / np.maximum(m, 1.0), 0.0)
        error_half = np.where(
            m > 0, math.sqrt(BERNOULLI_VARIANCE_BOUND) * unit_boundary(m, rho, params.alpha) / np.maximum(m, 1.0), 1.0
        )
    error_lower = error_rate - error_half
    too_wrong = (m > 0) & (error_lower > params.max_error_rate)
    code = np.full(np.broadcast_shapes(n_f.shape, s.shape, s2.shape, k.shape, m.shape), CONTINUE, dtype=np.int8)
    code = np.where(crossed & (s < 0), PROMOTE, code)
    code = np.where((crossed & (s > 0)) | too_wrong, ROLLBACK, code)  # a rollback reason wins over a promotion
    code = np.where(n_f < params.min_pairs, INSUFFICIENT, code)
    return {
        "code": code,
        "mean": mean,
        "sd": sd,
        "boundary": boundary,
        "lower": mean - half,
        "upper": mean + half,
        "error_rate": error_rate,
        "error_lower": error_lower,
    }


@dataclass(frozen=True)
class Evaluation:
    decision: Decision
    reason: str
    n: int
    mean: float
    sd: float
    sum_d: float
    boundary: float
    lower: float
    upper: float
    directional: int
    wrong: int
    error_rate: float
    error_lower: float
    alpha: float
    min_pairs: int
    max_error_rate: float
    planned_pairs: int

    def evidence(self) -> dict[str, Any]:
        """JSON-safe evidence for rollout_evaluations and the audit row (floats to 6 significant digits)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, float):
                out[key] = float(f"{value:.6g}") if math.isfinite(value) else None
            else:
                out[key] = value
        out["test"] = "normal-mixture confidence sequence on paired log-loss difference (candidate - production)"
        return out


def evaluate(d: ArrayLike, wrong: ArrayLike, directional: ArrayLike, params: SequentialParams) -> Evaluation:
    """Decide on the pairs seen so far, in bar order: d per pair, and per pair whether the candidate made a
    directional call (BUY/SELL) and whether the market moved against it."""
    d_arr = np.asarray(d, dtype=np.float64)
    w_arr = np.asarray(wrong, dtype=bool)
    c_arr = np.asarray(directional, dtype=bool)
    if not (d_arr.ndim == w_arr.ndim == c_arr.ndim == 1 and len(d_arr) == len(w_arr) == len(c_arr)):
        raise ValueError("d, wrong and directional must be one-dimensional and of equal length")
    if not np.all(np.isfinite(d_arr)):
        raise ValueError("d must be finite (clip probabilities before taking logs)")
    if np.any(w_arr & ~c_arr):
        raise ValueError("a wrong-way pair must be a directional call")
    n = len(d_arr)
    k, m = int(w_arr.sum()), int(c_arr.sum())
    r = decide_many(n, d_arr.sum(), np.square(d_arr).sum(), k, m, params)
    code = int(r["code"])
    decision = DECISIONS[code]
    mean, boundary, err_lo = float(r["mean"]), float(r["boundary"]), float(r["error_lower"])
    s = float(d_arr.sum())
    if decision == "insufficient":
        reason = f"{n} settled pairs, fewer than the {params.min_pairs} needed before any decision"
    elif decision == "rollback" and abs(s) >= boundary and s > 0:
        reason = (
            f"candidate significantly worse: mean log-loss difference {mean:+.4f} nats/bar over {n} bars, "
            f"{params.alpha:.0%} confidence sequence [{float(r['lower']):+.4f}, {float(r['upper']):+.4f}] above 0"
        )
    elif decision == "rollback":
        reason = (
            f"candidate wrong-way rate {k}/{m} = {k / m:.1%}; its confidence sequence's lower end {err_lo:.1%} "
            f"exceeds the {params.max_error_rate:.0%} limit"
        )
    elif decision == "promote":
        reason = (
            f"candidate significantly better: mean log-loss difference {mean:+.4f} nats/bar over {n} bars, "
            f"{params.alpha:.0%} confidence sequence [{float(r['lower']):+.4f}, {float(r['upper']):+.4f}] below 0"
        )
    else:
        reason = f"no significant difference yet over {n} bars (|S_n| {abs(s):.4f} < boundary {boundary:.4f})"
    return Evaluation(
        decision=decision,
        reason=reason,
        n=n,
        mean=mean,
        sd=float(r["sd"]),
        sum_d=s,
        boundary=boundary,
        lower=float(r["lower"]),
        upper=float(r["upper"]),
        directional=m,
        wrong=k,
        error_rate=float(r["error_rate"]),
        error_lower=err_lo,
        alpha=params.alpha,
        min_pairs=params.min_pairs,
        max_error_rate=params.max_error_rate,
        planned_pairs=params.planned_pairs,
    )


def first_decisions(
    d: FloatArray, wrong: NDArray[np.bool_], directional: NDArray[np.bool_], params: SequentialParams, look_every: int
) -> tuple[NDArray[np.int8], NDArray[np.int64]]:
    """Streams x pairs in bar order, looked at after every `look_every` pairs (as the periodic judge does):
    per stream the first decision other than continue/insufficient (CONTINUE if none) and the pairs it took
    (-1 if none)."""
    looks = np.arange(look_every, d.shape[1] + 1, look_every)
    idx = looks - 1
    r = decide_many(
        looks[None, :],
        np.cumsum(d, axis=1)[:, idx],
        np.cumsum(np.square(d), axis=1)[:, idx],
        np.cumsum(wrong, axis=1)[:, idx],
        np.cumsum(directional, axis=1)[:, idx],
        params,
    )
    code = r["code"]
    final = (code == PROMOTE) | (code == ROLLBACK)
    any_final = final.any(axis=1)
    first = np.argmax(final, axis=1)
    rows = np.arange(d.shape[0])
    decided = np.where(any_final, code[rows, first], CONTINUE).astype(np.int8)
    bars = np.where(any_final, looks[first], -1).astype(np.int64)
    return decided, bars
