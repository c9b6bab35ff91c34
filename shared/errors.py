"""One error base with a status code and a machine-readable code; one handler renders them all."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

from shared.timeframes import SYMBOL_RE, Timeframe

log = logging.getLogger(__name__)


class AppError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.code = code


class NotFoundError(AppError):
    status_code = 404
    code = "not_found"


class ValidationFailed(AppError):
    status_code = 422
    code = "validation_error"


class NotEnoughBars(ValidationFailed):
    """Too few bars for the warm-up plus what was asked; the message says how many are needed and present."""

    code = "not_enough_bars"


class PayloadTooLarge(AppError):
    status_code = 413
    code = "payload_too_large"


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"


class ServiceUnavailable(AppError):
    status_code = 503
    code = "service_unavailable"


class ConflictError(AppError):
    status_code = 409
    code = "conflict"


class FieldError(BaseModel):
    """One invalid input of a 422 from request validation."""

    loc: str = Field(
        description="where: `query.limit`, `path.model_id`, a body field (`candidate_traffic_percent`, "
        "`detail.trade_id`); `body` for the body as a whole"
    )
    msg: str = Field(description="what is wrong with it")
    input: Any = Field(default=None, description="the value sent (NaN and infinities as strings)")


class ErrorResponse(BaseModel):
    """Every error this API answers, whatever its status: a machine-readable code and a message for a human.

    The framework's own answers have this shape too: an unknown path (404 `not_found`), a method the path does
    not support (405 `method_not_allowed`, with `Allow`), a body that is not JSON (422 `validation_error`), a
    body over the size limit (413 `payload_too_large`), an unexpected error (500 `internal_error`, naming the
    request id).
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": "not_found", "detail": "no model version 42"},
                {
                    "error": "validation_error",
                    "detail": "query.limit: Input should be less than or equal to 500",
                    "errors": [
                        {"loc": "query.limit", "msg": "Input should be less than or equal to 500", "input": "501"}
                    ],
                },
            ]
        }
    )

    error: str = Field(
        description="machine-readable code, stable across releases: validation_error, not_enough_bars, "
        "unauthorized, forbidden, not_found, method_not_allowed, conflict, payload_too_large, internal_error, "
        "service_unavailable, or a service's own (its operations' descriptions name them)"
    )
    detail: str = Field(description="what was wrong and, where it helps, what would be right")
    errors: list[FieldError] = Field(
        default_factory=list,
        max_length=100,
        description="only on a 422 from request validation: each invalid input (at most 100)",
    )


ERROR_REF = "#/components/schemas/ErrorResponse"
ERROR_SCHEMA: dict[str, Any] = {"content": {"application/json": {"schema": {"$ref": ERROR_REF}}}}

