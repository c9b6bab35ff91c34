"""Indicator weights from a trained model: SHAP importance, shared among redundant indicators, scaled by
each indicator's standalone out-of-sample hit rate (docs/WEIGHTS.md has the rule and its reasons).

Only numpy at import; shap, Keras and matplotlib are imported inside the functions that need them, so the
API can import the result type cheaply. No library implements this rule: it is a few lines of numpy.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from services.trainer.dataset import BUY, HOLD, SELL, Dataset
from shared.features import FEATURE_NAMES, N_FEATURES
from shared.signal_rules import VOTES

METHOD: Final = "shap-gradient+corr-share+hit-rate-v1"
# Two features whose |Pearson correlation| on the held-out rows reaches this are redundant: each one's score
# is divided by the number of features it is redundant with, itself included (its "group"). 0.9: the MACD
# line and its signal, or %K and %D, move together about this closely on daily data and say the same thing
# twice. A per-feature count, not a clustering: single linkage chained 12 of the 14 price-driven features of
# tests/trainer/planted.py's bars into one group, and complete linkage depends on the order ties are merged.
REDUNDANCY_THRESHOLD: Final = 0.9
# Multiplier of an indicator with no measurable standalone skill (hit rate at or below chance, too few votes
# or no vote at all): kept above 0 because a feature the model leans on may matter in combination.
HIT_FLOOR: Final = 0.05
# Fewer counted votes than this on the held-out split: no hit rate (its standard error would exceed 0.11).
MIN_VOTES: Final = 20
SPLIT: Final = "val"

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LiveRows:
    """Settled live bars of the model version (services.trainer.settlement.live_rows): the raw newest feature row
    of each bar's logged input window (FEATURE_NAMES order) and the realised label (SELL, HOLD, BUY indices)."""

    raw: FloatArray  # (n, 17)
    y: npt.NDArray[np.int64]  # (n,)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class WeightsResult:
    weights: dict[str, float]  # the 17 FEATURE_NAMES, each >= 0, summing to 1
    importances: dict[str, float]  # mean |SHAP| (see optimize_weights), held-out data
    correlation: list[list[float]]  # 17 x 17 Pearson correlation of the held-out feature rows
    hit_rates: dict[str, float | None]  # standalone held-out hit rate of each voting indicator, else None
    method: str
    inputs: dict[str, Any]  # sample sizes, seeds, thresholds, split, vote counts, redundant pairs
    data_start: datetime  # bar-open time of the first held-out bar used
    data_end: datetime  # bar-open time of the last held-out bar used


def redundancy_counts(correlation: FloatArray, threshold: float = REDUNDANCY_THRESHOLD) -> npt.NDArray[np.int64]:
    """For each feature, how many features (itself included) have |corr| >= threshold with it (NaN: no)."""
    c = np.nan_to_num(np.abs(np.asarray(correlation, dtype=np.float64)), nan=0.0)
    redundant = c >= threshold
    np.fill_diagonal(redundant, True)
    return np.asarray(redundant.sum(axis=1), dtype=np.int64)


def redundant_pairs(correlation: FloatArray, threshold: float = REDUNDANCY_THRESHOLD) -> list[tuple[int, int]]:
    """(i, j), i < j, of every pair of features with |corr| >= threshold."""
    c = np.nan_to_num(np.abs(np.asarray(correlation, dtype=np.float64)), nan=0.0)
    i, j = np.nonzero(np.triu(c >= threshold, 1))
    return [(int(a), int(b)) for a, b in zip(i, j, strict=True)]


