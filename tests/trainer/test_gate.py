"""The promotion gate's rule on reports with known per-fold log-losses (the rule is pure)."""

from __future__ import annotations

import numpy as np
import pytest

from services.trainer.gate import GateDecision, best_baseline, decide
from services.trainer.validation import LABELS_OF, ModelKind, ModelScores, Scores, ValidationReport

BASELINE_LL = {
    "prior": [1.09, 1.10, 1.10, 1.09, 1.10],
    "logistic_regression": [1.02, 1.05, 1.03, 1.04, 1.03],
    "gradient_boosting": [1.04, 1.06, 1.05, 1.05, 1.04],
}


def _scores(ll: float | None) -> Scores:
    return Scores(sequences=200, metrics={"log_loss": ll, "accuracy": 0.5}, confusion=[[0] * 3] * 3)


def _model(name: str, kind: ModelKind, lls: list[float] | None) -> ModelScores:
    folds = [_scores(v) for v in lls] if lls is not None else [_scores(None)] * 5
    pooled = _scores(float(np.mean(lls)) if lls is not None else None)
    return ModelScores(name=name, label=LABELS_OF[name], kind=kind, folds=folds, pooled=pooled)


def _report(
    lstm: list[float] | None, production: list[float] | None = None, **baselines: list[float]
) -> ValidationReport:
    models = {"majority": _model("majority", "baseline", None)}
    for name, lls in (BASELINE_LL | baselines).items():
        models[name] = _model(name, "baseline", lls)
    if lstm is not None:
        models["lstm"] = _model("lstm", "candidate", lstm)
    if production is not None:
        models["production"] = _model("production", "production", production)
    return ValidationReport(
        symbol="EURUSD",
        timeframe="H1",
        base_timeframe="H1",
        bars=10_000,
        data_start="2020-01-01T00:00:00Z",
        data_end="2021-01-01T00:00:00Z",
        n_folds=5,
        purge_gap=21,
        usable_sequences=9000,
        folds=[],
        config={},
        seeds={"lstm": 42},
        models=models,
    )


BETTER = [0.98, 1.00, 0.99, 0.99, 0.98]  # 0.04-0.05 below the best baseline in every fold
WORSE = [1.08, 1.10, 1.09, 1.09, 1.08]
EQUAL = [1.03, 1.04, 1.02, 1.05, 1.03]  # the best baseline's figures give or take 0.01


def test_the_best_baseline_is_the_lowest_pooled_log_loss() -> None:
    best = best_baseline(_report(BETTER))
    assert best is not None and best.name == "logistic_regression"  # majority has no log-loss: never chosen


def test_a_better_candidate_passes_and_is_promoted() -> None:
    d = decide(_report(BETTER), has_production=False)
    assert (d.gate, d.promote, d.reasons, d.primary_metric) == ("passed", True, [], "log_loss")
    assert d.details["best_baseline"] == "logistic_regression"
    assert d.details["vs_best_baseline"]["ci_high"] < 0


@pytest.mark.parametrize("lstm", [WORSE, EQUAL])
def test_a_worse_or_equal_candidate_fails_with_figures(lstm: list[float]) -> None:
    d = decide(_report(lstm), has_production=False)
    assert (d.gate, d.promote) == ("failed", False)
    assert len(d.reasons) == 1
    reason = d.reasons[0]
    assert "does not beat the best baseline, logistic regression" in reason
    assert f"pooled {np.mean(lstm):.4f} against {np.mean(BASELINE_LL['logistic_regression']):.4f}" in reason
    assert "95% CI [" in reason and "upper bound must be below 0" in reason


def test_a_candidate_must_also_beat_the_production_model_when_compared() -> None:
    ok = decide(_report(BETTER, production=[1.01, 1.04, 1.02, 1.03, 1.02]), has_production=True)
    assert ok.gate == "passed" and ok.details["vs_production"]["verdict"] == "beats"
    d = decide(_report(BETTER, production=[0.97, 0.99, 0.98, 0.98, 0.97]), has_production=True)
    assert d.gate == "failed" and len(d.reasons) == 1 and "does not beat the production model" in d.reasons[0]
    both = decide(_report(WORSE, production=BETTER), has_production=True)
    assert len(both.reasons) == 2  # one reason per failed condition


def test_a_series_with_production_needs_the_comparison_in_the_report() -> None:
    d = decide(_report(BETTER), has_production=True)
    assert d.gate == "failed" and "compare_cfg" in d.reasons[0]
    assert decide(_report(BETTER), has_production=False).gate == "passed"


def test_a_report_without_the_lstm_promotes_nothing() -> None:
    d = decide(_report(None), has_production=False)
    assert isinstance(d, GateDecision) and d.gate == "failed" and "lstm=False" in d.reasons[0]


def test_shuffled_label_reports_never_pass() -> None:
    r = _report(BETTER).model_copy(update={"shuffled_labels": True})
    d = decide(r, has_production=False)
    assert d.gate == "failed" and "shuffled labels" in d.reasons[0]
