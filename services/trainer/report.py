"""Rendering stored quality results for people: rich tables for the CLI, Markdown for `aicash report`, PNGs.

Everything here reads the stored JSON (a validation report, a backtest row, a weights row), never recomputes:
what a person reads is exactly what the API serves. matplotlib is imported inside the plotting functions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from services.trainer.schemas import ModelVersion

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "brier")
BACKTEST_METRICS = ("total_return", "sharpe", "max_drawdown", "win_rate", "profit_factor", "trades")


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)


def _models(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return list(report.get("models", {}).items())


def headline(report: dict[str, Any]) -> list[str]:
    """The comparisons on the primary metric, one sentence each (what the gate read)."""
    primary = report.get("primary_metric", "log_loss")
    return [c["summary"] for c in report.get("comparisons", []) if c.get("metric") == primary and c.get("summary")]


def render_validation(report: dict[str, Any]) -> Table:
    """Pooled out-of-sample metrics of the LSTM and every baseline, side by side."""
    table = Table(
        "model",
        *METRICS,
        *BACKTEST_METRICS,
        title=f"walk-forward {report.get('symbol')} {report.get('timeframe')}: {report.get('n_folds')} folds, "
        f"{report.get('data_start')} .. {report.get('data_end')} (out of sample, pooled)",
    )
    for _name, m in _models(report):
        pooled = m["pooled"]
        table.add_row(
            m.get("label", _name),
            *[_f(pooled["metrics"].get(k)) for k in METRICS],
            *[_f(pooled.get("backtest", {}).get(k)) for k in BACKTEST_METRICS],
        )
    return table


def render_targets(targets: list[dict[str, Any]]) -> Table:
    table = Table("business target", "value", "threshold", "passed", title="design targets (out of sample)")
    for t in targets:
        table.add_row(
            t["name"],
            _f(t.get("value")),
            f"{t['comparison']} {t['threshold']:g}",
            "[green]pass[/]" if t["passed"] else "[red]fail[/]",
        )
    return table


def render_metrics(metrics: dict[str, Any], title: str) -> Table:
    table = Table("metric", "value", title=title)
    for k, v in metrics.items():
        table.add_row(k, _f(v))
    return table


def render_weights(row: dict[str, Any]) -> Table:
    inputs = row.get("inputs", {})
    imp = inputs.get("importances", {})
    hits = inputs.get("hit_rates", {})
    table = Table(
        "indicator", "weight", "SHAP importance", "hit rate", title=f"weights {row['version']} ({row['method']})"
    )
    for name, w in sorted(row["weights"].items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{w:.4f}", _f(imp.get(name), 5), _f(hits.get(name), 3))
    return table


# --- PNGs ----------------------------------------------------------------------------------------------------


def _png(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _when(t: Any) -> datetime:
    if isinstance(t, str):
        return datetime.fromisoformat(t.replace("Z", "+00:00"))
    return datetime.fromtimestamp(float(t), UTC)


def equity_png(ts: list[Any], equity: list[float], drawdown: list[float], title: str, benchmark: Any = None) -> bytes:
    """Equity curve with the drawdown underneath (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [_when(t) for t in ts]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot(x, equity, lw=1.2, label="strategy")
    if benchmark is not None:
        top.plot(x, benchmark, lw=0.8, alpha=0.6, label="buy and hold")
        top.legend(loc="upper left")
    top.set_ylabel("equity (start = 1)")
    top.set_title(title)
    top.grid(alpha=0.3)
    bottom.fill_between(x, np.asarray(drawdown, dtype=float) * 100.0, 0.0, color="tab:red", alpha=0.4)
    bottom.set_ylabel("drawdown %")
    bottom.grid(alpha=0.3)
    return _png(fig)


def stored_equity_png(backtest: dict[str, Any], title: str) -> bytes:
    eq = backtest["equity"]
    return equity_png(eq["ts"], eq["equity"], eq["drawdown"], title)


def plot_stored_weights(row: dict[str, Any]) -> bytes:
    """Bars of a stored weights version and the correlation matrix it was computed with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(row["weights"])
    weights = [row["weights"][n] for n in names]
    corr = row.get("inputs", {}).get("correlation")
    fig, axes = plt.subplots(1, 2 if corr else 1, figsize=(13 if corr else 7, 5.5), squeeze=False)
    ax = axes[0][0]
    order = np.argsort(weights)
    ax.barh([names[i] for i in order], [weights[i] for i in order], color="tab:blue")
    ax.set_xlabel("weight")
    ax.set_title(f"indicator weights {row['version']}\n{row['method']}", fontsize=9)
    if corr:
        ax2 = axes[0][1]
        im = ax2.imshow(np.asarray(corr, dtype=float), vmin=-1, vmax=1, cmap="RdBu_r")
        labels = row["inputs"].get("feature_names", names)
        ax2.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax2.set_yticks(range(len(labels)), labels, fontsize=7)
        ax2.set_title("feature correlation (held-out rows)", fontsize=9)
        fig.colorbar(im, ax=ax2, shrink=0.8)
    return _png(fig)


# --- the Markdown report -------------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(version: ModelVersion, stored: dict[str, Any], image_name: str | None, footer: str = "") -> str:
    """The model-quality report of one stored validation, as Markdown."""
    r = stored["report"]
    gate = r.get("gate", {})
    out = [
        f"# Model quality: {r['symbol']} {r['timeframe']}",
        "",
        f"Written by `aicash report` from validation report {stored['id']} (stored {stored['created_at']}) of model "
        f"version `{version.version}` (registry id {version.id}, status `{version.status}`). Every figure below is "
        "out of sample: each of the walk-forward folds retrains the model's recipe from scratch on the bars before "
        "its test block (purge + embargo gap of "
        f"{r.get('purge_gap')} sequences), see `docs/MODEL_QUALITY_METHOD.md`.",
        "",
        f"- data: {r.get('bars')} {r['timeframe']} bars (from {r.get('base_timeframe')}), "
        f"{r.get('data_start')} .. {r.get('data_end')}; {r.get('usable_sequences')} usable sequences",
        f"- seeds: {r.get('seeds')}; recipe: `{r.get('config')}`",
        f"- primary metric: {r.get('primary_metric')}; gate: **{gate.get('gate', version.quality.gate)}**",
        "",
    ]
    out += [f"  - {reason}" for reason in gate.get("reasons", version.quality.reasons)]
    lstm = r["models"].get("lstm") or next(iter(r["models"].values()))
    out += ["", "## Walk-forward folds (LSTM)", ""]
    rows = []
    for info, scores in zip(r.get("folds", []), lstm["folds"], strict=False):
        t = info["test"]
        rows.append(
            [
                str(info["fold"]),
                f"{t['start']} .. {t['end']}",
                str(t["sequences"]),
                *[_f(scores["metrics"].get(k)) for k in METRICS],
                *[_f(scores.get("backtest", {}).get(k)) for k in ("total_return", "sharpe")],
            ]
        )
    out.append(_md_table(["fold", "test bars", "n", *METRICS, "return", "Sharpe"], rows))
    out += ["", "## LSTM against the baselines (pooled over folds)", ""]
    out.append(
        _md_table(
            ["model", *METRICS, *BACKTEST_METRICS],
            [
                [m.get("label", name), *[_f(m["pooled"]["metrics"].get(k)) for k in METRICS]]
                + [_f(m["pooled"].get("backtest", {}).get(k)) for k in BACKTEST_METRICS]
                for name, m in _models(r)
            ],
        )
    )
    out += [
        "",
        "Paired comparisons across folds (difference = LSTM minus the other; 95 % Student-t interval of "
        "the per-fold differences, paired t-test p-value):",
        "",
    ]
    out.append(
        _md_table(
            ["metric", "against", "pooled difference", "95% CI", "p", "verdict"],
            [
                [
                    c["metric"],
                    c["against"],
                    _f(c.get("pooled_difference")),
                    f"[{_f(c.get('ci_low'))}, {_f(c.get('ci_high'))}]",
                    _f(c.get("p_value"), 3),
                    c["verdict"],
                ]
                for c in r.get("comparisons", [])
            ],
        )
    )
    out += ["", "## Business targets (the design's), out of sample", ""]
    out.append(
        _md_table(
            ["target", "value", "threshold", "result"],
            [
                [
                    t["name"],
                    _f(t.get("value")),
                    f"{t['comparison']} {t['threshold']:g}",
                    "pass" if t["passed"] else "FAIL",
                ]
                for t in r.get("business_targets", [])
            ],
        )
    )
    if image_name:
        out += [
            "",
            "## Equity curve of following the LSTM's signals (test blocks, pooled)",
            "",
            f"![equity]({image_name})",
        ]
    out += ["", f"Backtest settings: `{r.get('backtest_params')}`.", ""]
    if footer:
        out += [footer, ""]
    return "\n".join(out)


def write_report(version: ModelVersion, stored: dict[str, Any], out: Path, footer: str = "") -> list[Path]:
    """Markdown at `out`, the equity PNG in `out`'s folder under img/ (when the report carries a curve)."""
    r = stored["report"]
    lstm = r["models"].get("lstm") or next(iter(r["models"].values()))
    curve = lstm["pooled"].get("equity")
    written: list[Path] = []
    image_name: str | None = None
    if curve and curve.get("equity"):
        img = out.parent / "img" / f"equity-{r['symbol']}-{r['timeframe']}.png".lower()
        img.parent.mkdir(parents=True, exist_ok=True)
        img.write_bytes(equity_png(curve["ts"], curve["equity"], curve["drawdown"], f"{r['symbol']} {r['timeframe']}"))
        image_name = str(img.relative_to(out.parent))
        written.append(img)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report_markdown(version, stored, image_name, footer))
    written.insert(0, out)
    return written
