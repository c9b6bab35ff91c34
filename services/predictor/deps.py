"""Every dependency the predictor's routes take, in one place: the typed resources the lifespan put on
`app.state`, the API key roles and the shared query parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from starlette.applications import Starlette

from services.predictor.explanations import Explanations
from services.predictor.service import Predictor
from shared.auth import ReadKey

__all__ = [
    "ExplanationsDep",
    "PredictorDep",
    "ReadKey",
    "SymbolQuery",
    "TimeframeQuery",
    "explanations_of",
    "predictor_of",
]


def predictor_of(app: Starlette) -> Predictor:
    """The app's Predictor, put there by the lifespan (typed: no cast where routes read it)."""
    predictor = app.state.predictor
    if not isinstance(predictor, Predictor):
        raise RuntimeError("app.state.predictor is not set: the predictor's lifespan has not run")
    return predictor


def explanations_of(app: Starlette) -> Explanations:
    explanations = app.state.explanations
    if not isinstance(explanations, Explanations):
        raise RuntimeError("app.state.explanations is not set: the predictor's lifespan has not run")
    return explanations


# async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a hop that cost more than the
# whole cached prediction.
async def get_predictor(request: Request) -> Predictor:
    return predictor_of(request.app)


async def get_explanations(request: Request) -> Explanations:
    return explanations_of(request.app)


PredictorDep = Annotated[Predictor, Depends(get_predictor)]
ExplanationsDep = Annotated[Explanations, Depends(get_explanations)]
SymbolQuery = Annotated[str | None, Query(description="series symbol; omit for the default scope")]
TimeframeQuery = Annotated[str | None, Query(description="series timeframe; omit for the symbol's default")]
