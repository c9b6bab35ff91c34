"""Prediction log and indicator weights.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every served prediction, cached ones too: written by the predictor in COPY batches.
    op.execute(
        """
        CREATE TABLE predictions (
            id               uuid PRIMARY KEY,
            created_at       timestamptz NOT NULL,
            symbol           text NOT NULL,
            timeframe        text NOT NULL,
            -- open time of the newest bar of the input window
            bar_ts           timestamptz NOT NULL,
            model_version    text NOT NULL,
            variant          text NOT NULL,
            -- sha256(salt || user_id); the raw id is never stored
            user_hash        text,
            window_hash      text NOT NULL,
            -- the raw (unscaled) feature window, row-major, shape feature_shape = {rows, features},
            -- columns in the order of the model version's metadata.feature_names
            features         real[] NOT NULL,
            feature_shape    integer[] NOT NULL,
            -- in the order SELL, HOLD, BUY (shared.model_metadata.CLASSES), calibrated
            probabilities    real[] NOT NULL,
            signal           text NOT NULL CHECK (signal IN ('SELL', 'HOLD', 'BUY')),
            confidence       real NOT NULL,
            consensus_signal text,
            cached           boolean NOT NULL,
            request_id       text
        )
        """
    )
    op.execute("CREATE INDEX predictions_created_at ON predictions (created_at)")
    op.execute("CREATE INDEX predictions_series ON predictions (symbol, timeframe, created_at DESC)")
    # Indicator weights for indicator_score; computed by a later model-quality job. symbol/timeframe '*' is the
    # default for every series. No row at all means equal weights (built into the predictor).
    op.execute(
        """
        CREATE TABLE indicator_weights (
            id         bigserial PRIMARY KEY,
            symbol     text NOT NULL DEFAULT '*',
            timeframe  text NOT NULL DEFAULT '*',
            version    text NOT NULL,
            weights    jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (symbol, timeframe, version)
        )
        """
    )
    op.execute("CREATE INDEX indicator_weights_series ON indicator_weights (symbol, timeframe, created_at DESC)")


def downgrade() -> None:
    op.execute("DROP TABLE indicator_weights")
    op.execute("DROP TABLE predictions")