def combine(
    importances: FloatArray,
    correlation: FloatArray,
    hit_rates: FloatArray,
    *,
    threshold: float = REDUNDANCY_THRESHOLD,
    floor: float = HIT_FLOOR,
    chance: FloatArray | None = None,
) -> FloatArray:
    """The weight rule: score_i = importance_i / group_i * (floor + max(hit_i - chance_i, 0)), normalised.

    - importance_i >= 0 (mean |SHAP|); group_i the number of features j (i included) with
      |corr_ij| >= threshold, so m interchangeable indicators split what one of them would get;
    - hit_i the standalone hit rate, NaN when unknown (a non-voting feature, too few votes): factor = floor;
      chance_i the rate its votes would hit by luck (0.5 when `chance` is None; NaN entries count as 0.5);
    - weights = score / sum(score); when every importance is 0, importance 1 for all (so equal weights where
      no group and no hit rate tells the features apart).
    A weight is 0 only when the feature's importance is 0 while another's is not: the floor keeps every
    multiplier positive.
    Monotone: raising importance_i or hit_i never lowers weight_i (group sizes depend on the correlation only).
    """
    imp = np.asarray(importances, dtype=np.float64)
    hit = np.asarray(hit_rates, dtype=np.float64)
    corr = np.asarray(correlation, dtype=np.float64)
    n = imp.shape[0]
    if imp.ndim != 1 or hit.shape != (n,) or corr.shape != (n, n):
        raise ValueError(
            f"need importances (n,), hit_rates (n,) and correlation (n, n); got {imp.shape}, {hit.shape}, {corr.shape}"
        )
    if n == 0:
        raise ValueError("combine needs at least one feature")
    if not (np.isfinite(imp).all() and (imp >= 0).all()):
        raise ValueError(f"importances must be finite and >= 0, got {imp.tolist()}")
    if floor <= 0:
        raise ValueError(f"floor must be > 0 so that every multiplier stays positive, got {floor}")
    base = np.full(n, 0.5) if chance is None else np.nan_to_num(np.asarray(chance, dtype=np.float64), nan=0.5)
    if base.shape != (n,):
        raise ValueError(f"chance must have shape ({n},), got {base.shape}")
    size = redundancy_counts(corr, threshold)
    skill = np.where(np.isnan(hit), 0.0, np.maximum(hit - base, 0.0))
    factor = floor + skill
    score = imp / size * factor
    if not score.sum() > 0:
        # No importance anywhere: every feature counts as equally important, and the rest of the rule holds.
        score = factor / size
    return np.asarray(score / score.sum(), dtype=np.float64)


