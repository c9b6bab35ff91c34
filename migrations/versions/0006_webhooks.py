"""Webhooks for bar-close signals: subscriptions, one claim per published event, every delivery attempt.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE webhooks (
            id             bigserial PRIMARY KEY,
            -- http(s) only; the target address is checked when created and again at every delivery
            url            text NOT NULL CHECK (url ~* '^https?://'),
            -- "SYMBOL:TIMEFRAME" entries, e.g. {EURUSD:H1}
            series         text[] NOT NULL CHECK (cardinality(series) > 0),
            -- the HMAC-SHA256 key of X-AICash-Signature; never returned after creation
            secret         text NOT NULL CHECK (length(secret) >= 16),
            created_by     text NOT NULL,
            created_at     timestamptz NOT NULL DEFAULT now(),
            updated_at     timestamptz NOT NULL DEFAULT now(),
            paused         boolean NOT NULL DEFAULT false,
            paused_reason  text,
            paused_at      timestamptz,
            -- consecutive failed deliveries (every retry spent); reset by a delivered event and by unpausing
            failures       integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
            last_success_at timestamptz,
            last_failure_at timestamptz
        )
        """
    )
    # The dispatcher's lookup: active webhooks subscribed to one series.
    op.execute("CREATE INDEX webhooks_series ON webhooks USING gin (series) WHERE NOT paused")
    # Every predictor replica sees every published event; the one that inserts this row enqueues the deliveries.
    op.execute(
        """
        CREATE TABLE webhook_dispatches (
            prediction_id uuid PRIMARY KEY,
            symbol        text NOT NULL,
            timeframe     text NOT NULL,
            webhooks      integer NOT NULL,
            dispatched_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX webhook_dispatches_at ON webhook_dispatches (dispatched_at)")
    op.execute(
        """
        CREATE TABLE webhook_deliveries (
            id            bigserial PRIMARY KEY,
            webhook_id    bigint NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
            prediction_id uuid NOT NULL,
            -- 1 for the first try, then one more per retry
            attempt       integer NOT NULL CHECK (attempt >= 1),
            -- delivered: a 2xx answer; failed: an error or another status, retried; gave_up: the last retry
            -- failed; refused: the target's address broke the SSRF rule at delivery time (never retried)
            status        text NOT NULL CHECK (status IN ('delivered', 'failed', 'gave_up', 'refused')),
            http_status   integer,
            error         text,
            duration_ms   double precision,
            at            timestamptz NOT NULL DEFAULT now(),
            -- a redelivered Celery message records (and sends) an attempt once
            UNIQUE (webhook_id, prediction_id, attempt)
        )
        """
    )
    op.execute("CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, at DESC)")
    op.execute("CREATE INDEX webhook_deliveries_at ON webhook_deliveries USING brin (at)")


def downgrade() -> None:
    op.execute("DROP TABLE webhook_deliveries")
    op.execute("DROP TABLE webhook_dispatches")
    op.execute("DROP TABLE webhooks")
