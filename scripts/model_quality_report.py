"""Reproduce docs/MODEL_QUALITY.md: the sample data `make up` imports (S&P 500 daily bars 1999-2018 from the
`arch` package), the first model trained with the default recipe, its 5-fold walk-forward validation and
`aicash report`'s Markdown and equity PNG. Seeds are fixed (TrainConfig.seed 42, the baselines' seeds); the
data range is named in the report.

    make quality-report        # = .venv/bin/python scripts/model_quality_report.py [--out docs/MODEL_QUALITY.md]

Runs in a scratch database of its own on DATABASE_URL's server (an embedded PostgreSQL when unset) and a
temporary model folder; takes a few minutes on 2 cores (training plus 5 retrained folds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "MODEL_QUALITY.md")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    import asyncpg
    import numpy as np
    from arch.data import sp500

    from services.trainer import repository as repo
    from services.trainer.jobs import run_job
    from services.trainer.report import write_report
    from services.trainer.settings import TrainerSettings
    from shared.local_services import embedded_postgres, scratch_database
    from shared.market_repository import upsert_bars
    from shared.timeframes import OHLCV, Timeframe

    server = os.environ.get("DATABASE_URL")
    handle = None
    if not server:
        server, handle = embedded_postgres("report-pg")
    df = sp500.load()
    bars = OHLCV(
        df.index.values.astype("datetime64[s]").astype(np.int64),
        *(df[c].to_numpy(np.float64) for c in ("Open", "High", "Low", "Close", "Volume")),
    )
    symbol, tf = "SPX", Timeframe.D1
    with tempfile.TemporaryDirectory() as models, scratch_database(server, "aicash_report") as url:
        settings = TrainerSettings(database_url=url, model_store_url=f"file://{models}", environment="test")

        async def setup(kind: str, params: dict[str, object]) -> str:
            conn = await asyncpg.connect(url)
            try:
                if kind == "train":
                    async with conn.transaction():
                        await upsert_bars(conn, symbol, tf, bars, np.zeros(len(bars), dtype=np.int16))
                job_id = uuid.uuid4().hex
                await repo.create_job(conn, job_id, kind, symbol, tf.value, params)
                return job_id
            finally:
                await conn.close()

        t0 = time.perf_counter()
        trained = run_job(asyncio.run(setup("train", {})), settings=settings, retry=False)
        print(f"trained {trained.get('version')} in {time.perf_counter() - t0:.0f} s")
        t1 = time.perf_counter()
        params: dict[str, object] = {"folds": args.folds, "model_version": trained["version"]}
        validated = run_job(asyncio.run(setup("validate", params)), settings=settings, retry=False)
        print(f"validated in {time.perf_counter() - t1:.0f} s: gate {validated.get('gate')}")

        async def stored() -> tuple[object, dict[str, object]]:
            conn = await asyncpg.connect(url)
            try:
                version = await repo.find_version(conn, symbol, tf.value, trained["version"])
                report = await repo.get_validation(conn, int(validated["validation_id"]))
            finally:
                await conn.close()
            assert version is not None
            assert report is not None
            return version, report

        version, report = asyncio.run(stored())
        footer = (
            "Reproduce: `make quality-report` (scripts/model_quality_report.py: the sample bars stored in a scratch "
            "database, the first model trained with the default recipe, then validated with "
            f"{args.folds} folds; fixed seeds)."
        )
        for path in write_report(version, report, args.out, footer):  # type: ignore[arg-type]
            print(f"wrote {path}")
    del handle


if __name__ == "__main__":
    main()
