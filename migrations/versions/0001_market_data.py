"""Market data: bars and per-series bookkeeping.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE bars (
            symbol    text NOT NULL,
            timeframe text NOT NULL,
            ts        timestamptz NOT NULL,
            open      double precision NOT NULL,
            high      double precision NOT NULL,
            low       double precision NOT NULL,
            close     double precision NOT NULL,
            volume    double precision NOT NULL,
            -- data-quality flags, a bit mask: 1 = move beyond N recent sigmas, 2 = gap before this bar
            flags     smallint NOT NULL DEFAULT 0,
            PRIMARY KEY (symbol, timeframe, ts)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE series (
            symbol     text NOT NULL,
            timeframe  text NOT NULL,
            first_ts   timestamptz NOT NULL,
            last_ts    timestamptz NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (symbol, timeframe)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE series")
    op.execute("DROP TABLE bars")
