"""Liveness (`/health`) and readiness (`/health/ready`) endpoints."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

Status = Literal["healthy", "degraded", "unhealthy"]


class Check(BaseModel):
    status: Status
    latency_ms: float
    error: str | None = None


class Readiness(BaseModel):
    status: Status
    timestamp: datetime
    services: dict[str, Check]


_READY_EXAMPLE = {
    "status": "healthy",
    "timestamp": "2024-03-01T10:00:02.114Z",
    "services": {"database": {"status": "healthy", "latency_ms": 0.61}},
}

# A check returns None when fine, or raises. `critical` checks make the service unhealthy (503) when they
# fail; the others make it degraded (still 200: it can do its job, worse).
CheckFn = Callable[[Request], Awaitable[None]]


async def check_database(request: Request) -> None:
    """The readiness check every service runs on its asyncpg pool (`app.state.pool`)."""
    await request.app.state.pool.fetchval("SELECT 1")


class ReadinessChecks:
    def __init__(self) -> None:
        self.checks: dict[str, tuple[CheckFn, bool]] = {}

    def add(self, name: str, fn: CheckFn, *, critical: bool) -> None:
        self.checks[name] = (fn, critical)


async def _run(fn: CheckFn, request: Request, timeout_s: float) -> tuple[bool, float, str | None]:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(fn(request), timeout_s)
        ok, err = True, None
    except TimeoutError:
        ok, err = False, f"no answer within {timeout_s:.1f} s"
    except Exception as exc:  # any failure of a dependency is reported, not raised
        ok, err = False, f"{type(exc).__name__}: {exc}"[:300]
    return ok, (time.perf_counter() - start) * 1000, err


def install_health(app: FastAPI, checks: ReadinessChecks, timeout_s: float = 2.0) -> None:
    @app.get(
        "/health",
        tags=["health"],
        summary="Liveness",
        responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
    )
    async def health() -> dict[str, str]:
        """Liveness: the process answers. Checks no dependency."""
        return {"status": "ok"}

    @app.get(
        "/health/ready",
        tags=["health"],
        summary="Readiness",
        response_model=Readiness,
        response_model_exclude_none=True,
        responses={
            200: {"content": {"application/json": {"example": _READY_EXAMPLE}}},
            503: {"description": "The service cannot do its job", "model": Readiness},
        },
    )
    async def ready(request: Request, response: Response) -> Readiness:
        """Readiness: each dependency with its status and latency. 200 when healthy or degraded, 503 when
        a dependency the service cannot work without is down."""
        names = list(checks.checks)
        results = await asyncio.gather(*(_run(checks.checks[n][0], request, timeout_s) for n in names))
        services: dict[str, Check] = {}
        status: Status = "healthy"
        for name, (ok, latency, err) in zip(names, results, strict=True):
            critical = checks.checks[name][1]
            services[name] = Check(
                status="healthy" if ok else ("unhealthy" if critical else "degraded"),
                latency_ms=round(latency, 3),
                error=err,
            )
            if not ok:
                status = "unhealthy" if critical else ("degraded" if status == "healthy" else status)
        response.status_code = 503 if status == "unhealthy" else 200
        return Readiness(status=status, timestamp=datetime.now(UTC), services=services)
