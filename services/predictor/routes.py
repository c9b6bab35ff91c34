"""HTTP routes of the predictor."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from services.predictor import repository
from services.predictor.deps import (
    ExplanationsDep,
    PredictorDep,
    ReadKey,
    SymbolQuery,
    TimeframeQuery,
    predictor_of,
)
from services.predictor.explanations import RETRY_AFTER_SECONDS
from services.predictor.metrics import PREDICTION_DURATION, PREDICTION_REQUESTS
from services.predictor.performance import record_outcome, series_performance
from services.predictor.schemas import (
    DriftOut,
    ExplanationOut,
    ExplanationPending,
    FeatureDriftOut,
    ModelOut,
    OutcomeIn,
    OutcomeOut,
    PerformanceOut,
    PredictionIn,
    PredictionOut,
    PredictionRecord,
    Probabilities,
    WeightsOut,
)
from services.predictor.service import PredictionRequest, Predictor
from services.predictor.signals import Weights
from shared.app import json_body, read_body
from shared.auth import Authenticator, Principal, Role, WriteKey
from shared.bars import parse_json
from shared.db import DATABASE_DOWN
from shared.errors import (
    ERROR_SCHEMA,
    SYMBOL_SCHEMA,
    TIMEFRAME_SCHEMA,
    AppError,
    Forbidden,
    NotFoundError,
    ServiceUnavailable,
    ValidationFailed,
    error_responses,
    handler_checked,
)
from shared.logging import request_id_var
from shared.model_metadata import CLASSES
from shared.query import QueryTime
from shared.timeframes import Timeframe, can_resample, check_symbol, parse_timeframe

router = APIRouter()


class LeanRoute(APIRoute):
    """An APIRoute for the hot prediction routes: its handler skips FastAPI's per-request dependency solving
    and parameter validation, which cost about as much as a whole cached prediction (docs/PREDICTOR.md,
    Benchmark). The endpoint's declared parameters still describe the route in OpenAPI; `_lean_handler` does
    the same work by hand: the read-role API key check with the shared Authenticator, then the endpoint."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        call = self.endpoint
        params = list(self.param_convertors)

        async def app(request: Request) -> Response:
            principal = _authenticate(request)
            path = request.path_params
            kwargs: dict[str, Any] = {name: path[name] for name in params}
            return await call(request=request, _=principal, **kwargs)  # type: ignore[no-any-return]

        return app


def _authenticate(request: Request) -> Principal:
    # What shared.auth.require(Role.read) does, without the dependency machinery.
    auth: Authenticator = request.app.state.auth
    principal = auth.authenticate(request.headers.get("x-api-key"))
    if principal.role < Role.read:
        raise Forbidden(f"key {principal.key_id!r} has role {principal.role.name}; this needs read")
    request.state.principal = principal
    return principal


# The two prediction routes (LeanRoute); the app includes this router before `router`, and not nested in it:
# each level of included router is another round of route matching on every request.
lean = APIRouter(route_class=LeanRoute)

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_TIMEFRAMES = 8


def _targets(base: Timeframe, raw: object) -> list[Timeframe]:
    if raw is None:
        return [base]
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise ValidationFailed('timeframes must be a list of timeframe names, e.g. ["H1", "H4", "D1"]')
    if len(raw) > MAX_TIMEFRAMES:
        raise ValidationFailed(f"at most {MAX_TIMEFRAMES} timeframes, got {len(raw)}")
    out = [base]
    for name in raw:
        t = parse_timeframe(name)
        if not can_resample(base, t):
            raise ValidationFailed(
                f"timeframe {t.value} cannot be built from {base.value} bars: it must be {base.value} or a whole "
                f"multiple of it"
            )
        if t not in out:
            out.append(t)
    return out


def _no_cache(request: Request) -> bool:
    return "no-cache" in request.headers.get("cache-control", "").lower()


