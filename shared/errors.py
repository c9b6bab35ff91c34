"""One error base with a status code and a machine-readable code; one handler renders them all."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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


ERROR_SCHEMA: dict[str, Any] = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}, "detail": {}},
                "required": ["error", "detail"],
            }
        }
    }
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entry for a route's expected errors, so they appear in the OpenAPI document."""
    descriptions = {
        401: "Missing or invalid API key",
        403: "The API key's role may not do this",
        404: "Not found",
        409: "Conflict",
        413: "Body too large",
        422: "Invalid input; the detail names what was wrong",
        503: "A dependency is unavailable",
    }
    return {c: {"description": descriptions.get(c, "Error"), **ERROR_SCHEMA} for c in codes}


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

    app.add_exception_handler(AppError, app_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    for exc_type in _dependency_errors():
        app.add_exception_handler(exc_type, dependency_down)

    async def bad_value(_: Request, exc: Exception) -> JSONResponse:
        # PostgreSQL refused a value that came from the client (a NUL byte, a date out of its range, ...):
        # validation should have caught it; either way it is the client's input, so 422, not 500.
        return JSONResponse({"error": "validation_error", "detail": f"invalid value: {exc}"}, status_code=422)

    import asyncpg

    app.add_exception_handler(asyncpg.DataError, bad_value)


def _dependency_errors() -> tuple[type[Exception], ...]:
    import asyncpg

    return (
        OSError,
        TimeoutError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.TooManyConnectionsError,
    )
