"""Model lifecycle: rollouts (A/B split, test group, symbol rollout, shadow), production history for rollback,
settled outcomes per (model version, variant, bar), external outcomes, rollout evaluations, feature drift and
an append-only audit trail.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # When a version started and stopped serving as production: rollback goes back to the newest version that
    # served before the current one and was not itself rolled back. Kept by a trigger, so every path that
    # changes `status` (registration, the gate, an admin, the automatic decision) records it.
    op.execute("ALTER TABLE model_versions ADD COLUMN promoted_at timestamptz")
    op.execute("ALTER TABLE model_versions ADD COLUMN retired_at timestamptz")
    op.execute("ALTER TABLE model_versions ADD COLUMN rolled_back_at timestamptz")
    op.execute("UPDATE model_versions SET promoted_at = created_at WHERE status = 'production'")
    op.execute(
        """
        CREATE FUNCTION model_versions_production_history() RETURNS trigger AS $$
        BEGIN
            IF NEW.status = 'production' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'production') THEN
                NEW.promoted_at := clock_timestamp();
                NEW.retired_at := NULL;
            ELSIF TG_OP = 'UPDATE' AND OLD.status = 'production' AND NEW.status <> 'production' THEN
                NEW.retired_at := clock_timestamp();
            END IF;
            RETURN NEW;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER model_versions_production_history BEFORE INSERT OR UPDATE OF status ON model_versions
        FOR EACH ROW EXECUTE FUNCTION model_versions_production_history()
        """
    )
    # One row per series that has ever had a rollout setting; no row means the defaults (LIFECYCLE_* settings).
    op.execute(
        """
        CREATE TABLE rollouts (
            symbol                    text NOT NULL,
            timeframe                 text NOT NULL,
            -- what a version that passes the gate does: direct (replaces production), canary (becomes the
            -- candidate at candidate_traffic_percent, judged live) or manual (stays a candidate for an admin)
            policy                    text NOT NULL DEFAULT 'canary' CHECK (policy IN ('direct', 'canary', 'manual')),
            candidate_model_id        bigint REFERENCES model_versions (id),
            candidate_traffic_percent double precision NOT NULL DEFAULT 0
                                      CHECK (candidate_traffic_percent >= 0 AND candidate_traffic_percent <= 100),
            -- raw user ids as an admin entered them: each always gets the candidate
            test_group_user_ids       text[] NOT NULL DEFAULT '{}',
            -- symbols whose every request gets the candidate of their series
            rollout_symbols           text[] NOT NULL DEFAULT '{}',
            -- the candidate also scores production traffic off the response path (logged as variant shadow)
            shadow                    boolean NOT NULL DEFAULT false,
            updated_at                timestamptz NOT NULL DEFAULT now(),
            updated_by                text,
            PRIMARY KEY (symbol, timeframe)
        )
        """
    )
    # Predictors LISTEN on model_registry already: a rollout change wakes them like a registry change.
    op.execute(
        """
        CREATE FUNCTION rollouts_notify() RETURNS trigger AS $$
        DECLARE r record;
        BEGIN
            IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
            PERFORM pg_notify('model_registry', json_build_object(
                'op', 'rollout_' || lower(TG_OP), 'symbol', r.symbol, 'timeframe', r.timeframe
            )::text);
            RETURN NULL;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER rollouts_notify AFTER INSERT OR UPDATE OR DELETE ON rollouts
        FOR EACH ROW EXECUTE FUNCTION rollouts_notify()
        """
    )
    # One settled outcome per (model version, variant, bar): a bar asked for by many clients counts once.
    op.execute(
        """
        CREATE TABLE bar_outcomes (
            symbol              text NOT NULL,
            timeframe           text NOT NULL,
            model_version       text NOT NULL,
            variant             text NOT NULL CHECK (variant IN ('production', 'candidate', 'shadow')),
            -- open time of the bar the prediction was made on (its newest input bar)
            bar_ts              timestamptz NOT NULL,
            -- the earliest logged prediction of this version, variant and bar: the one settled
            prediction_id       uuid NOT NULL,
            probabilities       real[] NOT NULL,
            signal              text NOT NULL CHECK (signal IN ('SELL', 'HOLD', 'BUY')),
            confidence          real NOT NULL,
            horizon             integer NOT NULL,
            -- ln(close[t + horizon] / close[t])
            realised_log_return double precision NOT NULL,
            -- the model's own label rule on the realised return (SELL, HOLD, BUY)
            realised_label      text NOT NULL CHECK (realised_label IN ('SELL', 'HOLD', 'BUY')),
            hit                 boolean NOT NULL,
            -- log return of following the signal (long BUY, short SELL, flat HOLD) from the next bar's open to
            -- the horizon bar's close, after the backtester's round-trip costs
            pnl                 double precision NOT NULL,
            settled_at          timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (symbol, timeframe, model_version, variant, bar_ts)
        )
        """
    )
    op.execute("CREATE INDEX bar_outcomes_series ON bar_outcomes (symbol, timeframe, bar_ts)")
    op.execute("CREATE UNIQUE INDEX bar_outcomes_prediction ON bar_outcomes (prediction_id)")
    # Results a client reports for one prediction (e.g. a trade's PnL): POST /v1/outcomes, idempotent.
    op.execute(
        """
        CREATE TABLE external_outcomes (
            prediction_id uuid PRIMARY KEY,
            pnl           double precision,
            detail        jsonb NOT NULL DEFAULT '{}'::jsonb,
            recorded_by   text NOT NULL,
            recorded_at   timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # Every run of the automatic decision on a series with a candidate, whatever it decided.
    op.execute(
        """
        CREATE TABLE rollout_evaluations (
            id                 bigserial PRIMARY KEY,
            symbol             text NOT NULL,
            timeframe          text NOT NULL,
            candidate_version  text NOT NULL,
            production_version text NOT NULL,
            decision           text NOT NULL CHECK (decision IN ('promote', 'rollback', 'continue', 'insufficient')),
            pairs              integer NOT NULL,
            evidence           jsonb NOT NULL,
            evaluated_at       timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX rollout_evaluations_series ON rollout_evaluations (symbol, timeframe, evaluated_at DESC)")
    # Drift checks: one row per feature per check.
    op.execute(
        """
        CREATE TABLE feature_drift (
            id            bigserial PRIMARY KEY,
            symbol        text NOT NULL,
            timeframe     text NOT NULL,
            model_version text NOT NULL,
            feature       text NOT NULL,
            psi           double precision NOT NULL,
            ks            double precision NOT NULL,
            live_bars     integer NOT NULL,
            window_start  timestamptz,
            window_end    timestamptz,
            drifted       boolean NOT NULL,
            computed_at   timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX feature_drift_series ON feature_drift (symbol, timeframe, computed_at DESC)")
    # The audit trail: every admin action and automatic decision, written in the transaction of the change.
    op.execute(
        """
        CREATE TABLE audit_log (
            id         bigserial PRIMARY KEY,
            at         timestamptz NOT NULL DEFAULT clock_timestamp(),
            -- the API key id of the caller, or 'system' for an automatic decision
            actor      text NOT NULL,
            -- e.g. model.promote, model.rollback, rollout.update, job.create, outcome.record, rollout.decision
            action     text NOT NULL,
            symbol     text,
            timeframe  text,
            -- what the action was about, e.g. 'model_version:12', 'prediction:<uuid>'
            target     text,
            before     jsonb,
            after      jsonb,
            evidence   jsonb,
            request_id text
        )
        """
    )
    op.execute("CREATE INDEX audit_log_at ON audit_log (at DESC)")
    op.execute("CREATE INDEX audit_log_series ON audit_log (symbol, timeframe, at DESC)")
    # Append-only for every role, the owner and superusers included (privileges would not bind them).
    op.execute(
        """
        CREATE FUNCTION audit_log_append_only() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
        FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()
        """
    )
    op.execute(
        """
        CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
        FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE audit_log")
    op.execute("DROP FUNCTION audit_log_append_only()")
    op.execute("DROP TABLE feature_drift")
    op.execute("DROP TABLE rollout_evaluations")
    op.execute("DROP TABLE external_outcomes")
    op.execute("DROP TABLE bar_outcomes")
    op.execute("DROP TABLE rollouts")
    op.execute("DROP FUNCTION rollouts_notify()")
    op.execute("DROP TRIGGER model_versions_production_history ON model_versions")
    op.execute("DROP FUNCTION model_versions_production_history()")
    op.execute("ALTER TABLE model_versions DROP COLUMN rolled_back_at")
    op.execute("ALTER TABLE model_versions DROP COLUMN retired_at")
    op.execute("ALTER TABLE model_versions DROP COLUMN promoted_at")
