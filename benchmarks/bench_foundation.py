"""What a dead Redis costs one request: the shared client (short timeouts, one retry) vs redis-py defaults.

`python -m benchmarks.bench_foundation [--quick]` prints a Markdown section.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

import redis.asyncio as aioredis

from shared.cache import create_redis
from shared.settings import Settings

GIVE_UP_S = 10.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def silent_server() -> tuple[asyncio.Server, int]:
    """Accepts connections and never answers (a hung Redis, a black-holed network path)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):  # read and ignore until the client hangs up
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def cost(client: aioredis.Redis, tries: int) -> str:
    samples = []
    for _ in range(tries):
        t = time.perf_counter()
        try:
            await asyncio.wait_for(client.get("k"), GIVE_UP_S)
        except TimeoutError:
            return f"> {GIVE_UP_S:.0f} s (gave up)"
        except Exception:  # the error is the point; we time it
            pass
        samples.append(time.perf_counter() - t)
    samples.sort()
    return f"{samples[len(samples) // 2] * 1000:.1f} ms"


async def main_async(quick: bool) -> list[str]:
    tries = 3 if quick else 5
    server, silent = await silent_server()
    rows = ["| Redis is... | shared client (50 ms timeouts, 1 retry) | redis-py 8 defaults |", "| --- | ---: | ---: |"]
    for label, port in (("down (connection refused)", closed_port()), ("hung (accepts, never answers)", silent)):
        url = f"redis://127.0.0.1:{port}/0"
        ours = create_redis(Settings(redis_url=url), "bench")
        assert ours is not None
        default = aioredis.Redis.from_url(url)
        rows.append(f"| {label} | {await cost(ours, tries)} | {await cost(default, 1)} |")
    server.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    lines = [
        "## Foundation: cost of a dead cache",
        "",
        "Median time one `GET` takes to fail (one request, loopback):",
        "",
    ]
    lines += asyncio.run(main_async(args.quick))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
