"""Asking the trainer for work the predictor cannot do itself (explanations need TensorFlow and shap, which
the predictor never imports): one pooled HTTP client with explicit timeouts."""

from __future__ import annotations

import httpx
import orjson

from services.predictor.features_client import response_detail
from services.predictor.settings import PredictorSettings
from shared.errors import NotFoundError, ServiceUnavailable


class TrainerUnavailable(ServiceUnavailable):
    code = "trainer_unavailable"


class TrainerClient:
    def __init__(self, settings: PredictorSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = settings.trainer_url.rstrip("/")
        self.timeout_s = settings.trainer_timeout_seconds
        headers = {"User-Agent": "aicash-predictor", "Content-Type": "application/json"}
        key = settings.trainer_api_key.get_secret_value()
        if key:
            headers["X-API-Key"] = key
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(settings.trainer_timeout_seconds, connect=min(0.5, settings.trainer_timeout_seconds)),
            # Explanations are asked for now and then, not per prediction: a few connections are plenty.
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=2),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def request_explanation(self, prediction_id: str) -> None:
        """Ask the trainer to explain a logged prediction; it queues the work and records the queued row in
        `prediction_explanations` itself. Raises TrainerUnavailable when it cannot be asked."""
        try:
            r = await self.client.post("/v1/explanations", content=orjson.dumps({"prediction_id": prediction_id}))
        except httpx.TimeoutException:
            raise TrainerUnavailable(
                f"trainer service at {self.base_url} did not answer within {self.timeout_s:g} s; "
                "the explanation was not requested, try again later"
            ) from None
        except httpx.HTTPError as exc:
            raise TrainerUnavailable(
                f"trainer service at {self.base_url} is unreachable ({type(exc).__name__}); "
                "the explanation was not requested, try again later"
            ) from None
        # 409: already queued (by another request, another worker): as good as accepted.
        if r.status_code in (200, 201, 202, 409):
            return
        if r.status_code == 404:
            raise NotFoundError(f"the trainer does not find prediction {prediction_id}: {response_detail(r)}")
        if r.status_code in (401, 403):
            # The predictor's own key was refused: an operator's problem, not the client's.
            raise TrainerUnavailable("the trainer refused the predictor's TRAINER_API_KEY; the operator must fix it")
        raise TrainerUnavailable(f"trainer service answered {r.status_code}: {response_detail(r)}")
