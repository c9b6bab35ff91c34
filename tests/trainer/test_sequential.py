"""The sequential test's error rates, measured: A/A streams (no true difference, heavy-tailed d) looked at after
every 10 pairs must decide falsely at most alpha of the time; planted better/worse candidates must be decided
the right way within a stated number of settled bars (docs/LIFECYCLE.md quotes these figures).

Simulated bars: each bar has true class probabilities q (Dirichlet(2, 2, 2)); its label is drawn from q. A model
of skill lam predicts lam * q + (1 - lam) * u with u its own noise drawn from a pool: 1 - w calm vectors
(Dirichlet(20, 20, 20), near uniform) and w overconfident ones (Dirichlet(c, c, c), probabilities down to the
1e-6 clip), so d has the heavy tails of real log-loss differences. Two models of equal skill are exchangeable,
so E[d] = 0 exactly: an A/A comparison. Every seed is fixed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy.optimize import minimize_scalar
from scipy.stats import kurtosis

from services.trainer.sequential import (
    PROMOTE,
    ROLLBACK,
    SequentialParams,
    evaluate,
    first_decisions,
    log_loss,
    unit_boundary,
    unit_rho,
)

ALPHA = 0.05
PARAMS = SequentialParams(alpha=ALPHA, min_pairs=100, max_error_rate=0.6)  # the settings' defaults
STREAMS = 2000
PAIRS = 3000
LOOK_EVERY = 10
CHUNK = 500  # streams per batch: bounds memory (500 x 3000 x 3 floats per array)


def _pool(rng: np.random.Generator, wild_share: float, wild_concentration: float, size: int = 20_000) -> Any:
    q = rng.dirichlet([2.0, 2.0, 2.0], size)
    calm = rng.dirichlet([20.0, 20.0, 20.0], size)
    wild = rng.dirichlet([wild_concentration] * 3, size)
    return q, np.where(rng.random(size)[:, None] < wild_share, wild, calm)


def simulate(
    rng: np.random.Generator, pool: Any, streams: int, pairs: int, lam_candidate: float, lam_production: float
) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_]]:
    """d, wrong-way and directional flags per (stream, bar), in bar order."""
    q_pool, u_pool = pool
    shape = (streams, pairs)
    q = q_pool[rng.integers(0, len(q_pool), shape)]
    y = (rng.random(shape)[..., None] > np.cumsum(q, axis=-1)).sum(-1).clip(0, 2)  # 0 SELL, 1 HOLD, 2 BUY
    p_c = lam_candidate * q + (1 - lam_candidate) * u_pool[rng.integers(0, len(u_pool), shape)]
    p_p = lam_production * q + (1 - lam_production) * u_pool[rng.integers(0, len(u_pool), shape)]
    d = log_loss(p_c, y) - log_loss(p_p, y)
    # The market's direction: down on a SELL label, up on BUY, either way inside the HOLD band.
    up = np.where(y == 2, True, np.where(y == 0, False, rng.random(shape) < 0.5))
    signal = p_c.argmax(-1)
    directional = signal != 1
    wrong = ((signal == 2) & ~up) | ((signal == 0) & up)
    return d, wrong, directional


def run_streams(seed: int, pool_args: tuple[float, float], lam_c: float, lam_p: float, streams: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pool = _pool(rng, *pool_args)
    codes, bars, ds = [], [], []
    for start in range(0, streams, CHUNK):
        d, wrong, directional = simulate(rng, pool, min(CHUNK, streams - start), PAIRS, lam_c, lam_p)
        c, b = first_decisions(d, wrong, directional, PARAMS, LOOK_EVERY)
        codes.append(c)
        bars.append(b)
        ds.append(d[:50].ravel())
    d_sample = np.concatenate(ds)
    return {
        "code": np.concatenate(codes),
        "bars": np.concatenate(bars),
        "mean_d": float(d_sample.mean()),
        "sd_d": float(d_sample.std()),
        "excess_kurtosis": float(kurtosis(d_sample)),
        "max_abs_d": float(np.abs(d_sample).max()),
    }


# (wild share, wild concentration, skill of both models): moderate tails with skilled models; heavy and
# extreme tails with uninformative ones.
AA_REGIMES = {
    "moderate": ((0.2, 0.3), 0.3),
    "heavy": ((0.05, 0.05), 0.0),
    "extreme": ((0.01, 0.05), 0.0),
}


@pytest.mark.parametrize("regime", list(AA_REGIMES))
def test_aa_false_decision_rate_is_at_most_alpha(regime: str) -> None:
    pool_args, lam = AA_REGIMES[regime]
    r = run_streams(20261201, pool_args, lam, lam, STREAMS)
    false = int(np.isin(r["code"], (PROMOTE, ROLLBACK)).sum())
    rate = false / STREAMS
    promotes, rollbacks = int((r["code"] == PROMOTE).sum()), int((r["code"] == ROLLBACK).sum())
    print(
        f"\nA/A {regime}: {STREAMS} streams x {PAIRS} pairs, looked at every {LOOK_EVERY}: false decisions "
        f"{false} ({rate:.2%}: {promotes} promote, {rollbacks} rollback); d sd {r['sd_d']:.3f}, excess kurtosis "
        f"{r['excess_kurtosis']:.1f}, max |d| {r['max_abs_d']:.2f}"
    )
    assert r["excess_kurtosis"] > 2.0, "the A/A d should be heavy-tailed"
    # If the true rate were alpha, the observed one would exceed alpha + 2.33 standard errors with
    # probability 1 %: the margin binomial noise allows at 2,000 streams (0.05 + 0.011).
    assert rate <= ALPHA + 2.33 * math.sqrt(ALPHA * (1 - ALPHA) / STREAMS)


# (skill of the candidate, of production, expected decision, bars within which every stream must decide)
PLANTED = {
    "better": (0.5, 0.3, PROMOTE, 3000),
    "worse": (0.15, 0.3, ROLLBACK, 3000),
    "much_worse": (0.0, 0.3, ROLLBACK, 600),
}
PLANTED_STREAMS = 200


@pytest.mark.parametrize("case", list(PLANTED))
def test_planted_candidate_is_decided_correctly_within_bound(case: str) -> None:
    lam_c, lam_p, expected, bound = PLANTED[case]
    r = run_streams(7, (0.2, 0.3), lam_c, lam_p, PLANTED_STREAMS)
    correct = r["code"] == expected
    bars = r["bars"][correct]
    print(
        f"\nplanted {case}: mean d {r['mean_d']:+.4f} nats/bar (sd {r['sd_d']:.3f}); {int(correct.sum())}/"
        f"{PLANTED_STREAMS} decided correctly; bars to decision median {np.median(bars):.0f}, "
        f"90th pct {np.percentile(bars, 90):.0f}, max {bars.max()}"
    )
    assert correct.all(), f"{int((~correct).sum())} streams undecided or decided the wrong way"
    assert bars.max() <= bound


def test_error_rate_rule_rolls_back_a_wrong_way_candidate_and_spares_a_coin() -> None:
    rng = np.random.default_rng(3)
    d = np.zeros((1000, 2000))  # no log-loss difference: only the error-rate rule can act
    directional = rng.random(d.shape) < 0.7
    bad = directional & (rng.random(d.shape) < 0.75)
    code, bars = first_decisions(d, bad, directional, PARAMS, LOOK_EVERY)
    assert (code == ROLLBACK).all()
    print(f"\nwrong-way rate 75 %: rolled back after median {np.median(bars):.0f} bars, max {bars.max()}")
    assert bars.max() <= 800
    # 0.55 < 0.6: the rule must not fire.
    coin = directional & (rng.random(d.shape) < 0.55)
    c_code, _ = first_decisions(d, coin, directional, PARAMS, LOOK_EVERY)
    assert (c_code == ROLLBACK).sum() == 0


def test_overlapping_outcome_windows_inflate_errors_and_thinning_restores_them() -> None:
    """Why judge.py keeps only pairs with non-overlapping outcome windows: with a label horizon of h bars,
    consecutive outcomes share h - 1 bars of return, so their d values are correlated and the variance the test
    assumes is too small."""
    rng = np.random.default_rng(1)
    for h in (3, 5):
        steps = np.cumsum(rng.standard_normal((STREAMS, PAIRS + h)), axis=1)
        d = steps[:, h:] - steps[:, :-h]  # each d the sum of h per-bar terms, the next shares h - 1 of them
        no = np.zeros(d.shape, dtype=bool)
        overlapping, _ = first_decisions(d, no, no, PARAMS, LOOK_EVERY)
        thinned = d[:, ::h]
        no = np.zeros(thinned.shape, dtype=bool)
        kept, _ = first_decisions(thinned, no, no, PARAMS, LOOK_EVERY)
        raw_rate = float(np.isin(overlapping, (PROMOTE, ROLLBACK)).mean())
        thin_rate = float(np.isin(kept, (PROMOTE, ROLLBACK)).mean())
        print(f"\nhorizon {h}: A/A false decisions {raw_rate:.1%} on overlapping pairs, {thin_rate:.1%} thinned")
        assert raw_rate > 4 * ALPHA
        assert thin_rate <= ALPHA + 2.33 * math.sqrt(ALPHA * (1 - ALPHA) / STREAMS)


def test_rho_minimises_the_boundary_at_the_planned_sample() -> None:
    for alpha in (0.01, 0.05, 0.1):
        for planned in (100, 500, 5000):
            rho = unit_rho(planned, alpha)
            best = minimize_scalar(
                lambda r, a=alpha, n=planned: float(unit_boundary(n, math.exp(r), a)),
                bounds=(-5, 15),
                method="bounded",
            )
            assert float(unit_boundary(planned, rho, alpha)) <= best.fun * 1.01


def test_boundary_is_where_robbins_mixture_martingale_reaches_one_over_alpha() -> None:
    rho, alpha = unit_rho(500, ALPHA), ALPHA
    for n in (1, 100, 10_000):
        s = float(unit_boundary(n, rho, alpha))
        martingale = math.sqrt(rho / (n + rho)) * math.exp(s * s / (2 * (n + rho)))
        assert martingale == pytest.approx(1 / alpha, rel=1e-9)


def test_evaluate_reports_evidence_and_respects_min_pairs() -> None:
    rng = np.random.default_rng(5)
    d = rng.standard_normal(99) - 1.0  # plainly better, but below min_pairs
    flags = np.zeros(99, dtype=bool)
    e = evaluate(d, flags, flags, PARAMS)
    assert e.decision == "insufficient" and e.n == 99
    d = np.append(d, -1.0)
    e = evaluate(d, np.zeros(100, bool), np.zeros(100, bool), PARAMS)
    assert e.decision == "promote" and e.upper < 0 and e.mean == pytest.approx(d.mean())
    ev = e.evidence()
    assert {"n", "mean", "sd", "sum_d", "boundary", "lower", "upper", "error_rate", "alpha"} <= ev.keys()
    e = evaluate(-d, np.zeros(100, bool), np.zeros(100, bool), PARAMS)
    assert e.decision == "rollback" and e.lower > 0
    e = evaluate(rng.standard_normal(200), np.zeros(200, bool), np.zeros(200, bool), PARAMS)
    assert e.decision == "continue" and e.lower < 0 < e.upper
    # Identical models: d all zero; the floor keeps the test from crossing on nothing.
    assert evaluate(np.zeros(500), np.zeros(500, bool), np.zeros(500, bool), PARAMS).decision == "continue"


def test_evaluate_rejects_malformed_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        evaluate([0.1, 0.2], [False], [False, False], PARAMS)
    with pytest.raises(ValueError, match="finite"):
        evaluate([math.inf, 0.0], [False, False], [False, False], PARAMS)
    with pytest.raises(ValueError, match="directional"):
        evaluate([0.0], [True], [False], PARAMS)
    with pytest.raises(ValueError, match="min_pairs"):
        SequentialParams(alpha=0.05, min_pairs=1, max_error_rate=0.6)


def test_log_loss_clips_probabilities() -> None:
    ll = log_loss([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]], [0, 2])
    assert ll[0] == pytest.approx(-math.log(1e-6)) and ll[1] == pytest.approx(-math.log(0.5))
