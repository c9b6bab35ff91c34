"""A minimal trainer API for the predictor's tests: `POST /v1/explanations` as the trainer's contract says
(check the key, find the prediction in PostgreSQL, record a queued row in `prediction_explanations`, 202).

Run by uvicorn in its own process (`tests/predictor/conftest.py`), so the predictor talks to it over real
HTTP; it computes nothing. Environment: DATABASE_URL, FAKE_TRAINER_KEY.
"""

from __future__ import annotations

import os
import uuid

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def explanations(request: Request) -> JSONResponse:
    if request.headers.get("x-api-key") != os.environ["FAKE_TRAINER_KEY"]:
        return JSONResponse({"error": "unauthorized", "detail": "invalid API key"}, status_code=401)
    body = await request.json()
    try:
        pid = str(uuid.UUID(str(body.get("prediction_id"))))
    except ValueError:
        return JSONResponse({"error": "validation_error", "detail": "prediction_id must be a UUID"}, status_code=422)
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM predictions WHERE id = $1::uuid)", pid):
            return JSONResponse({"error": "not_found", "detail": f"no prediction {pid}"}, status_code=404)
        await conn.execute(
            "INSERT INTO prediction_explanations (prediction_id) VALUES ($1::uuid) ON CONFLICT DO NOTHING", pid
        )
    finally:
        await conn.close()
    return JSONResponse({"prediction_id": pid, "status": "queued"}, status_code=202)


async def health(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/v1/explanations", explanations, methods=["POST"]), Route("/health", health)])
