"""A tiny ASGI app that stands in for a service behind nginx in test_nginx.py.

It answers every request with JSON naming itself (UPSTREAM_NAME, UPSTREAM_PORT from the environment),
the path and method it saw, the X-Request-ID it received and how many body bytes arrived. Plain ASGI:
nothing to import but the standard library, so each process starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
from typing import Any

NAME = os.environ.get("UPSTREAM_NAME", "upstream")
PORT = int(os.environ.get("UPSTREAM_PORT", "0"))


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body_bytes = 0
    more = True
    while more:
        message = await receive()
        body_bytes += len(message.get("body", b""))
        more = message.get("more_body", False)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if scope["path"] == "/v1/signals/stream":
        await _stream(send)
        return
    payload = json.dumps(
        {
            "name": NAME,
            "port": PORT,
            "method": scope["method"],
            "path": scope["path"],
            "request_id": headers.get("x-request-id"),
            "body_bytes": body_bytes,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            # Like the real services (shared/app.py), echo the request id.
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *([(b"x-request-id", headers["x-request-id"].encode())] if "x-request-id" in headers else []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _stream(send: Any) -> None:
    """Like the signal stream: an event now, another after STREAM_GAP_SECONDS, with no header asking the
    proxy not to buffer (the nginx location must not buffer on its own)."""
    import asyncio

    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": f"event: signal\ndata: {NAME}\n\n".encode(), "more_body": True})
    await asyncio.sleep(STREAM_GAP_SECONDS)
    await send({"type": "http.response.body", "body": b"event: signal\ndata: second\n\n", "more_body": False})


STREAM_GAP_SECONDS = 1.5


def main() -> None:
    """`python upstream_app.py FD`: serve on the listening socket inherited as file descriptor FD.

    The test binds the socket itself (port 0, no race for a free port) and passes it down.
    """
    import socket
    import sys

    import uvicorn

    sock = socket.socket(fileno=int(sys.argv[1]))
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
