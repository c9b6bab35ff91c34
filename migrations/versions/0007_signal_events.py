"""Signal events: every bar-close signal the stream published, kept for Last-Event-ID resume.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per shared stream event (docs/STREAMING.md, "Resume"), written by the replica that computed it
    # before the event goes to Redis. Redis is the live fan-out only; a resume reads its backlog here, so a
    # Redis that restarted empty loses nothing. Rows older than STREAM_REPLAY_HOURS are deleted by the
    # predictors' stream loop.
    op.execute(
        """
        CREATE TABLE signal_events (
            prediction_id uuid PRIMARY KEY,
            symbol        text NOT NULL,
            timeframe     text NOT NULL,
            bar_ts        timestamptz NOT NULL,
            variant       text NOT NULL,
            -- the exact bytes sent as the SSE `data` (the prediction JSON)
            body          bytea NOT NULL,
            -- set under the stream's publish lock: commit order of the rows is the order of the Redis stream
            created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
            -- one shared signal per bar and variant, even when a Redis lease was lost with a Redis restart
            UNIQUE (symbol, timeframe, bar_ts, variant)
        )
        """
    )
    # The resume: one series' events after a point in time, in publish order.
    op.execute("CREATE INDEX signal_events_series ON signal_events (symbol, timeframe, created_at, prediction_id)")
    # The prune of rows past the replay window.
    op.execute("CREATE INDEX signal_events_created ON signal_events (created_at)")


def downgrade() -> None:
    op.execute("DROP TABLE signal_events")
