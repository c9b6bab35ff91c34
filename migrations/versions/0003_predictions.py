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
    # Each feature window once, keyed by its hash: a window is served many times (cached predictions, repeated
    # inputs) and is 340 floats; storing it per prediction made the log the largest cost of a cached request.
    op.execute(
        """
        CREATE TABLE prediction_windows (
            -- sha256 of the float32 window bytes and its shape
            window_hash   text PRIMARY KEY,
            -- first written; retention deletes windows older than it that no prediction references any more
            created_at    timestamptz NOT NULL,
            -- the raw (unscaled) feature window, row-major, shape feature_shape = {rows, features},
            -- columns in the order of the model version's metadata.feature_names
            features      real[] NOT NULL,
            feature_shape integer[] NOT NULL
        )
        """
    )
    op.execute("CREATE INDEX prediction_windows_created_at ON prediction_windows (created_at)")
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
            -- the input window, in prediction_windows (no foreign key: each batch writes its windows first in
            -- the same transaction, and the key check would cost every row of the log)
            window_hash      text NOT NULL,
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
    # Rows arrive in time order: a BRIN index serves the retention delete's time range for a fraction of a
    # B-tree's upkeep on every insert.
    op.execute("CREATE INDEX predictions_created_at ON predictions USING brin (created_at)")
    op.execute("CREATE INDEX predictions_series ON predictions (symbol, timeframe, created_at DESC)")
    # Window retention asks whether any prediction still references a window.
    op.execute("CREATE INDEX predictions_window_hash ON predictions (window_hash)")
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
    op.execute("DROP TABLE prediction_windows")
