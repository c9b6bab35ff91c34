"""Decision rules: consensus, indicator score, risk limits, calibration, cache lifetime."""

from __future__ import annotations

import numpy as np
import pytest

from services.predictor.cache import ttl_seconds
from services.predictor.model_manager import calibrate
from services.predictor.signals import DEFAULT_WEIGHTS, RiskLimits, consensus, indicator_score, risk
from shared.timeframes import Timeframe

LIMITS = RiskLimits(
    max_position_fraction=0.1, risk_per_trade_fraction=0.01, stop_atr_multiple=2.0, take_profit_atr_multiple=3.0
)


def test_consensus_is_a_confidence_weighted_vote() -> None:
    c = consensus({"H1": ("BUY", 0.6), "H4": ("SELL", 0.5), "D1": ("SELL", 0.4)})
    assert c["signal"] == "SELL" and c["agreement"] == pytest.approx(2 / 3)


def test_consensus_tie_is_hold() -> None:
    assert consensus({"H1": ("BUY", 0.6), "H4": ("SELL", 0.6)})["signal"] == "HOLD"
    assert consensus({})["signal"] == "HOLD"


def test_indicator_score_extremes() -> None:
    bullish = {
        "rsi_14": 20,
        "macd_line": 1,
        "macd_signal": 1,
        "macd_hist": 1,
        "bb_percent_b": -0.1,
        "sma20_dist": 0.01,
        "sma50_dist": 0.02,
        "stoch_k": 10,
        "stoch_d": 10,
        "cci_20": -150,
        "willr_14": -90,
        "mfi_14": 10,
        "roc_10": 1,
        "obv_slope_20": 0.5,
    }
    assert indicator_score(bullish, DEFAULT_WEIGHTS) == 1.0
    bearish = {
        "rsi_14": 80,
        "macd_line": -1,
        "macd_signal": -1,
        "macd_hist": -1,
        "bb_percent_b": 1.2,
        "sma20_dist": -0.01,
        "sma50_dist": -0.02,
        "stoch_k": 90,
        "stoch_d": 90,
        "cci_20": 150,
        "willr_14": -5,
        "mfi_14": 90,
        "roc_10": -1,
        "obv_slope_20": -0.5,
    }
    assert indicator_score(bearish, DEFAULT_WEIGHTS) == -1.0
    only_rsi = dict.fromkeys(DEFAULT_WEIGHTS, 0.0) | {"rsi_14": 20}
    assert indicator_score(bullish, {"rsi_14": 1.0}) == 1.0
    assert 0 < indicator_score(only_rsi, DEFAULT_WEIGHTS) < 1


def test_risk_formula() -> None:
    r = risk("BUY", 1.0, close=100.0, atr_pct=0.01, limits=LIMITS)
    # stop 2 ATR = 2 % away; 1 % risk per trade -> 50 % of equity, capped at 10 %
    assert r["position_fraction"] == 0.1
    assert r["stop_loss"] == pytest.approx(98.0) and r["take_profit"] == pytest.approx(103.0)
    r = risk("SELL", 2 / 3, close=100.0, atr_pct=0.1, limits=LIMITS)
    # conviction 0.5; stop 20 % away -> 0.5 * 0.01 / 0.2 = 2.5 %
    assert r["position_fraction"] == pytest.approx(0.025)
    assert r["stop_loss"] == pytest.approx(120.0) and r["take_profit"] == pytest.approx(70.0)
    hold = risk("HOLD", 0.9, close=100.0, atr_pct=0.01, limits=LIMITS)
    assert hold["position_fraction"] == 0 and hold["stop_loss"] is None


def test_calibration_is_temperature_scaling() -> None:
    p = np.array([0.1, 0.2, 0.7])
    assert calibrate(p, 1.0) == pytest.approx(p)
    flat = calibrate(p, 1e6)
    assert flat == pytest.approx(np.full(3, 1 / 3), abs=1e-5)
    sharp = calibrate(p, 0.5)
    assert sharp[2] > 0.7 and sharp.sum() == pytest.approx(1.0)


def test_cache_ttl_ends_when_the_bar_closes() -> None:
    h1_open = 1_700_000_000 - 1_700_000_000 % 3600
    assert ttl_seconds(Timeframe.H1, 60, now=h1_open + 3600 - 10) == 10
    assert ttl_seconds(Timeframe.H1, 60, now=h1_open + 5) == 60
    assert ttl_seconds(Timeframe.M1, 60, now=h1_open + 30.5) == 30


def test_prediction_ids_are_version_7_uuids_in_time_order() -> None:
    import time
    import uuid

    from services.predictor.service import uuid7

    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert all(before <= i.int >> 80 <= after for i in ids)
    assert [i.int >> 80 for i in ids] == sorted(i.int >> 80 for i in ids)
    assert len(set(ids)) == 1000