def parse_request(raw: object, use_cache: bool) -> PredictionRequest:
    if not isinstance(raw, dict):
        raise ValidationFailed('body must be a JSON object {"symbol", "timeframe", ...}')
    symbol, timeframe = raw.get("symbol"), raw.get("timeframe")
    if not isinstance(symbol, str):
        raise ValidationFailed("symbol is required (a string such as EURUSD)")
    if not isinstance(timeframe, str):
        raise ValidationFailed("timeframe is required (one of M1, M5, M15, M30, H1, H4, D1, W1)")
    check_symbol(symbol)
    tf = parse_timeframe(timeframe)
    user_id = raw.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or not 1 <= len(user_id) <= 256):
        raise ValidationFailed("user_id must be a string of 1 to 256 characters")
    bars = raw.get("bars")
    if bars is not None and not isinstance(bars, list):
        raise ValidationFailed("bars must be a list of bars")
    return PredictionRequest(symbol, tf, _targets(tf, raw.get("timeframes")), bars, user_id, use_cache)


def _label(predictor: Predictor, symbol: object) -> str:
    # Symbol label only for series the predictor serves: clients cannot blow up the metric's cardinality.
    if isinstance(symbol, str) and any(k[0] == symbol for k in predictor.models.models):
        return symbol
    return "unknown"


_ok_counters: dict[str, Any] = {}


def _count_ok(predictor: Predictor, symbol: object) -> None:
    # The labelled child of a served symbol is looked up once, not on every request.
    child = _ok_counters.get(symbol) if isinstance(symbol, str) else None
    if child is None:
        label = _label(predictor, symbol)
        child = PREDICTION_REQUESTS.labels(label, "ok")
        if label != "unknown":
            _ok_counters[label] = child
    child.inc()


async def _measured(predictor: Predictor, symbol: Callable[[], object], fn: Callable[[], Awaitable[bytes]]) -> Response:
    start = time.perf_counter()
    try:
        body = await fn()
    except AppError as exc:
        result = (
            "not_found"
            if isinstance(exc, NotFoundError)
            else "unavailable"
            if isinstance(exc, ServiceUnavailable)
            else "client_error"
            if exc.status_code < 500
            else "error"
        )
        PREDICTION_REQUESTS.labels(_label(predictor, symbol()), result).inc()
        raise
    except Exception:
        PREDICTION_REQUESTS.labels(_label(predictor, symbol()), "error").inc()
        raise
    _count_ok(predictor, symbol())
    PREDICTION_DURATION.observe(time.perf_counter() - start)
    return Response(body, media_type="application/json")


@lean.post(
    "/v1/predictions",
    summary="Predict a signal",
    tags=["predictions"],
    response_model=PredictionOut,
    responses=error_responses(401, 403, 404, 413, 422, 503),
    openapi_extra=json_body(PredictionIn, {"symbol": "EURUSD", "timeframe": "H1", "timeframes": ["H1", "H4"]}),
)
async def post_prediction(request: Request, _: ReadKey) -> Response:
    """A signal with calibrated confidence, per-timeframe signals and their consensus, the indicator score
    and risk limits (role read).

    Without `bars` the stored bars are used; with `bars` they are checked by the ingest rules. Identical
    inputs within the cache lifetime are served from the cache (`cached: true`); send
    `Cache-Control: no-cache` to force a fresh computation. 404 when no production model serves the symbol
    and timeframe or no bars are stored; 422 for invalid bars or too few of them (the detail says how many
    are needed); 503 when the indicators service is down or slow.
    """
    # Not a dependency: on the hottest route each one costs FastAPI's dependency machinery a few µs.
    predictor = predictor_of(request.app)
    state: dict[str, object] = {}

    async def run() -> bytes:
        raw = parse_json(await read_body(request, MAX_BODY_BYTES))
        if isinstance(raw, dict):
            state["symbol"] = raw.get("symbol")
        req = parse_request(raw, use_cache=not _no_cache(request))
        return await predictor.predict(req, request_id_var.get())

    return await _measured(predictor, lambda: state.get("symbol"), run)


@lean.get(
    "/v1/signals/{symbol}/{timeframe}",
    summary="Latest signal of a series",
    tags=["predictions"],
    response_model=PredictionOut,
    responses=error_responses(401, 403, 404, 422, 503),
)
async def get_signal(symbol: str, timeframe: str, request: Request, _: ReadKey) -> Response:
    """The latest signal of a series from its stored bars; from the cache while fresh (role read).

    The same computation and response as `POST /v1/predictions` without bars, on one timeframe.
    """
    predictor = predictor_of(request.app)

    async def run() -> bytes:
        check_symbol(symbol)
        tf = parse_timeframe(timeframe)
        req = PredictionRequest(symbol, tf, [tf], None, None, not _no_cache(request))
        return await predictor.predict(req, request_id_var.get())

    return await _measured(predictor, lambda: symbol, run)


