"""Prometheus metrics: two per HTTP request, `/metrics` correct with several uvicorn workers.

With PROMETHEUS_MULTIPROC_DIR set (as `make up`, compose and k8s do), each worker writes its samples to
files there and `/metrics` aggregates them, so any worker answering a scrape reports the whole process
group. Collectors that compute values at scrape time (staleness) are added per service.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector
from starlette.types import Scope


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


# Request latency buckets (seconds): the alerts read p95 against 100 ms.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# The two series prometheus-fastapi-instrumentator wrote (same names, help, labels and buckets, so dashboards,
# alerts and recorded history carry on), recorded by shared.app.RequestIdMiddleware in the same ASGI layer as
# the request id: the instrumentator's own layer matched the request against every route a second time and
# built a Request, a Response and an asyncio.gather per request. Hand-written for that measured reason
# (benchmarks/bench_stack.py, in-process, two runs on 2026-12-02: the instrumentator with these two metrics
# +59 and +81 us a request over bare FastAPI; request id and these metrics in one layer +16 and +18 us); the
# instrumentator stays the reference row in that benchmark.
HTTP_REQUESTS = Counter(
    "http_requests_total", "Total number of requests by method, status and handler.", ("handler", "method", "status")
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Duration of HTTP requests in seconds",
    ("handler", "method"),
    buckets=LATENCY_BUCKETS,
)
# Not recorded: scrapes and probes. A pattern is searched in the route's path (or, for a request that matched
# no route, in its path), as the instrumentator's `excluded_handlers` were.
EXCLUDED_HANDLERS = (re.compile("/metrics"), re.compile("/health"), re.compile("/health/ready"))


class HttpMetrics:
    """`http_requests_total` and `http_request_duration_seconds` of one request, from what the router left in
    the ASGI scope: `scope["route"]`, the matched route (a partial match, a 405, included), whose path template
    is the `handler` label; "none" when no route matched (a 404), so clients cannot mint label values. The
    labelled children are looked up once per (handler, method, status), not on every request."""

    def __init__(self) -> None:
        self._children: dict[tuple[str | None, str, int], tuple[Any, Any] | None] = {}

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        template = getattr(scope.get("route"), "path", None)
        handler = template if isinstance(template, str) else None
        method = scope.get("method", "")
        if handler is None and any(p.search(scope.get("path", "")) for p in EXCLUDED_HANDLERS):
            return  # keyed below by the template only: a client's paths never grow this cache
        key = (handler, method, status)
        if key in self._children:
            children = self._children[key]
        else:
            children = self._children[key] = self._resolve(handler, method, status)
        if children is not None:
            children[0].inc()
            children[1].observe(seconds)

    @staticmethod
    def _resolve(handler: str | None, method: str, status: int) -> tuple[Any, Any] | None:
        if handler is not None and any(p.search(handler) for p in EXCLUDED_HANDLERS):
            return None
        label = handler or "none"
        return HTTP_REQUESTS.labels(label, method, str(status)), HTTP_DURATION.labels(label, method)


def install_metrics(app: FastAPI, extra_collectors: Iterable[Collector] = ()) -> None:
    """`/metrics`: this process's (or, in multiprocess mode, every worker's) samples and the service's own
    collectors computed at scrape time. The per-request metrics come from `HttpMetrics`."""
    extras = list(extra_collectors)

    def render() -> bytes:
        if multiprocess_dir():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            for c in extras:
                registry.register(c)
            return generate_latest(registry)
        output = generate_latest(REGISTRY)
        if extras:
            registry = CollectorRegistry()
            for c in extras:
                registry.register(c)
            output += generate_latest(registry)
        return output

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(render(), media_type=CONTENT_TYPE_LATEST)
