"""Drift rules the trainer and the predictor must apply alike: the window, the bins, PSI and KS, and the null
thresholds a model's metadata carries (docs/LIFECYCLE.md, "Drift").

The features are rolling indicators, so a window of N consecutive bars holds far fewer than N independent values
and PSI/KS between a short window and the training reference is large without any drift (on a driftless random
walk the noisiest feature's mean PSI is 0.08 at 1,440 bars, 0.66 at 288, 3.4 at 50). A fixed threshold cannot
serve every window size. The trainer therefore measures, per feature, how large PSI and KS get on windows of
the predictor's size cut from the model's own training rows (`null_thresholds`), and the predictor flags a
feature only above max(fixed threshold, that null threshold) (`effective_thresholds`).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from shared.model_metadata import ReferenceDistribution
from shared.timeframes import Timeframe

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# The predictor's defaults (services/predictor/settings.py DRIFT_WINDOW_HOURS, DRIFT_MIN_BARS); the trainer
# calibrates for this window. A predictor configured otherwise rescales (effective_thresholds). 100, not 50:
# with 50-bar windows slow features often fill one bin with no drift at all, and driftless series were flagged
# on 1.4-4 % of days even with calibrated thresholds (0.14-0.22 % at 100; benchmarks/bench_drift_null.py).
DEFAULT_WINDOW_HOURS = 24.0
DEFAULT_MIN_BARS = 100

# Empty bins: ln(0) is undefined, so both shares are floored at this (the common PSI convention). An empty live
# bin whose reference share is 0.1 then adds 0.1 * ln(0.1 / 1e-4) = 0.69: PSI punishes a missing bin hard.
PSI_EPSILON = 1e-4

# Null calibration: the quantile of the fitted null distribution a feature must exceed. Chosen from the measured
# false-flag rate of driftless random walks, live windows after the training rows (docs/LIFECYCLE.md, "Drift"):
# a check tests 17 features x 2 statistics up to 24 times a day, so a per-statistic 1e-5 is what keeps the
# share of days flagged at 0-0.5 % on 96-1,440-bar windows (0.9999 flagged up to 2.5 %).
NULL_QUANTILE = 0.99999
# Windows start every window/4 rows: more overlap adds no independent information, only time.
NULL_STRIDE_DIVISOR = 4
# Fewer usable windows than this and the fit means nothing: no null threshold (the fixed one applies).
MIN_NULL_WINDOWS = 8
# stat / max is clipped into [_CLIP, 1 - _CLIP] before its logit (a window may match the reference, or fill one bin).
_CLIP = 1e-9


def window_seconds(timeframe: Timeframe, window_hours: float, min_bars: int) -> int:
    """`window_hours`, widened for slow timeframes to the last `min_bars` bars (H1: 50 h, D1: 50 days)."""
    return max(math.ceil(window_hours * 3600), min_bars * timeframe.seconds)


def window_bars(timeframe: Timeframe, window_hours: float, min_bars: int) -> int:
    """Bars of `timeframe` the window holds: M1 1,440, M5 288, M15 96, M30 and slower `min_bars` (defaults)."""
    return window_seconds(timeframe, window_hours, min_bars) // timeframe.seconds


def bins_of(ref: ReferenceDistribution, values: FloatArray) -> IntArray:
    """Bin index of each value: the reference's quantile bins, the outer two open-ended (a live value beyond the
    training range lands in the first or last bin); a value on an inner edge belongs to the bin above it, as
    in numpy.histogram, which made the reference shares."""
    inner = np.asarray(ref.edges[1:-1], dtype=np.float64)
    return np.searchsorted(inner, values, side="right").astype(np.int64)


def psi_rows(live: FloatArray, ref: FloatArray, eps: float = PSI_EPSILON) -> FloatArray:
    """Population stability index along the last axis: sum((live - ref) * ln(live / ref)), shares floored at eps."""
    lv = np.maximum(live, eps)
    rf = np.maximum(ref, eps)
    return np.asarray(np.sum((lv - rf) * np.log(lv / rf), axis=-1), dtype=np.float64)


def ks_rows(live: FloatArray, ref: FloatArray) -> FloatArray:
    """max |CDF_live - CDF_ref| at the bin edges, along the last axis (a lower bound of the exact two-sample KS
    statistic: both CDFs are exact at the edges, the supremum over all values is at least their maximum)."""
    return np.asarray(np.max(np.abs(np.cumsum(live, axis=-1) - np.cumsum(ref, axis=-1)), axis=-1), dtype=np.float64)


def null_thresholds(
    values: FloatArray, ref: ReferenceDistribution, window: int, quantile: float = NULL_QUANTILE
) -> tuple[float, float, int] | None:
    """(PSI, KS, windows): the `quantile` of PSI and KS that windows of `window` consecutive rows of `values` (the
    training rows `ref` was built from, in time order) reach against the reference; None when too few fit.

    Each window (one every window/4 rows) is compared with the shares of the rows *outside* it and one window
    either side, so that, like a live window, it is not part of the reference it is judged against (in-sample
    windows read about 5 % lower). The window statistics are autocorrelated and few (a 50,000-row split holds
    about 35 independent 1,440-row windows), far too few for an empirical 0.99999 quantile, so a distribution is
    fitted and its quantile taken: logit-normal on stat / max, the largest value the statistic can take (all of a
    window in one bin: PSI 8.28, KS 0.9 with 10 equal bins). On driftless random walks a gamma (scaled
    chi-square) fit's tail was too light for out-of-sample windows; a log-normal's matched long windows but
    extrapolated short ones past the maximum, so nothing could ever be flagged (docs). Cost: one cumulative
    count per feature, 60-85 ms for 17 features on 50,000 rows.
    """
    n = len(values)
    if window < 2 or n < 2 * window:
        return None
    b = bins_of(ref, values)
    bins = len(ref.shares)
    counts = np.zeros((n + 1, bins))
    counts[np.arange(1, n + 1), b] = 1.0
    np.cumsum(counts, axis=0, out=counts)
    starts = np.arange(0, n - window + 1, max(1, window // NULL_STRIDE_DIVISOR))
    lo = np.maximum(starts - window, 0)
    hi = np.minimum(starts + 2 * window, n)
    outside = counts[-1] - (counts[hi] - counts[lo])
    kept = outside.sum(axis=1)
    usable = kept >= window  # the reference left must be at least a window long
    if int(usable.sum()) < MIN_NULL_WINDOWS:
        return None
    starts, outside, kept = starts[usable], outside[usable], kept[usable]
    live = (counts[starts + window] - counts[starts]) / window
    reference = outside / kept[:, np.newaxis]
    z = NormalDist().inv_cdf(quantile)  # stdlib: the predictor does not install scipy
    shares = np.asarray(ref.shares, dtype=np.float64)
    one_bin = np.eye(bins)  # the largest PSI / KS a window can reach: all its rows in one bin
    psi_max, ks_max = float(psi_rows(one_bin, shares).max()), float(ks_rows(one_bin, shares).max())

    def fitted(stat: FloatArray, top: float) -> float:
        if top <= 0:  # a constant feature: one bin, PSI and KS always 0
            return 0.0
        u = np.clip(stat / top, _CLIP, 1 - _CLIP)
        logit = np.log(u / (1 - u))
        return float(top / (1 + np.exp(-(logit.mean() + z * logit.std(ddof=1)))))

    return fitted(psi_rows(live, reference), psi_max), fitted(ks_rows(live, reference), ks_max), int(len(starts))


def calibrated(
    ref: ReferenceDistribution, values: FloatArray, window: int | None, quantile: float = NULL_QUANTILE
) -> ReferenceDistribution:
    """`ref` with its null thresholds for windows of `window` bars (unchanged when None or too few rows)."""
    if window is None:
        return ref
    got = null_thresholds(values, ref, window, quantile)
    if got is None:
        return ref
    psi_q, ks_q, windows = got
    return ref.model_copy(
        update={
            "null_window_bars": window,
            "null_quantile": quantile,
            "null_windows": windows,
            "psi_null": psi_q,
            "ks_null": ks_q,
        }
    )


def effective_thresholds(
    ref: ReferenceDistribution, live_bars: int, psi_threshold: float, ks_threshold: float
) -> tuple[float, float]:
    """(PSI, KS) a feature must exceed to count as drifted, judged on `live_bars` counted bars.

    Without a null threshold: the fixed ones. With one calibrated for W bars: max(fixed, null x W/n) for PSI
    and max(fixed, null x sqrt(W/n)) for KS when fewer bars n < W were counted, the null unchanged when n >= W.
    PSI's null mean scales like 1/n_eff and KS like 1/sqrt(n_eff); for autocorrelated rows n_eff(n)/n falls as
    n grows, so W/n over-states the noise of a shorter window and keeping the W-threshold for a longer one
    over-states it too: both err towards fewer false flags, never more.
    """
    if ref.psi_null is None or ref.ks_null is None or ref.null_window_bars is None:
        return psi_threshold, ks_threshold
    scale = max(1.0, ref.null_window_bars / max(live_bars, 1))
    return max(psi_threshold, ref.psi_null * scale), max(ks_threshold, ref.ks_null * math.sqrt(scale))
