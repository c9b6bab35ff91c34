"""Decision rules that training, backtesting and serving share: indicator votes and their weighted score,
and the risk block's position sizing with ATR stop-loss / take-profit (docs/PREDICTOR.md has the formulas).

Pure Python on floats: the predictor calls them per request, the trainer's backtester and weight optimiser on
whole series, so a backtest trades exactly the position a prediction recommends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# --- indicator votes --------------------------------------------------------------------------------------


def _band(low: float, high: float) -> Callable[[float], int]:
    """Oscillator vote: below `low` is oversold (+1, BUY), above `high` overbought (-1, SELL)."""

    def vote(x: float) -> int:
        return 1 if x < low else (-1 if x > high else 0)

    return vote


def _sign(x: float) -> int:
    return 1 if x > 0 else (-1 if x < 0 else 0)


# Directional indicators only; bb_bandwidth, atr_14_pct and adx_14 measure volatility or trend strength,
# not direction, and do not vote.
VOTES: dict[str, Callable[[float], int]] = {
    "rsi_14": _band(30.0, 70.0),
    "macd_line": _sign,
    "macd_signal": _sign,
    "macd_hist": _sign,
    "bb_percent_b": _band(0.0, 1.0),
    "sma20_dist": _sign,
    "sma50_dist": _sign,
    "stoch_k": _band(20.0, 80.0),
    "stoch_d": _band(20.0, 80.0),
    "cci_20": _band(-100.0, 100.0),
    "willr_14": _band(-80.0, -20.0),
    "mfi_14": _band(20.0, 80.0),
    "roc_10": _sign,
    "obv_slope_20": _sign,
}

DEFAULT_WEIGHTS_VERSION = "equal-v1"
DEFAULT_WEIGHTS: dict[str, float] = dict.fromkeys(VOTES, 1.0)


def indicator_votes(row: Mapping[str, float]) -> dict[str, int]:
    return {name: fn(row[name]) for name, fn in VOTES.items() if name in row and math.isfinite(row[name])}


def indicator_score(row: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum(w_i * vote_i) / sum(w_i) over the voting indicators: -1 (all SELL) .. +1 (all BUY)."""
    votes = indicator_votes(row)
    total = sum(max(weights.get(n, 0.0), 0.0) for n in votes)
    if total <= 0:
        return 0.0
    return round(sum(max(weights.get(n, 0.0), 0.0) * v for n, v in votes.items()) / total, 6)


# --- risk -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RiskLimits:
    max_position_fraction: float
    risk_per_trade_fraction: float
    stop_atr_multiple: float
    take_profit_atr_multiple: float


# The predictor's defaults (PREDICTOR RISK_* settings): a backtest of "what the predictor recommends" uses them
# unless told otherwise.
DEFAULT_RISK_LIMITS = RiskLimits(
    max_position_fraction=0.10, risk_per_trade_fraction=0.01, stop_atr_multiple=2.0, take_profit_atr_multiple=3.0
)


def risk(signal: str, confidence: float, close: float, atr_pct: float, limits: RiskLimits) -> dict[str, object]:
    """Suggested position (fraction of equity) and ATR-based stop-loss / take-profit prices.

    conviction = clip((confidence - 1/3) / (2/3), 0, 1)   (0 at a uniform guess, 1 at certainty)
    stop distance = stop_atr_multiple * ATR
    position = min(max_position, conviction * risk_per_trade / (stop_atr_multiple * ATR / close))
    so that hitting the stop loses at most risk_per_trade of equity, less when the model is unsure.
    HOLD suggests 0 and no prices.
    """
    atr = atr_pct * close if math.isfinite(atr_pct) and atr_pct > 0 else 0.0
    conviction = min(max((confidence - 1.0 / 3.0) / (2.0 / 3.0), 0.0), 1.0)
    out: dict[str, object] = {
        "position_fraction": 0.0,
        "max_position_fraction": limits.max_position_fraction,
        "risk_per_trade_fraction": limits.risk_per_trade_fraction,
        "entry_price": close,
        "atr": round(atr, 10),
        "atr_pct": round(atr_pct, 10) if math.isfinite(atr_pct) else None,
        "stop_loss": None,
        "take_profit": None,
        "side": "flat",
    }
    if signal == "HOLD" or atr <= 0:
        return out
    stop_distance = limits.stop_atr_multiple * atr
    raw = conviction * limits.risk_per_trade_fraction / (stop_distance / close)
    direction = 1.0 if signal == "BUY" else -1.0
    out.update(
        position_fraction=round(min(limits.max_position_fraction, raw), 6),
        stop_loss=round(close - direction * stop_distance, 10),
        take_profit=round(close + direction * limits.take_profit_atr_multiple * atr, 10),
        side="long" if signal == "BUY" else "short",
    )
    return out