@router.get(
    "/v1/predictions/{prediction_id}",
    summary="A logged prediction",
    tags=["predictions"],
    response_model=PredictionRecord,
    responses=error_responses(401, 403, 404, 503),
)
async def get_prediction(prediction_id: str, predictor: PredictorDep, _: ReadKey) -> PredictionRecord:
    """A served prediction as recorded in the prediction log, with its feature window (role read)."""
    pid = str(_prediction_uuid(prediction_id))
    row = predictor.log.pending(pid)
    if row is None:
        try:
            record = await repository.get_prediction(predictor.pool, pid)
        except (OSError, TimeoutError) as exc:
            raise ServiceUnavailable(f"database unavailable: {type(exc).__name__}") from None
        if record is None:
            raise NotFoundError(f"no prediction {pid}")
        row = tuple(record[c] for c in repository.RECORD_COLUMNS)
    return _record(predictor, dict(zip(repository.RECORD_COLUMNS, row, strict=True)))


def _prediction_uuid(prediction_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(prediction_id)
    except ValueError:
        raise NotFoundError(
            f"no prediction {prediction_id!r}: prediction ids are UUIDs, as in the prediction_id of a response"
        ) from None


@router.get(
    "/v1/predictions/{prediction_id}/explanation",
    summary="Explain a served prediction",
    tags=["predictions"],
    response_model=ExplanationOut,
    responses={
        202: {
            "model": ExplanationPending,
            "description": f"Being computed by the trainer: ask again after Retry-After ({RETRY_AFTER_SECONDS} s)",
        },
        409: {"description": "The explanation failed; the detail carries the trainer's error", **ERROR_SCHEMA},
        **error_responses(401, 403, 404, 503),
    },
)
async def get_explanation(
    prediction_id: str, explanations: ExplanationsDep, _: ReadKey
) -> ExplanationOut | JSONResponse:
    """Which features, at which bars of the input window, pushed a served prediction to its signal (role read).

    Computed by the trainer (SHAP on the model version that served) the first time it is asked for: that
    request and the ones while it runs answer 202 with `Retry-After`; then 200 with the contributions,
    largest first. 404 for an unknown prediction id, 409 `explanation_failed` when the trainer could not
    explain it (the detail says why), 503 when the trainer or the database cannot be reached.
    """
    answer = await explanations.get(_prediction_uuid(prediction_id))
    if answer.status_code == 200:
        return ExplanationOut.model_validate(answer.body)
    # 202: the ExplanationPending body, which is not the route's response_model, so it goes out as it is.
    return JSONResponse(
        ExplanationPending.model_validate(answer.body).model_dump(mode="json"),
        status_code=answer.status_code,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _record(predictor: Predictor, r: dict[str, Any]) -> PredictionRecord:
    rows, cols = (int(x) for x in r["feature_shape"])
    flat = [float(x) for x in r["features"]]
    # The version that made it, production or candidate (a candidate's and a shadow's records too).
    model = next(
        (
            m
            for m in (
                predictor.models.get(r["symbol"], r["timeframe"]),
                predictor.models.candidate(r["symbol"], r["timeframe"]),
            )
            if m is not None and m.version == r["model_version"]
        ),
        None,
    )
    return PredictionRecord(
        prediction_id=str(r["id"]),
        created_at=r["created_at"],
        symbol=r["symbol"],
        timeframe=r["timeframe"],
        bar_ts=r["bar_ts"],
        model_version=r["model_version"],
        variant=r["variant"],
        user_hash=r["user_hash"],
        window_hash=r["window_hash"],
        feature_names=model.feature_names if model is not None else None,
        features=[flat[i * cols : (i + 1) * cols] for i in range(rows)],
        probabilities=Probabilities.model_validate(
            {c: float(p) for c, p in zip(CLASSES, r["probabilities"], strict=True)}
        ),
        signal=r["signal"],
        confidence=float(r["confidence"]),
        consensus_signal=r["consensus_signal"],
        cached=r["cached"],
        request_id=r["request_id"],
    )


def _weights(w: Weights, symbol: str | None, timeframe: str | None) -> WeightsOut:
    row = w.row
    inputs = dict(row.inputs) if row is not None else {}
    importances = inputs.pop("importances", None)
    correlation = inputs.pop("correlation", None)
    feature_names = inputs.pop("feature_names", None)
    return WeightsOut(
        symbol=symbol,
        timeframe=timeframe,
        weights_version=w.version,
        source=w.source,
        weights=w.weights,
        id=row.id if row is not None else None,
        method=row.method if row is not None else "default",
        model_version_id=row.model_version_id if row is not None else None,
        data_start=row.data_start if row is not None else None,
        data_end=row.data_end if row is not None else None,
        created_at=row.created_at if row is not None else None,
        importances=importances if isinstance(importances, dict) else None,
        correlation=correlation if isinstance(correlation, list) else None,
        feature_names=feature_names if isinstance(feature_names, list) else None,
        inputs=inputs,
        detail=None
        if row is not None
        else "no indicator_weights row covers this scope: built-in equal weights (every voting indicator 1.0)",
    )


@router.get(
    "/weights",
    summary="Default indicator weights",
    tags=["weights"],
    response_model=WeightsOut,
    responses=error_responses(401, 403),
)
async def get_default_weights(predictor: PredictorDep, _: ReadKey) -> WeightsOut:
    """The default-scope (`*`/`*`) indicator weights used by `indicator_score`, with how they were computed
    (role read; deploy smoke tests call it)."""
    return _weights(predictor.weights.lookup(None, None), None, None)


@router.get(
    "/v1/weights",
    summary="Indicator weights of a series",
    tags=["weights"],
    response_model=WeightsOut,
    responses=error_responses(401, 403, 422),
    openapi_extra=handler_checked(symbol=SYMBOL_SCHEMA, timeframe=TIMEFRAME_SCHEMA),
)
async def get_weights(
    predictor: PredictorDep,
    _: ReadKey,
    symbol: SymbolQuery = None,
    timeframe: TimeframeQuery = None,
) -> WeightsOut:
    """The indicator weights that `indicator_score` uses for a series, with the data range, importances and
    correlation matrix they were computed from (role read). The most specific stored scope wins:
    (symbol, timeframe), (symbol, `*`), (`*`, `*`); with none, the built-in equal weights (`source: default`)."""
    if symbol is not None:
        check_symbol(symbol)
    if timeframe is not None:
        parse_timeframe(timeframe)
    return _weights(predictor.weights.lookup(symbol, timeframe), symbol, timeframe)


@router.get(
    "/v1/models",
    summary="Models this predictor serves",
    tags=["models"],
    response_model=list[ModelOut],
    responses=error_responses(401, 403),
)
async def get_models(predictor: PredictorDep, _: ReadKey) -> list[ModelOut]:
    """The models this process has loaded and serves: each series' production version and, where its rollout
    has one, the candidate (`role`), with the promotion gate's current verdict on each (role read)."""
    loaded = [(m, "production") for m in predictor.models.models.values()]
    loaded += [(m, "candidate") for m in predictor.models.candidates.values()]
    return [
        ModelOut(
            symbol=m.symbol,
            timeframe=m.timeframe,
            version=m.version,
            role=role,
            sha256=m.sha256,
            sequence_length=m.sequence_length,
            feature_names=m.feature_names,
            temperature=m.temperature,
            quality=m.quality,
        )
        for m, role in sorted(loaded, key=lambda x: (x[0].symbol, x[0].timeframe, x[1] != "production"))
    ]


# PostgreSQL unreachable or the connection lost: 503 that says so, never a 500 (the outcome routes read and write
# the database); the list is shared/db.py's DATABASE_DOWN.


@router.post(
    "/v1/outcomes",
    summary="Record a prediction's outcome",
    tags=["outcomes"],
    status_code=201,
    response_model=OutcomeOut,
    responses={
        200: {"model": OutcomeOut, "description": "The same outcome was recorded before: the stored one"},
        409: {"description": "A different outcome was recorded for this prediction before", **ERROR_SCHEMA},
        **error_responses(401, 403, 404, 422, 503),
    },
)
async def post_outcome(body: OutcomeIn, predictor: PredictorDep, principal: WriteKey) -> OutcomeOut | JSONResponse:
    """Record an external result of a served prediction, e.g. the PnL of the trade placed on it (role write).

    201 with the stored outcome; the same body again answers 200 with the stored outcome (idempotent); a
    different body for a prediction that has one answers 409 (outcomes are not rewritten). 404 for an unknown
    prediction id. The outcome and its audit row (`outcome.record`, the key id as actor) commit together.
    """
    try:
        stored, created = await record_outcome(predictor.pool, predictor.log, body, principal.key_id)
    except DATABASE_DOWN as exc:
        raise ServiceUnavailable(f"database unavailable: {type(exc).__name__}; try again later") from None
    if created:
        return stored
    return JSONResponse(stored.model_dump(mode="json"), status_code=200)


@router.get(
    "/v1/performance",
    summary="Live performance of a series' models",
    tags=["outcomes"],
    response_model=PerformanceOut,
    responses=error_responses(401, 403, 404, 422, 503),
    openapi_extra=handler_checked(symbol=SYMBOL_SCHEMA, timeframe=TIMEFRAME_SCHEMA),
)
async def get_performance(
    predictor: PredictorDep,
    _: ReadKey,
    symbol: Annotated[str, Query(description="series symbol, e.g. EURUSD")],
    timeframe: Annotated[str, Query(description="series timeframe, e.g. H1")],
    since: Annotated[
        QueryTime | None,
        Query(description="only bars opening (outcomes) and predictions served at or after this time (ISO 8601)"),
    ] = None,
) -> PerformanceOut:
    """Live performance of every model version and variant that served a series, from settled outcomes (role
    read): logged predictions, settled bars (one per version, variant and bar), hit rate with its 95 % Wilson
    interval, Brier score, log loss, a calibration table, profit factor and return after costs of following the
    signals, and the external outcomes recorded for them. 404 when no prediction was ever logged for the series.
    """
    check_symbol(symbol)
    tf = parse_timeframe(timeframe)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    try:
        return await series_performance(predictor.pool, predictor.log, symbol, tf.value, since)
    except DATABASE_DOWN as exc:
        raise ServiceUnavailable(f"database unavailable: {type(exc).__name__}; try again later") from None


@router.get(
    "/v1/drift",
    summary="Newest feature drift check of a series",
    tags=["outcomes"],
    response_model=DriftOut,
    responses=error_responses(401, 403, 404, 422, 503),
    openapi_extra=handler_checked(symbol=SYMBOL_SCHEMA, timeframe=TIMEFRAME_SCHEMA),
)
async def get_drift(
    predictor: PredictorDep,
    _: ReadKey,
    symbol: Annotated[str, Query(description="series symbol, e.g. EURUSD")],
    timeframe: Annotated[str, Query(description="series timeframe, e.g. H1")],
) -> DriftOut:
    """The newest drift check of a series (role read): PSI and KS of every feature of the live window against
    the serving version's training reference, which features drifted, and the series' model flag. Checks run
    every DRIFT_CHECK_INTERVAL_SECONDS (one replica) on served series with at least DRIFT_MIN_BARS live bars
    (docs/LIFECYCLE.md, "Drift"). 404 while no check of the series was stored."""
    check_symbol(symbol)
    tf = parse_timeframe(timeframe)
    try:
        rows = await repository.newest_drift_check(predictor.pool, symbol, tf.value)
        flag = await repository.model_flag(predictor.pool, symbol, tf.value)
    except DATABASE_DOWN as exc:
        raise ServiceUnavailable(f"database unavailable: {type(exc).__name__}; try again later") from None
    if not rows:
        raise NotFoundError(
            f"no drift check stored for {symbol} {tf.value}: checks run every DRIFT_CHECK_INTERVAL_SECONDS on "
            "served series once they have DRIFT_MIN_BARS live bars"
        )
    first = rows[0]
    features = [FeatureDriftOut(feature=r["feature"], psi=r["psi"], ks=r["ks"], drifted=r["drifted"]) for r in rows]
    return DriftOut(
        symbol=symbol,
        timeframe=tf.value,
        model_version=first["model_version"],
        checked_at=first["computed_at"],
        window_start=first["window_start"],
        window_end=first["window_end"],
        live_bars=first["live_bars"],
        drifted_features=[f.feature for f in features if f.drifted],
        features=features,
        flag=None if flag is None else dict(flag),
    )
