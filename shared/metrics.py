"""Prometheus metrics: the instrumentator for HTTP, `/metrics` correct with several uvicorn workers.

With PROMETHEUS_MULTIPROC_DIR set (as `make up`, compose and k8s do), each worker writes its samples to
files there and `/metrics` aggregates them, so any worker answering a scrape reports the whole process
group. Collectors that compute values at scrape time (staleness) are added per service.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


def install_metrics(app: FastAPI, extra_collectors: Iterable[Collector] = ()) -> None:
    Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=["/metrics", "/health", "/health/ready"],
    ).instrument(app)
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
