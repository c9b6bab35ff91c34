"""How many bars every feature series withholds at its start (its warm-up), in a module of its own so that
processes without TA-Lib (the predictor, the trainer API) share the number instead of copying it."""

# Exponentially smoothed indicators (RSI, ATR, ADX, MACD) remember their whole history with weights that
# decay like (1 - 1/14)^n. After WARMUP_BARS bars that memory is below 1e-9 relative: a row computed from
# a window of WARMUP_BARS + 1 bars equals the same row inside the full S&P 500 history to 1e-9 (tested:
# tests/shared/test_features.py::test_latest_row_does_not_depend_on_history_length). Rows before it are the
# warm-up and are never returned.
WARMUP_BARS = 500
