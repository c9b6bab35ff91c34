"""Pure decision rules on top of model probabilities: consensus, indicator score, risk limits.

Each rule is documented with its formula in docs/PREDICTOR.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypedDict

import orjson

from services.predictor.repository import WeightsRow
from shared.model_metadata import CLASSES
from shared.signal_rules import (
    DEFAULT_WEIGHTS,
    DEFAULT_WEIGHTS_VERSION,
    VOTES,
    RiskLimits,
    indicator_score,
    indicator_votes,
    risk,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "DEFAULT_WEIGHTS_VERSION",
    "VOTES",
    "ConsensusResult",
    "RiskLimits",
    "Weights",
    "WeightsBook",
    "consensus",
    "decide",
    "indicator_score",
    "indicator_votes",
    "risk",
]


@dataclass(frozen=True)
class Weights:
    version: str
    weights: dict[str, float]
    source: str  # "default" (built in), or the scope of the table row: "SYMBOL/TF", "SYMBOL/*", "*/*"
    # The stored row these weights come from; None for the built-in default.
    row: WeightsRow | None = None
    # Part of the prediction cache key: a row rewritten under the same version still changes the key.
    cache_token: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ident = orjson.dumps([self.version, self.row.id if self.row else None, sorted(self.weights.items())])
        object.__setattr__(self, "cache_token", f"{self.version}:{hashlib.sha256(ident).hexdigest()[:16]}")


DEFAULT = Weights(DEFAULT_WEIGHTS_VERSION, dict(DEFAULT_WEIGHTS), "default")


class WeightsBook:
    """The current weights per scope; replaced whole on refresh."""

    def __init__(self) -> None:
        self.scopes: dict[tuple[str, str], Weights] = {}

    def replace(self, rows: list[WeightsRow]) -> None:
        self.scopes = {
            (r.symbol, r.timeframe): Weights(
                r.version, {n: r.weights.get(n, 0.0) for n in VOTES}, f"{r.symbol}/{r.timeframe}", r
            )
            for r in rows
        }

    def lookup(self, symbol: str | None, timeframe: str | None) -> Weights:
        """The weights of the most specific scope: (symbol, timeframe), (symbol, *), (*, *), else the default."""
        scopes = self.scopes
        if symbol is not None:
            if timeframe is not None:
                found = scopes.get((symbol, timeframe))
                if found is not None:
                    return found
            found = scopes.get((symbol, "*"))
            if found is not None:
                return found
        return scopes.get(("*", "*"), DEFAULT)


# --- consensus --------------------------------------------------------------------------------------------


class ConsensusResult(TypedDict):
    signal: str
    rule: str
    votes: dict[str, float]
    strength: float
    agreement: float
    timeframes_used: list[str]


def consensus(signals: Mapping[str, tuple[str, float]]) -> ConsensusResult:
    """Confidence-weighted vote of the timeframes that produced a signal; a tie for first place is HOLD."""
    votes = dict.fromkeys(("BUY", "SELL", "HOLD"), 0.0)
    for signal, confidence in signals.values():
        votes[signal] += confidence
    total = sum(votes.values())
    ranked = sorted(votes.items(), key=lambda kv: kv[1], reverse=True)
    if not signals:
        winner = "HOLD"
    elif math.isclose(ranked[0][1], ranked[1][1], rel_tol=1e-9, abs_tol=1e-12):
        winner = "HOLD"
    else:
        winner = ranked[0][0]
    agreeing = sum(1 for s, _ in signals.values() if s == winner)
    return {
        "signal": winner,
        "rule": "confidence_weighted_vote",
        "votes": {k: round(v, 6) for k, v in votes.items()},
        "strength": round(votes[winner] / total, 6) if total > 0 else 0.0,
        "agreement": round(agreeing / len(signals), 6) if signals else 0.0,
        "timeframes_used": list(signals),
    }


def decide(probabilities: list[float]) -> tuple[str, float]:
    """The signal is the most probable class; its probability is the confidence. CLASSES order in."""
    k = max(range(len(CLASSES)), key=lambda i: probabilities[i])
    return CLASSES[k], probabilities[k]
