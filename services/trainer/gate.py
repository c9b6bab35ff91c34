"""The promotion gate's decision rule: pure, on a walk-forward ValidationReport (docs/MODEL_QUALITY_METHOD.md).

A candidate passes when, on the primary metric (log-loss of the calibrated probabilities), it beats the best
baseline and, when the report holds one, the production model retrained on the same folds, each by the
paired test across folds: the 95 % interval of (candidate - other) lies entirely below 0.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from services.trainer.validation import (
    CANDIDATE,
    PRIMARY_METRIC,
    PRODUCTION,
    Comparison,
    ModelScores,
    ValidationReport,
    paired_comparison,
)


class GateDecision(BaseModel):
    gate: Literal["passed", "failed"]
    promote: bool
    reasons: list[str]
    primary_metric: str
    details: dict[str, Any]


def _pooled(model: ModelScores, metric: str) -> float | None:
    return model.pooled.metrics.get(metric)


def best_baseline(report: ValidationReport, metric: str = PRIMARY_METRIC) -> ModelScores | None:
    """The baseline with the lowest pooled value of `metric` (a lower-is-better metric); None if none has it."""
    scored = [m for m in report.models.values() if m.kind == "baseline" and _pooled(m, metric) is not None]
    return min(scored, key=lambda m: float(_pooled(m, metric))) if scored else None  # type: ignore[arg-type]


def _words(c: Comparison, other: str) -> str:
    pooled = (
        f"pooled {c.pooled_model:.4f} against {c.pooled_against:.4f}"
        if c.pooled_model is not None and c.pooled_against is not None
        else "no pooled value"
    )
    if c.ci_high is None or c.ci_low is None or c.mean_difference is None:
        return f"{other}: {pooled}; {c.folds_used} fold(s) with a value, the paired test needs 2"
    return (
        f"{other}: {pooled}; LSTM minus it over {c.folds_used} folds {c.mean_difference:+.4f}, "
        f"95% CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}] (the upper bound must be below 0)"
    )


def _beats(c: Comparison) -> bool:
    return c.ci_high is not None and c.ci_high < 0


def decide(report: ValidationReport, *, has_production: bool) -> GateDecision:
    """Pass or fail the report's LSTM on the primary metric; one reason, with figures, per failed condition.

    `has_production`: the series already serves a production model; the report must then compare the
    candidate with it (walk_forward's compare_cfg), otherwise the gate fails saying so. A passed candidate
    is promoted (a series' first model too: it is production anyway)."""
    metric = PRIMARY_METRIC
    reasons: list[str] = []
    details: dict[str, Any] = {"folds": report.n_folds, "shuffled_labels": report.shuffled_labels}
    if report.shuffled_labels:
        reasons.append("the report was run on shuffled labels (a leakage control), not on the real ones")
    candidate = report.models.get(CANDIDATE)
    if candidate is None:
        reasons.append("the report has no LSTM results (validated with lstm=False): there is nothing to promote")
        return GateDecision(gate="failed", promote=False, reasons=reasons, primary_metric=metric, details=details)

    base = best_baseline(report, metric)
    if base is None:
        reasons.append(f"the report has no baseline with a {metric}: the candidate cannot be judged")
    else:
        c = paired_comparison(candidate, base, metric)
        details["best_baseline"] = base.name
        details["vs_best_baseline"] = c.model_dump(mode="json")
        if not _beats(c):
            reasons.append(f"{metric}: the LSTM does not beat the best baseline, {_words(c, base.label)}")

    production = report.models.get(PRODUCTION)
    if production is not None:
        c = paired_comparison(candidate, production, metric)
        details["vs_production"] = c.model_dump(mode="json")
        if not _beats(c):
            reasons.append(f"{metric}: the LSTM does not beat the production model, {_words(c, production.label)}")
    elif has_production:
        reasons.append(
            "the series has a production model but the report holds no comparison with it: validate with "
            "compare_cfg set to the production model's hyperparameters"
        )
    passed = not reasons
    return GateDecision(
        gate="passed" if passed else "failed",
        promote=passed,
        reasons=reasons,
        primary_metric=metric,
        details=details,
    )
