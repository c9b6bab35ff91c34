"""Model quality: walk-forward validation reports, backtests, the promotion gate's verdict on each version,
versioned indicator weights with their inputs, and per-prediction explanations.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The verdict a version carries until a validation has judged it (docs/MODEL_QUALITY.md).
NOT_VALIDATED = """'{"gate": "not_validated", "reasons": ["no walk-forward validation has run for this version"], "validation_id": null}'::jsonb"""  # noqa: E501


def upgrade() -> None:
    op.execute("ALTER TABLE training_jobs DROP CONSTRAINT training_jobs_kind_check")
    op.execute(
        "ALTER TABLE training_jobs ADD CONSTRAINT training_jobs_kind_check CHECK (kind IN "
        "('train', 'auto_retrain', 'full_retrain', 'validate', 'backtest', 'optimize_weights'))"
    )
    # One queued or running job per series *and kind*: a validation may run while the series trains.
    op.execute("DROP INDEX training_jobs_one_active")
    op.execute(
        "CREATE UNIQUE INDEX training_jobs_one_active ON training_jobs (symbol, timeframe, kind) "
        "WHERE status IN ('queued', 'running')"
    )
    # {"gate": "passed" | "failed" | "not_validated", "reasons": [...], "validation_id": id | null}
    op.execute(f"ALTER TABLE model_versions ADD COLUMN quality jsonb NOT NULL DEFAULT {NOT_VALIDATED}")
    # Readers also hear of a new verdict (the predictor serves it with every prediction).
    op.execute("DROP TRIGGER model_versions_notify_status ON model_versions")
    op.execute(
        """
        CREATE TRIGGER model_versions_notify_status AFTER UPDATE OF status, quality ON model_versions
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.quality IS DISTINCT FROM NEW.quality)
        EXECUTE FUNCTION model_versions_notify()
        """
    )
    op.execute(
        """
        CREATE TABLE validation_reports (
            id               bigserial PRIMARY KEY,
            model_version_id bigint REFERENCES model_versions (id) ON DELETE CASCADE,
            symbol           text NOT NULL,
            timeframe        text NOT NULL,
            job_id           text UNIQUE,
            folds            integer NOT NULL,
            -- first bar whose features enter a training sequence .. last bar whose close enters a test label
            data_start       timestamptz NOT NULL,
            data_end         timestamptz NOT NULL,
            -- the whole report (services.trainer.validation.ValidationReport): folds, metrics, baselines,
            -- comparisons, business targets
            report           jsonb NOT NULL,
            created_at       timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX validation_reports_version ON validation_reports (model_version_id, created_at DESC)")
    op.execute(
        """
        CREATE TABLE backtests (
            id               bigserial PRIMARY KEY,
            model_version_id bigint REFERENCES model_versions (id) ON DELETE CASCADE,
            symbol           text NOT NULL,
            timeframe        text NOT NULL,
            job_id           text UNIQUE,
            -- costs, sizing, stops, signal source
            params           jsonb NOT NULL,
            metrics          jsonb NOT NULL,
            trades           jsonb NOT NULL,
            -- {"ts": [...], "equity": [...], "drawdown": [...]} (downsampled to at most 2,000 points)
            equity           jsonb NOT NULL,
            data_start       timestamptz NOT NULL,
            data_end         timestamptz NOT NULL,
            created_at       timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX backtests_series ON backtests (symbol, timeframe, created_at DESC)")
    # Weights become versioned results of the optimiser: how they were computed and from what.
    op.execute(
        """
        ALTER TABLE indicator_weights
            ADD COLUMN method           text NOT NULL DEFAULT 'manual',
            ADD COLUMN model_version_id bigint REFERENCES model_versions (id) ON DELETE SET NULL,
            ADD COLUMN inputs           jsonb NOT NULL DEFAULT '{}'::jsonb,
            ADD COLUMN data_start       timestamptz,
            ADD COLUMN data_end         timestamptz
        """
    )
    op.execute(
        """
        CREATE TABLE prediction_explanations (
            prediction_id  uuid PRIMARY KEY,
            status         text NOT NULL DEFAULT 'queued'
                           CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
            model_version  text,
            -- [{"feature", "step", "value", "contribution"}], largest |contribution| first; step 0 = newest bar
            contributions  jsonb,
            -- class explained, base value, method
            detail         jsonb NOT NULL DEFAULT '{}'::jsonb,
            error          text,
            attempts       integer NOT NULL DEFAULT 0,
            created_at     timestamptz NOT NULL DEFAULT now(),
            finished_at    timestamptz
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE prediction_explanations")
    op.execute(
        "ALTER TABLE indicator_weights DROP COLUMN method, DROP COLUMN model_version_id, DROP COLUMN inputs, "
        "DROP COLUMN data_start, DROP COLUMN data_end"
    )
    op.execute("DROP TABLE backtests")
    op.execute("DROP TABLE validation_reports")
    op.execute("DROP TRIGGER model_versions_notify_status ON model_versions")
    op.execute(
        """
        CREATE TRIGGER model_versions_notify_status AFTER UPDATE OF status ON model_versions
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION model_versions_notify()
        """
    )
    op.execute("ALTER TABLE model_versions DROP COLUMN quality")
    op.execute("DROP INDEX training_jobs_one_active")
    op.execute(
        "CREATE UNIQUE INDEX training_jobs_one_active ON training_jobs (symbol, timeframe) "
        "WHERE status IN ('queued', 'running')"
    )
    op.execute("ALTER TABLE training_jobs DROP CONSTRAINT training_jobs_kind_check")
    op.execute(
        "ALTER TABLE training_jobs ADD CONSTRAINT training_jobs_kind_check CHECK (kind IN "
        "('train', 'auto_retrain', 'full_retrain'))"
    )
