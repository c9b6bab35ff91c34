"""orjson-rendered JSON for the few answers where it was measured to matter (FastAPI deprecated ORJSONResponse).

Every other route returns its pydantic `response_model`, which FastAPI 0.165 validates and writes with
pydantic-core. That costs more on the indicators service's hot, large answers, measured by
`benchmarks/bench_stack.py` (`response_rows`, 2 cores, best of 3; building the body included in each column):

| answer | orjson (this class) | `response_model` | stdlib json (`JSONResponse`) |
| --- | ---: | ---: | ---: |
| `GET /v1/indicators`, 20 rows as `columns` (the predictor's call, once per uncached prediction) | 26 µs | 110 µs | 527 µs |
| `GET /v1/indicators`, 100 rows as `rows` (the default) | 661 µs | 1,354 µs | 3,726 µs |
| `GET /v1/bars`, 1,000 bars (the default limit) | 1.6 ms | 8.0 ms | 9.3 ms |
| `GET /v1/bars`, 50,000 bars (the most one request returns) | 107 ms | 701 ms | 409 ms |

orjson also writes the `columns` matrix straight from its numpy array (`OPT_SERIALIZE_NUMPY`); the other two
need `tolist()` first. So those routes (`services/indicators/routes.py`) return `JSON` and declare their
models for the OpenAPI document only.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class JSON(JSONResponse):
    """A JSONResponse rendered by orjson, numpy arrays included (NaN and infinities become null)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
