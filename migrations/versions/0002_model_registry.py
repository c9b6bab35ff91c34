"""Model registry, training jobs, retrain decisions and per-series model flags.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE training_jobs (
            id          text PRIMARY KEY,
            kind        text NOT NULL CHECK (kind IN ('train', 'auto_retrain', 'full_retrain')),
            symbol      text,
            timeframe   text,
            params      jsonb NOT NULL DEFAULT '{}'::jsonb,
            status      text NOT NULL DEFAULT 'queued'
                        CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
            progress    double precision NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
            -- one entry per finished epoch: {"epoch", "loss", "val_loss", "accuracy", "val_accuracy"}
            history     jsonb NOT NULL DEFAULT '[]'::jsonb,
            result      jsonb,
            error       text,
            -- deliveries that started work; bounded by TRAINER_MAX_ATTEMPTS
            attempts    integer NOT NULL DEFAULT 0,
            created_at  timestamptz NOT NULL DEFAULT now(),
            started_at  timestamptz,
            finished_at timestamptz,
            updated_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX training_jobs_created_at ON training_jobs (created_at DESC)")
    # At most one queued or running job per series: concurrent schedule runs or a second POST /v1/jobs cannot
    # queue duplicates (the insert fails; the API answers 409). Also serves the sweeper's scan.
    op.execute(
        "CREATE UNIQUE INDEX training_jobs_one_active ON training_jobs (symbol, timeframe) "
        "WHERE status IN ('queued', 'running')"
    )
    op.execute(
        """
        CREATE TABLE model_versions (
            id              bigserial PRIMARY KEY,
            symbol          text NOT NULL,
            timeframe       text NOT NULL,
            version         text NOT NULL,
            status          text NOT NULL CHECK (status IN ('candidate', 'production', 'archived', 'failed')),
            metrics         jsonb NOT NULL DEFAULT '{}'::jsonb,
            -- the version's prefix, e.g. s3://bucket/models/EURUSD/H1/20261126T041500Z-<32-hex job id>/
            artifact_uri    text NOT NULL,
            -- sha256 of metadata.json; metadata.json holds the sha256 of every other artifact
            sha256          text NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now(),
            training_job_id text UNIQUE,
            UNIQUE (symbol, timeframe, version)
        )
        """
    )
    op.execute(
        "CREATE UNIQUE INDEX model_versions_one_production ON model_versions (symbol, timeframe) "
        "WHERE status = 'production'"
    )
    op.execute("CREATE INDEX model_versions_series ON model_versions (symbol, timeframe, created_at DESC)")
    # Readers (the predictor) LISTEN on `model_registry`; the trigger fires on every insert and status change,
    # inside the writing transaction, so a notification is only delivered once the row is committed.
    op.execute(
        """
        CREATE FUNCTION model_versions_notify() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('model_registry', json_build_object(
                'op', lower(TG_OP), 'id', NEW.id, 'symbol', NEW.symbol, 'timeframe', NEW.timeframe,
                'version', NEW.version, 'status', NEW.status,
                'old_status', CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END
            )::text);
            RETURN NEW;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER model_versions_notify_insert AFTER INSERT ON model_versions
        FOR EACH ROW EXECUTE FUNCTION model_versions_notify()
        """
    )
    op.execute(
        """
        CREATE TRIGGER model_versions_notify_status AFTER UPDATE OF status ON model_versions
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION model_versions_notify()
        """
    )
    op.execute(
        """
        CREATE TABLE model_flags (
            symbol          text NOT NULL,
            timeframe       text NOT NULL,
            drift           boolean NOT NULL DEFAULT false,
            performance     boolean NOT NULL DEFAULT false,
            reason          text,
            updated_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (symbol, timeframe)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE retrain_decisions (
            id          bigserial PRIMARY KEY,
            symbol      text NOT NULL,
            timeframe   text NOT NULL,
            decided_at  timestamptz NOT NULL DEFAULT now(),
            retrain     boolean NOT NULL,
            -- machine-readable reasons, e.g. ["model_age", "new_bars", "drift_flag"] or ["up_to_date"]
            reasons     jsonb NOT NULL DEFAULT '[]'::jsonb,
            detail      jsonb NOT NULL DEFAULT '{}'::jsonb,
            -- the scheduling job and the training job it queued, if any
            source_job_id   text,
            training_job_id text
        )
        """
    )
    op.execute("CREATE INDEX retrain_decisions_series ON retrain_decisions (symbol, timeframe, decided_at DESC)")


def downgrade() -> None:
    op.execute("DROP TABLE retrain_decisions")
    op.execute("DROP TABLE model_flags")
    op.execute("DROP TABLE model_versions")
    op.execute("DROP FUNCTION model_versions_notify()")
    op.execute("DROP TABLE training_jobs")