def _correlation(rows: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.corrcoef(rows, rowvar=False)
    # A constant column has no correlation with anything: 0 off the diagonal, 1 on it.
    c = np.nan_to_num(np.atleast_2d(c), nan=0.0)
    np.fill_diagonal(c, 1.0)
    return np.asarray(c, dtype=np.float64)


def vote_hit_rates(raw_rows: FloatArray, y: npt.NDArray[np.int64]) -> dict[str, dict[str, float | int | None]]:
    """Each voting indicator's standalone hit rate on (raw last-bar feature rows, labels).

    Counted: rows whose label is BUY or SELL and where the indicator votes +1 (BUY) or -1 (SELL); a vote of 0
    abstains. `chance` is what votes in the same BUY/SELL mix would hit against these labels by luck:
    share_buy_votes * share_buy_labels + share_sell_votes * share_sell_labels.
    """
    directional = y != HOLD
    buy_share = float((y[directional] == BUY).mean()) if directional.any() else 0.5
    out: dict[str, dict[str, float | int | None]] = {}
    for name, vote in VOTES.items():
        col = raw_rows[directional, FEATURE_NAMES.index(name)]
        labels = y[directional]
        v = np.fromiter((vote(float(x)) for x in col), dtype=np.int64, count=col.shape[0])
        cast = v != 0
        n = int(cast.sum())
        if n < MIN_VOTES:
            out[name] = {"hit_rate": None, "chance": None, "votes": n}
            continue
        hits = (v[cast] == 1) & (labels[cast] == BUY) | (v[cast] == -1) & (labels[cast] == SELL)
        buy_votes = float((v[cast] == 1).mean())
        out[name] = {
            "hit_rate": float(hits.mean()),
            "chance": buy_votes * buy_share + (1.0 - buy_votes) * (1.0 - buy_share),
            "votes": n,
        }
    return out


def hit_rate_votes(
    held_raw: FloatArray, held_y: npt.NDArray[np.int64], live: LiveRows | None, min_live_bars: int
) -> tuple[dict[str, dict[str, float | int | None]], str]:
    """The historical-performance term's votes and where they come from: the version's settled live bars
    ("live") when there are at least `min_live_bars`, else the held-out validation rows (SPLIT)."""
    if live is not None and len(live) >= min_live_bars:
        return vote_hit_rates(live.raw, live.y), "live"
    return vote_hit_rates(held_raw, held_y), SPLIT


def _utc(epoch_s: int) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def optimize_weights(
    model: Any,
    ds: Dataset,
    *,
    background: int = 100,
    explained: int = 200,
    seed: int = 0,
    live: LiveRows | None = None,
    min_live_bars: int = 100,
) -> WeightsResult:
    """Weights of the 17 features for `model` trained on `ds.train`, measured on the validation split.

    - SHAP: shap.GradientExplainer with `background` training sequences (drawn with `seed`) as reference,
      explaining `explained` validation sequences (drawn with `seed`); importance_f = mean over explained
      sequences and the three class probabilities of sum over the window's steps of |SHAP(f, step)|.
    - correlation: Pearson over the newest bar's features of every validation sequence.
    - hit rates (the historical-performance term): vote_hit_rates on the version's settled live bars when `live`
      holds at least `min_live_bars` of them (TRAINER_PERFORMANCE_MIN_BARS), else on the validation rows
      (unscaled with the dataset's scaler) and labels; `inputs["hit_rate_source"]` says which.
    - weights: combine(importances, correlation, hit rates, chance=the hit rates' chance levels).
    The test split is never read: it stays untouched for judging the model and these weights.
    """
    from services.trainer.explain import SHAP_NSAMPLES, gradient_shap

    if background < 1 or explained < 1:
        raise ValueError(f"background and explained must be >= 1, got {background} and {explained}")
    held = ds.val
    if len(held) == 0 or len(ds.train) == 0:
        raise ValueError(f"need train and validation sequences, got {len(ds.train)} and {len(held)}")
    rng = np.random.default_rng(seed)
    n_bg = min(background, len(ds.train))
    n_ex = min(explained, len(held))
    bg = ds.train.x[np.sort(rng.choice(len(ds.train), n_bg, replace=False))]
    ex = held.x[np.sort(rng.choice(len(held), n_ex, replace=False))]

    phi = gradient_shap(model, bg, ex, seed=seed)  # (n_ex, steps, 17, 3)
    importances = np.abs(phi).sum(axis=1).mean(axis=(0, 2))

    raw = held.x[:, -1, :].astype(np.float64) * ds.scaler_scale + ds.scaler_mean
    corr = _correlation(raw)
    votes, source = hit_rate_votes(raw, held.y, live, min_live_bars)
    hit = np.full(N_FEATURES, np.nan)
    chance = np.full(N_FEATURES, np.nan)
    for name, v in votes.items():
        i = FEATURE_NAMES.index(name)
        if v["hit_rate"] is not None and v["chance"] is not None:
            hit[i], chance[i] = float(v["hit_rate"]), float(v["chance"])
    weights = combine(importances, corr, hit, chance=chance)
    return WeightsResult(
        weights={name: float(w) for name, w in zip(FEATURE_NAMES, weights, strict=True)},
        importances={name: float(v) for name, v in zip(FEATURE_NAMES, importances, strict=True)},
        correlation=corr.tolist(),
        hit_rates={name: (None if np.isnan(h) else float(h)) for name, h in zip(FEATURE_NAMES, hit, strict=True)},
        method=METHOD,
        inputs={
            "split": SPLIT,
            "hit_rate_source": source,
            "live_bars": len(live) if live is not None else 0,
            "min_live_bars": min_live_bars,
            "held_out_sequences": len(held),
            "explained_sequences": n_ex,
            "background_sequences": n_bg,
            "background_split": "train",
            "shap_nsamples": SHAP_NSAMPLES,
            "seed": seed,
            "redundancy_threshold": REDUNDANCY_THRESHOLD,
            "hit_floor": HIT_FLOOR,
            "min_votes": MIN_VOTES,
            "votes_counted": {name: v["votes"] for name, v in votes.items()},
            "chance_hit_rates": {name: v["chance"] for name, v in votes.items()},
            "redundant_pairs": [
                [FEATURE_NAMES[i], FEATURE_NAMES[j], round(float(corr[i, j]), 4)] for i, j in redundant_pairs(corr)
            ],
            "sequence_length": int(held.x.shape[1]),
        },
        data_start=_utc(int(held.ts[0])),
        data_end=_utc(int(held.ts[-1])),
    )


def plot_weights(result: WeightsResult) -> bytes:
    """PNG: the weights as horizontal bars (largest on top) beside the correlation heat map."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(result.weights)
    order = sorted(range(len(names)), key=lambda i: result.weights[names[i]])
    # A Figure of its own (not pyplot's global state), so concurrent workers cannot draw into each other.
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    bars, heat = fig.subplots(1, 2, width_ratios=[1, 1.25])
    bars.barh([names[i] for i in order], [result.weights[names[i]] for i in order], color="#3b6ea5")
    bars.set_xlabel("weight")
    bars.set_title(f"Indicator weights ({result.method})", fontsize=9)
    image = heat.imshow(np.asarray(result.correlation), vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    heat.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    heat.set_yticks(range(len(names)), names, fontsize=7)
    heat.set_title(
        f"Pearson correlation, {result.inputs.get('split', '?')} split "
        f"{result.data_start:%Y-%m-%d}..{result.data_end:%Y-%m-%d}",
        fontsize=9,
    )
    fig.colorbar(image, ax=heat, shrink=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
