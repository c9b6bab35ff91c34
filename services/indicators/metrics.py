"""Data-quality metrics of the market-data store."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.market_repository import SeriesInfo
from shared.timeframes import Timeframe

BARS_INGESTED = Counter("market_bars_ingested_total", "Bars accepted (inserted or updated)", ["symbol"])
BARS_REJECTED = Counter("market_bars_rejected_total", "Bars in refused batches", ["symbol"])
BARS_FLAGGED = Counter("market_bars_flagged_total", "Bars stored with a quality flag", ["symbol", "reason"])


class StalenessCollector(Collector):
    """`market_data_staleness_seconds{symbol,timeframe}`: seconds since the newest bar closed.

    Computed at scrape time from a snapshot of the series table that each worker refreshes in the
    background, so a feed that stops shows a growing value even when nothing else happens.
    """

    def __init__(self) -> None:
        # (symbol, timeframe) -> close time of the newest bar, epoch seconds
        self.last_close: dict[tuple[str, Timeframe], float] = {}

    def replace(self, series: list[SeriesInfo]) -> None:
        self.last_close = {(s.symbol, s.timeframe): s.last_ts.timestamp() + s.timeframe.seconds for s in series}

    def observe(self, symbol: str, timeframe: Timeframe, last_open_ts: int) -> None:
        """Ingest on this worker: no need to wait for the next refresh."""
        key = (symbol, timeframe)
        close = float(last_open_ts + timeframe.seconds)
        self.last_close[key] = max(close, self.last_close.get(key, close))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "market_data_staleness_seconds",
            "Seconds since the newest stored bar closed",
            labels=["symbol", "timeframe"],
        )
        now = time.time()
        for (symbol, tf), close in sorted(self.last_close.items()):
            g.add_metric([symbol, tf.value], now - close)
        yield g
