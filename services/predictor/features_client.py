"""Feature rows from the indicators service over HTTP: one pooled client, explicit timeouts.

Training and serving share one feature code path (shared/features.py inside the indicators service); the
predictor never computes an indicator itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson

from services.predictor.settings import PredictorSettings
from shared.errors import NotFoundError, PayloadTooLarge, ServiceUnavailable, ValidationFailed


@dataclass(frozen=True)
class Rows:
    """Feature rows of one timeframe, newest last."""

    ts: list[str]
    names: list[str]
    values: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.ts)

    def window(self, names: list[str], n: int) -> npt.NDArray[np.float64]:
        """The newest `n` rows with columns in `names` order."""
        cols = [self.names.index(name) for name in names]
        return np.ascontiguousarray(self.values[-n:, cols])


class FeaturesUnavailable(ServiceUnavailable):
    code = "indicators_unavailable"


_HAVE_RE = re.compile(r"have (\d+)")


def have_bars(detail: str) -> int | None:
    m = _HAVE_RE.search(detail)
    return int(m.group(1)) if m else None


class IndicatorsClient:
    def __init__(self, settings: PredictorSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = settings.indicators_url.rstrip("/")
        self.timeout_s = settings.indicators_timeout_seconds
        headers = {"User-Agent": "aicash-predictor"}
        key = settings.indicators_api_key.get_secret_value()
        if key:
            headers["X-API-Key"] = key
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(
                settings.indicators_timeout_seconds, connect=settings.indicators_connect_timeout_seconds
            ),
            limits=httpx.Limits(
                max_connections=settings.indicators_max_connections,
                max_keepalive_connections=settings.indicators_max_connections,
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def stored(self, symbol: str, timeframe: str, targets: list[str], limit: int) -> dict[str, Rows]:
        params = {"limit": str(limit), "timeframes": ",".join(targets), "format": "columns"}
        return await self._call("GET", f"/v1/indicators/{symbol}/{timeframe}", params=params)

    async def from_bars(
        self, symbol: str, timeframe: str, targets: list[str], limit: int, bars: list[Any]
    ) -> dict[str, Rows]:
        body = orjson.dumps(
            {"symbol": symbol, "timeframe": timeframe, "timeframes": targets, "limit": limit, "bars": bars}
        )
        return await self._call(
            "POST",
            "/v1/indicators",
            params={"format": "columns"},
            content=body,
            headers={"Content-Type": "application/json"},
        )

    async def health(self) -> None:
        r = await self.client.get("/health/ready", timeout=1.5)
        if r.status_code >= 500:
            raise RuntimeError(f"indicators /health/ready answered {r.status_code}")

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Rows]:
        try:
            r = await self.client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise FeaturesUnavailable(
                f"indicators service at {self.base_url} did not answer within {self.timeout_s:g} s; try again later"
            ) from None
        except httpx.HTTPError as exc:
            raise FeaturesUnavailable(
                f"indicators service at {self.base_url} is unreachable ({type(exc).__name__}); try again later"
            ) from None
        if r.status_code == 200:
            return _parse(r.content)
        detail = response_detail(r)
        if r.status_code == 404:
            raise NotFoundError(detail)
        if r.status_code == 422:
            raise ValidationFailed(detail)
        if r.status_code == 413:
            raise PayloadTooLarge(detail)
        if r.status_code in (401, 403):
            # The predictor's own key was refused: an operator's problem, not the client's.
            raise FeaturesUnavailable("the indicators service refused the predictor's INDICATORS_API_KEY")
        raise FeaturesUnavailable(f"indicators service answered {r.status_code}: {detail}")


def response_detail(r: httpx.Response) -> str:
    """The `detail` of one of our services' error answers (shared.errors' shape), else the start of the body."""
    try:
        body = orjson.loads(r.content)
    except orjson.JSONDecodeError:
        return r.text[:300]
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    return r.text[:300]


def _parse(content: bytes) -> dict[str, Rows]:
    """The `format=columns` answer: {"timeframes": {TF: {"ts": [...], "names": [...], "values": [[...]]}}}."""
    body = orjson.loads(content)
    out: dict[str, Rows] = {}
    for tf, cols in body["timeframes"].items():
        ts = cols["ts"]
        if not ts:
            out[tf] = Rows([], [], np.empty((0, 0)))
            continue
        # null (a NaN the renderer could not write) becomes NaN here.
        out[tf] = Rows(ts, cols["names"], np.array(cols["values"], dtype=np.float64))
    return out
