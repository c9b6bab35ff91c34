"""Training metrics, read from the jobs table at scrape time by the trainer API.

Jobs run in Celery worker processes that serve no HTTP; the table is the one place that knows every job
of every worker, so the API (each replica alike) reports from a snapshot it refreshes in the background.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# Training takes seconds (tests) to hours (full history on CPU).
DURATION_BUCKETS_S = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)

_COUNTS = "SELECT status, count(*) FROM training_jobs WHERE status IN ('succeeded', 'failed') GROUP BY status"
_DURATIONS = """
WITH d AS (
    SELECT extract(epoch FROM finished_at - started_at)::float8 AS s
      FROM training_jobs WHERE status = 'succeeded' AND started_at IS NOT NULL AND finished_at IS NOT NULL
)
SELECT (SELECT coalesce(array_agg(c ORDER BY le), '{}') FROM
          (SELECT b.le, count(d.s) AS c FROM unnest($1::float8[]) AS b(le) LEFT JOIN d ON d.s <= b.le
            GROUP BY b.le) x) AS cumulative,
       (SELECT count(*) FROM d) AS n,
       (SELECT coalesce(sum(s), 0) FROM d) AS total
"""


@dataclass
class Snapshot:
    counts: dict[str, int] = field(default_factory=dict)
    cumulative: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS_S))
    n: int = 0
    total_s: float = 0.0


class TrainingJobsCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    async def refresh(self, pool: asyncpg.Pool) -> None:
        counts = {r["status"]: int(r["count"]) for r in await pool.fetch(_COUNTS)}
        row = await pool.fetchrow(_DURATIONS, list(DURATION_BUCKETS_S))
        assert row is not None
        self.snapshot = Snapshot(counts, [int(c) for c in row["cumulative"]], int(row["n"]), float(row["total"]))

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        s = self.snapshot
        jobs = CounterMetricFamily("ml_training_jobs", "Training jobs that ended, by status", labels=["status"])
        for status in ("succeeded", "failed"):
            jobs.add_metric([status], s.counts.get(status, 0))
        yield jobs
        buckets = [(str(le), float(c)) for le, c in zip(DURATION_BUCKETS_S, s.cumulative, strict=True)]
        buckets.append(("+Inf", float(s.n)))
        yield HistogramMetricFamily(
            "ml_training_duration_seconds", "Wall time of succeeded training jobs", buckets=buckets, sum_value=s.total_s
        )
