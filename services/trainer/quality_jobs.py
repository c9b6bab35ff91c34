"""The model-quality jobs: walk-forward validation and the promotion gate, backtests, SHAP indicator weights, and
explanations of single predictions.

Run by services.trainer.jobs.run_job (validate, backtest, optimize_weights: job lock, attempts, follow-ups) and by
the `trainer.explain_prediction` task (one row of prediction_explanations). What a version is validated on is its
*recipe*: the hyperparameters of the job that trained it, retrained from scratch on each fold, so that no fold
ever scores a model on bars it trained on (docs/MODEL_QUALITY_METHOD.md).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from services.trainer import repository as repo
from services.trainer.artifacts import ONNX_FILE, fetch_verified, load_keras_verified
from services.trainer.dataset import Dataset, build_dataset
from services.trainer.hyperparameters import TrainConfig, parse_params
from services.trainer.job_params import BacktestJobParams, ValidateParams, WeightsParams
from services.trainer.jobs import JobContext, SyncDb, queue_follow_up
from services.trainer.report import headline
from services.trainer.schemas import Job, ModelVersion
from services.trainer.settings import TrainerSettings
from services.trainer.source import load_bars
from shared.db import require_database_url
from shared.errors import NotFoundError, ValidationFailed
from shared.features import compute_features
from shared.model_metadata import CLASSES, ModelMetadata
from shared.signal_rules import DEFAULT_RISK_LIMITS, risk
from shared.storage import ObjectStore, open_store
from shared.timeframes import OHLCV, Timeframe, resample
from shared.warmup import WARMUP_BARS

log = logging.getLogger("trainer.quality")

FloatArray = npt.NDArray[np.float64]
# Contributions kept per explanation (largest |contribution| first).
EXPLANATION_TOP = 10


def _series(job: Job) -> tuple[str, Timeframe]:
    assert job.symbol is not None
    assert job.timeframe is not None
    return job.symbol, Timeframe(job.timeframe)


def recipe(db: SyncDb, version: ModelVersion) -> TrainConfig:
    """The hyperparameters a version was trained with (its training job's params; defaults if unknown)."""
    from services.trainer.service import recipe_of

    return db.run(recipe_of(db.conn, version))


def _version(db: SyncDb, symbol: str, tf: Timeframe, name: str | None, *, default: str) -> ModelVersion | None:
    """The named version (404 when unknown), else the series' production (default="production") or newest one."""
    if name is not None:
        v = db.run(repo.find_version(db.conn, symbol, tf.value, name))
        if v is None:
            raise NotFoundError(f"no model version {name!r} for {symbol} {tf.value}")
        return v
    if default == "production":
        return db.run(repo.production_version(db.conn, symbol, tf.value))
    return db.run(repo.newest_version(db.conn, symbol, tf.value))


# --- validation and the gate ----------------------------------------------------------------------------------


def validate(db: SyncDb, job: Job, ctx: JobContext) -> dict[str, Any]:
    """Walk-forward validation of a version's recipe, stored; the gate's verdict set on the version; a candidate
    that passes follows its series' rollout policy (lifecycle.apply_policy: promoted, or the rollout's candidate)."""
    from services.trainer import gate
    from services.trainer.validation import walk_forward

    p = ValidateParams.model_validate(job.params)
    symbol, tf = _series(job)
    version = _version(db, symbol, tf, p.model_version, default="newest")
    cfg = recipe(db, version) if version is not None else TrainConfig()
    if p.hyperparameters:
        cfg = parse_params({**cfg.model_dump(mode="json"), **p.hyperparameters}, fault_injection=False)
    production = db.run(repo.production_version(db.conn, symbol, tf.value))
    challenger = production is not None and version is not None and production.id != version.id
    compare_cfg = recipe(db, production) if challenger and production is not None else None
    bars, base = db.run(load_bars(db.conn, symbol, tf))

    def on_fold(done: int, total: int) -> None:
        db.run(repo.set_progress(db.conn, job.id, min(0.95, done / max(total, 1))))

    report = walk_forward(bars, base, tf, symbol, cfg, folds=p.folds, compare_cfg=compare_cfg, on_fold=on_fold)
    decision = gate.decide(report, has_production=challenger)
    body = report.model_dump(mode="json")
    body["gate"] = decision.model_dump(mode="json")
    validation_id = db.run(
        repo.insert_validation(
            db.conn,
            model_version_id=version.id if version else None,
            symbol=symbol,
            timeframe=tf.value,
            job_id=job.id,
            folds=p.folds,
            data_start=_dt(report.data_start),
            data_end=_dt(report.data_end),
            report=body,
        )
    )
    result: dict[str, Any] = {
        "validation_id": validation_id,
        "model_version": version.version if version else None,
        "gate": decision.gate,
        "reasons": decision.reasons,
        "summary": headline(body),
        "promoted": False,
    }
    if version is None:
        return result
    quality = {"gate": decision.gate, "reasons": decision.reasons, "validation_id": validation_id}
    db.run(repo.set_quality(db.conn, version.id, quality))
    serving = version.status == "production"
    if decision.promote and version.status == "candidate":
        # The series' rollout policy decides what a passing candidate does (a failing one is never placed):
        # direct promotes it now, canary and manual make it the rollout's candidate (docs/LIFECYCLE.md).
        from services.trainer import lifecycle

        action = db.run(lifecycle.apply_policy(db.conn, version, ctx.settings))
        result["rollout"] = action
        if action == "promoted":
            result["promoted"] = serving = True
        log.info("job %s: %s passed the gate; rollout policy: %s", job.id, version.version, action)
    result["status"] = "production" if serving else version.status
    if serving and ctx.settings.trainer_weights_after_validate:
        result["weights_job_id"] = queue_follow_up(db, job, ctx, "optimize_weights", {"model_version": version.version})
    return result


# --- model signals over stored bars -----------------------------------------------------------------------------


def _onnx_probabilities(onnx_bytes: bytes, x: npt.NDArray[np.float32], temperature: float) -> FloatArray:
    """Calibrated probabilities from the exported graph (what the predictor serves), in batches."""
    import onnxruntime as ort

    from services.trainer.evaluation import calibrate

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = [np.asarray(session.run(None, {name: x[i : i + 4096]})[0]) for i in range(0, len(x), 4096)]
    probs = np.asarray(np.concatenate(out), dtype=np.float64) if out else np.empty((0, len(CLASSES)))
    return calibrate(probs, temperature)


def model_signals(
    bars: OHLCV, metadata: ModelMetadata, onnx_bytes: bytes, start_ts: int
) -> tuple[OHLCV, npt.NDArray[np.int8], FloatArray, FloatArray]:
    """The model's signal at the close of every bar from `start_ts` on, the position the predictor's risk block
    recommends with it, and ATR in price units: (bars from start_ts, signals, position fractions, atr).

    A bar whose input window is incomplete (warm-up, a degenerate row) gets no signal (flat).
    """
    feats = compute_features(bars)
    idx = {n: i for i, n in enumerate(_feature_names())}
    cols = [idx[n] for n in metadata.feature_names]
    values = feats[:, cols]
    mean = np.asarray(metadata.scaler.mean)
    scale = np.asarray(metadata.scaler.scale)
    length = metadata.sequence_length
    first = int(np.searchsorted(bars.ts, start_ts))
    ends = np.arange(max(first, WARMUP_BARS + length - 1), len(bars))
    scaled = ((values - mean) / scale).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(scaled, length, axis=0)  # (n-length+1, 17, length)
    ok = np.isfinite(windows[ends - length + 1]).all(axis=(1, 2))
    ends = ends[ok]
    x = np.ascontiguousarray(windows[ends - length + 1].transpose(0, 2, 1))
    probs = _onnx_probabilities(onnx_bytes, x, metadata.calibration.temperature)
    window = bars.window(first, None)
    n = len(window)
    signals = np.zeros(n, dtype=np.int8)
    fraction = np.zeros(n, dtype=np.float64)
    atr_pct_col = idx["atr_14_pct"]
    atr = np.nan_to_num(feats[first:, atr_pct_col] * bars.close[first:], nan=0.0)
    direction = {"BUY": 1, "SELL": -1, "HOLD": 0}
    for k, e in enumerate(ends):
        cls = int(np.argmax(probs[k]))
        signal = CLASSES[cls]
        r = risk(signal, float(probs[k, cls]), float(bars.close[e]), float(feats[e, atr_pct_col]), DEFAULT_RISK_LIMITS)
        signals[e - first] = direction[signal]
        fraction[e - first] = float(r["position_fraction"])  # type: ignore[arg-type]
    return window, signals, fraction, atr


def _feature_names() -> tuple[str, ...]:
    from shared.features import FEATURE_NAMES

    return FEATURE_NAMES


def _test_start(metadata: ModelMetadata) -> int:
    """First bar of the model's test split: everything from it on is out of sample for this model."""
    start = (metadata.splits.get("test") or {}).get("start")
    if not isinstance(start, str):
        raise ValidationFailed(f"model {metadata.version} records no test split; backtest it with signals instead")
    return int(datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp())


def backtest(db: SyncDb, job: Job, ctx: JobContext) -> dict[str, Any]:
    """Backtest uploaded signals, or a version's signals on the bars it never trained on (its test split on)."""
    from services.trainer.backtest import BacktestParams, align_signals, parse_signals_csv, run_backtest

    p = BacktestJobParams.model_validate(job.params)
    symbol, tf = _series(job)
    bars, base = db.run(load_bars(db.conn, symbol, tf))
    tbars = resample(bars, base, tf)
    engine = BacktestParams.model_validate(p.model_dump(exclude={"model_version", "signals_csv"}))
    version: ModelVersion | None = None
    fraction: FloatArray | None = None
    atr: FloatArray | None = None
    source: dict[str, Any]
    if p.signals_csv is not None:
        window = tbars
        signals = align_signals(tbars.ts, parse_signals_csv(p.signals_csv))
        source = {"signals": "uploaded", "rows": int(np.count_nonzero(signals))}
    else:
        version = _version(db, symbol, tf, p.model_version, default="production")
        if version is None:
            raise NotFoundError(f"no production model for {symbol} {tf.value}: name a version or upload signals")
        metadata, files = fetch_verified(ctx.store, symbol, tf.value, version.version, version.sha256, (ONNX_FILE,))
        window, signals, fraction, atr = model_signals(tbars, metadata, files[ONNX_FILE], _test_start(metadata))
        source = {"signals": "model", "model_version": version.version, "out_of_sample_from": _iso(int(window.ts[0]))}
        if engine.sizing == "fixed" and p.model_fields_set.isdisjoint({"sizing"}):
            # Unless told otherwise, trade what the predictor recommends (its risk block's position).
            engine = engine.model_copy(update={"sizing": "risk"})
    if len(window) < 2:
        raise ValidationFailed(f"need at least 2 bars to backtest {symbol} {tf.value}, have {len(window)}")
    result = run_backtest(window, signals, tf, engine, position_fraction=fraction, atr=atr)
    body = result.to_json()
    params = {**engine.model_dump(mode="json"), **source}
    backtest_id = db.run(
        repo.insert_backtest(
            db.conn,
            model_version_id=version.id if version else None,
            symbol=symbol,
            timeframe=tf.value,
            job_id=job.id,
            params=params,
            result=body,
            data_start=datetime.fromtimestamp(int(window.ts[0]), UTC),
            data_end=datetime.fromtimestamp(int(window.ts[-1]), UTC),
        )
    )
    return {"backtest_id": backtest_id, "metrics": body["metrics"], "params": params}


def _dt(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _iso(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


# --- weights and explanations ---------------------------------------------------------------------------------


def training_dataset(db: SyncDb, version: ModelVersion, metadata: ModelMetadata) -> Dataset:
    """The version's dataset rebuilt from the bars up to the end of its training range (same splits, so its
    validation/test sequences are held out for this model; bars stored since then are left out)."""
    symbol, tf = version.symbol, Timeframe(version.timeframe)
    bars, base = db.run(load_bars(db.conn, symbol, tf))
    end = int(metadata.training_range["end"].timestamp()) + tf.seconds
    cut = bars.window(None, int(np.searchsorted(bars.ts, end)))
    return build_dataset(cut, base, tf, symbol, recipe(db, version))


def optimize(db: SyncDb, job: Job, ctx: JobContext) -> dict[str, Any]:
    """SHAP indicator weights of a version (default: production), stored as a new weights version."""
    from services.trainer.weights import optimize_weights

    p = WeightsParams.model_validate(job.params)
    symbol, tf = _series(job)
    version = _version(db, symbol, tf, p.model_version, default="production")
    if version is None:
        raise NotFoundError(f"no production model for {symbol} {tf.value}: name a version")
    model, metadata = load_keras_verified(ctx.store, symbol, tf.value, version.version, version.sha256)
    ds = training_dataset(db, version, metadata)
    # The hit-rate term from the version's settled live bars once there are enough of them (settlement.py).
    from services.trainer.settlement import live_rows

    live = db.run(live_rows(db.conn, symbol, tf.value, version.version, metadata.feature_names))
    result = optimize_weights(model, ds, live=live, min_live_bars=ctx.settings.trainer_performance_min_bars)
    inputs = {
        **result.inputs,
        "importances": result.importances,
        "correlation": result.correlation,
        "hit_rates": result.hit_rates,
        "feature_names": list(result.weights),
    }
    weights_id = db.run(
        repo.insert_weights(
            db.conn,
            symbol=symbol,
            timeframe=tf.value,
            version=f"shap-{version.version}",
            weights=result.weights,
            method=result.method,
            model_version_id=version.id,
            inputs=inputs,
            data_start=result.data_start,
            data_end=result.data_end,
        )
    )
    top = sorted(result.weights.items(), key=lambda kv: -kv[1])[:5]
    return {"weights_id": weights_id, "model_version": version.version, "method": result.method, "top": dict(top)}


def run_explanation(
    prediction_id: str, *, settings: TrainerSettings, store: ObjectStore | None = None
) -> dict[str, Any]:
    """Compute and store the SHAP contributions of one logged prediction (idempotent: a finished row is kept)."""
    from services.trainer.explain import explain_window

    db = SyncDb(require_database_url(settings), f"aicash-trainer:explain:{prediction_id}"[:63])
    try:
        if db.run(repo.start_explanation(db.conn, prediction_id)) is None:
            existing = db.run(repo.get_explanation(db.conn, prediction_id))
            return {"status": existing["status"] if existing else "unknown"}
        try:
            pred = db.run(repo.get_prediction(db.conn, prediction_id))
            if pred is None:
                raise NotFoundError(f"no logged prediction {prediction_id}")
            version = db.run(repo.find_version(db.conn, pred["symbol"], pred["timeframe"], pred["model_version"]))
            if version is None:
                raise NotFoundError(f"model version {pred['model_version']} of the prediction is not registered")
            store = store or open_store(settings)
            model, metadata = load_keras_verified(
                store, version.symbol, version.timeframe, version.version, version.sha256
            )
            raw = np.asarray(pred["features"], dtype=np.float64).reshape(tuple(pred["feature_shape"]))
            scaled = ((raw - np.asarray(metadata.scaler.mean)) / np.asarray(metadata.scaler.scale)).astype(np.float32)
            ds = training_dataset(db, version, metadata)
            rng = np.random.default_rng(0)
            k = min(settings.trainer_explain_background, len(ds.train))
            background = ds.train.x[np.sort(rng.choice(len(ds.train), size=k, replace=False))]
            out = explain_window(
                model,
                background,
                scaled[None, ...],
                raw,
                list(metadata.feature_names),
                CLASSES.index(pred["signal"]),
                top=EXPLANATION_TOP,
            )
        except Exception as exc:  # stored for the client; the row must not stay running
            log.exception("explanation %s failed", prediction_id)
            message = (
                exc.message if isinstance(exc, NotFoundError | ValidationFailed) else f"{type(exc).__name__}: {exc}"
            )
            db.run(repo.fail_explanation(db.conn, prediction_id, message))
            return {"status": "failed", "error": message}
        contributions = out.pop("contributions")
        db.run(repo.finish_explanation(db.conn, prediction_id, version.version, contributions, out))
        return {"status": "succeeded", "contributions": len(contributions)}
    finally:
        db.close()
