"""orjson-rendered JSON for the few answers where it was measured to matter (FastAPI deprecated ORJSONResponse).

Every other route returns its pydantic `response_model`, which FastAPI 0.165 validates and writes with
pydantic-core. On the indicators service's hot and large answers that costs more, measured by
`benchmarks/bench_stack.py` (`response_rows`; building the body included; the range of 4 runs on the shared
2-core machine, 2026-12-01):

| answer | orjson (this class) | `response_model` | stdlib json (`JSONResponse`) |
| --- | ---: | ---: | ---: |
| `GET /v1/indicators`, 20 rows as `columns` (the predictor's call) | 26-49 µs | 81-123 µs (1.7-4.2×) | 319-553 µs |
| `GET /v1/indicators`, 100 rows as `rows` (the default) | 0.43-0.68 ms | 0.82-1.35 ms (1.6-2.0×) | 2.1-3.7 ms |
| `GET /v1/bars`, 1,000 bars (the default limit) | 1.1-1.6 ms | 3.8-8.0 ms (3.4-5.1×) | 5.7-9.3 ms |
| `GET /v1/bars`, 50,000 bars (the most one request returns) | 77-107 ms | 302-701 ms (3.4-6.6×) | 262-409 ms |

orjson also writes the `columns` matrix straight from its numpy array (`OPT_SERIALIZE_NUMPY`); the other two
need `tolist()` first. So those routes (`services/indicators/routes.py`) return `JSON` and declare their
models for the OpenAPI document only; the predictor's two prediction routes send bytes orjson rendered once
per cache entry.
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