_DESCRIPTIONS = {
    401: "Missing or invalid API key",
    403: "The API key's role may not do this",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    422: "Invalid input; `detail` (and `errors`, for request validation) names what was wrong",
    500: "Unexpected error; `detail` names the request id to quote",
    503: "A dependency is unavailable",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entry for a route's expected errors, so they appear in the OpenAPI document.

    The codes every operation can answer (401/403 where it takes a key, 413 where it takes a body, 422, 500,
    503) are added by `document_errors`; listing them here as well changes nothing.
    """
    return {c: {"description": _DESCRIPTIONS.get(c, "Error"), **ERROR_SCHEMA} for c in codes}


def handler_checked(**schemas: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` for a route that checks some of its parameters itself (`check_symbol`,
    `parse_timeframe`): the schema each obeys, merged into the parameter's schema by `document_errors`.

    `handler_checked(symbol=SYMBOL_SCHEMA)`; path parameters named `symbol` and `timeframe` get theirs
    without it (every route with such a path checks them).
    """
    return {CHECKED_PARAMS: schemas}


CHECKED_PARAMS = "x-checked-params"
SYMBOL_SCHEMA: dict[str, Any] = {"type": "string", "pattern": SYMBOL_RE.pattern}
TIMEFRAME_SCHEMA: dict[str, Any] = {"type": "string", "enum": [t.value for t in Timeframe]}
# A text that PostgreSQL stores or compares: it refuses a NUL character (422, shared.errors' bad_value).
NO_NUL_PATTERN = r"^[^\x00]*$"
TEXT_SCHEMA: dict[str, Any] = {"type": "string", "pattern": NO_NUL_PATTERN}
# A comma-separated list of timeframes, blanks around names allowed, empty items skipped, at least one name
# (services.indicators.routes._parse_timeframes).
_TF = f"\\s*({'|'.join(t.value for t in Timeframe)})\\s*"
TIMEFRAME_LIST_SCHEMA: dict[str, Any] = {"type": "string", "pattern": f"^(\\s*,)*{_TF}(,({_TF}|\\s*))*$"}
_PATH_PARAMS = {"symbol": SYMBOL_SCHEMA, "timeframe": TIMEFRAME_SCHEMA}


def document_errors(app: FastAPI) -> None:
    """Make the app's OpenAPI document state the one error model, in one place, so no route can forget it.

    Adds `ErrorResponse` to the components and, on every operation: 401/403 where it takes an API key, 413
    where it takes a body (shared/app.py's body limit holds on every route), 422 where it takes any input,
    500 and 503 everywhere; every error response's schema is `ErrorResponse` (FastAPI's
    `HTTPValidationError`, which this API never sends, is removed). Also merges the constraints that route
    handlers check themselves into their parameters' schemas (`handler_checked`).
    """
    original = app.openapi

    def openapi() -> dict[str, Any]:
        schema = original()
        _document(schema)
        _restore_example_nulls(app, schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _document(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    for path_item in schema.get("paths", {}).values():
        for method in _METHODS:
            operation = path_item.get(method)
            if operation is not None:
                _document_operation(operation)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _restore_example_nulls(app: FastAPI, schema: dict[str, Any]) -> None:
    """Put back the nulls FastAPI drops from examples: it renders the document with `exclude_none`, which also
    removes every `None` inside an example, so an example with a required nullable field (`"error": null`) would
    no longer validate against its own schema. Models' examples come from their JSON schemas again, the routes'
    own (`responses=`, `openapi_extra=`) as written."""
    from fastapi.routing import APIRoute
    from pydantic import TypeAdapter

    components = schema.get("components", {}).get("schemas", {})
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        fields = [f for f in (route.body_field, route.response_field, *route.response_fields.values()) if f]
        for field in fields:
            if field.field_info.annotation is None:
                continue
            mode: Literal["validation", "serialization"] = (
                "validation" if field.mode == "validation" else "serialization"
            )
            js = TypeAdapter(field.field_info.annotation).json_schema(mode=mode)
            for name, sub in {**js.get("$defs", {}), str(js.get("title")): js}.items():
                for key in ("example", "examples"):
                    for target in (name, f"{name}-Input", f"{name}-Output"):
                        if key in sub and key in components.get(target, {}):
                            components[target][key] = sub[key]
        for method in route.methods or ():
            operation = schema.get("paths", {}).get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            written = [
                (response.get("content", {}), operation["responses"].get(str(code), {}).get("content", {}))
                for code, response in route.responses.items()
            ]
            body = (route.openapi_extra or {}).get("requestBody", {}).get("content", {})
            written.append((body, operation.get("requestBody", {}).get("content", {})))
            for given, rendered in written:
                for media_type, media in given.items():
                    for key in ("example", "examples"):
                        if key in media and key in rendered.get(media_type, {}):
                            rendered[media_type][key] = media[key]


def _document_operation(operation: dict[str, Any]) -> None:
    checked: dict[str, dict[str, Any]] = operation.pop(CHECKED_PARAMS, {})
    for param in operation.get("parameters", []):
        extra = checked.get(param["name"]) or (_PATH_PARAMS.get(param["name"]) if param.get("in") == "path" else None)
        if extra is not None:
            param["schema"] = _constrained(param.get("schema", {}), extra)
        if param.get("in") == "query":
            param["schema"] = _with_epoch(param.get("schema", {}))
        param["schema"] = _bounded(param.get("schema", {}))
    responses = operation.setdefault("responses", {})
    codes = [500, 503]
    if operation.get("security"):
        codes += [401, 403]
    if "requestBody" in operation:
        codes.append(413)
    if operation.get("parameters") or "requestBody" in operation:
        codes.append(422)
    for code in codes:
        responses.setdefault(str(code), {"description": _DESCRIPTIONS[code]})
    for code, response in responses.items():
        if code[0] in "45":
            if code == "422" and response.get("description") == "Validation Error":
                response["description"] = _DESCRIPTIONS[422]
            own = response.get("content", {}).get("application/json", {}).get("schema")
            error_ref = ERROR_SCHEMA["content"]["application/json"]["schema"]
            if own is not None and own != error_ref and code != "422":
                # A route that answers this code with a body of its own (503 from /health/ready: the
                # Readiness report) documents both: its body, or the error model from the framework's layers.
                response["content"] = {"application/json": {"schema": {"anyOf": [own, error_ref]}}}
            else:
                response["content"] = ERROR_SCHEMA["content"]


# pydantic reads a date-time query parameter as ISO 8601 or, being lax, as a number of epoch seconds
# (milliseconds beyond +-2e10): integers from year 1 to year 9999 in milliseconds.
EPOCH_SCHEMA: dict[str, Any] = {
    "type": "integer",
    "minimum": -62_135_596_800_000,
    "maximum": 253_402_300_799_999,
    "description": "epoch seconds (milliseconds beyond +-2e10)",
}
# Integer parameters are ids and counts that PostgreSQL reads as bigint: a larger one is refused (422).
_INT64 = {"minimum": -(2**63), "maximum": 2**63 - 1}


def _bounded(current: dict[str, Any]) -> dict[str, Any]:
    if current.get("type") == "integer":
        return {**{k: v for k, v in _INT64.items() if k not in current}, **current}
    if "anyOf" in current:
        return {**current, "anyOf": [_bounded(b) for b in current["anyOf"]]}
    return current


def _with_epoch(current: dict[str, Any]) -> dict[str, Any]:
    if current.get("type") == "string" and current.get("format") == "date-time":
        rest = {k: v for k, v in current.items() if k not in ("type", "format")}
        return {**rest, "anyOf": [{"type": "string", "format": "date-time"}, EPOCH_SCHEMA]}
    if "anyOf" in current:
        branches = current["anyOf"]
        if any(b.get("type") == "string" and b.get("format") == "date-time" for b in branches):
            return {**current, "anyOf": [*branches, EPOCH_SCHEMA]}
    return current


def _constrained(current: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`current` (FastAPI's schema of a `str` or `str | None` parameter) with the string branch constrained."""
    if "anyOf" in current:
        branches = [_constrained(b, extra) if b.get("type") == "string" else b for b in current["anyOf"]]
        return {**current, "anyOf": branches}
    if current.get("type") == "string" or not current:
        return {**current, **extra}
    return current


def _json_safe(value: Any) -> Any:
    # Validation errors echo the input back; a NaN/Infinity there would make the JSON renderer fail (a 500).
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def install_error_handlers(app: FastAPI) -> None:
    async def app_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AppError)
        return JSONResponse({"error": exc.code, "detail": exc.message}, status_code=exc.status_code)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": _loc(tuple(e.get("loc", ()))), "msg": e.get("msg", ""), "input": _json_safe(e.get("input"))}
            for e in exc.errors()
        ]
        message = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:10])
        return JSONResponse({"error": "validation_error", "detail": message, "errors": errors[:100]}, status_code=422)

    async def dependency_down(_: Request, exc: Exception) -> JSONResponse:
        # A database or network dependency that is down is the server's problem, not the client's: 503.
        log.warning("dependency unavailable: %s: %s", type(exc).__name__, exc)
        return JSONResponse(
            {"error": "service_unavailable", "detail": f"a dependency is unavailable ({type(exc).__name__})"},
            status_code=503,
        )

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        # The framework's own answers (unknown path, method not allowed, a body it could not read), in the same
        # shape as every other error.
        assert isinstance(exc, HTTPException)
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI could not read a JSON body at all (not UTF-8, say): the 422 of a JSON syntax error, the
            # same answer the routes that read their own body give.
            detail = f"body is not valid JSON: {exc.__cause__}"
            return JSONResponse({"error": "validation_error", "detail": detail}, status_code=422)
        headers = dict(exc.headers or {})
        detail = str(exc.detail)
        if exc.status_code == 404:
            detail = f"no such path: {request.url.path}"
        elif exc.status_code == 405:
            # Starlette names only the methods of the first route with this path; a path served by two
            # routes (GET and POST of /v1/jobs) supports the methods of both.
            allowed = _allowed_methods(request)
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not supported on {request.url.path}; it supports {', '.join(allowed)}"
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": detail}, status_code=exc.status_code, headers=headers)

    app.add_exception_handler(AppError, app_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    for exc_type in _dependency_errors():
        app.add_exception_handler(exc_type, dependency_down)

    async def bad_value(_: Request, exc: Exception) -> JSONResponse:
        # PostgreSQL refused a value that came from the client (a NUL byte, a date out of its range, ...):
        # validation should have caught it; either way it is the client's input, so 422, not 500.
        return JSONResponse({"error": "validation_error", "detail": f"invalid value: {exc}"}, status_code=422)

    import asyncpg

    app.add_exception_handler(asyncpg.DataError, bad_value)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "validation_error",
}


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] is not Match.NONE:
            methods.update(route_methods)
    return sorted(methods)


def _dependency_errors() -> tuple[type[Exception], ...]:
    from shared.db import DATABASE_DOWN

    return DATABASE_DOWN
