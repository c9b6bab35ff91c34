"""What a dead Redis costs one request: the shared client (short timeouts, one retry) vs redis-py defaults.

`python -m benchmarks.bench_foundation [--quick]` prints a Markdown section.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

import numpy as np
import redis.asyncio as aioredis

from benchmarks.common import Paired, warnings_of
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


async def one(client: aioredis.Redis) -> float:
    """Seconds one GET takes to fail (GIVE_UP_S when it has not by then)."""
    t = time.perf_counter()
    try:
        await asyncio.wait_for(client.get("k"), GIVE_UP_S)
    except TimeoutError:
        return GIVE_UP_S
    except Exception:  # the error is the point; we time it
        pass
    return time.perf_counter() - t


async def main_async(quick: bool) -> tuple[list[str], list[Paired]]:
    pairs = 3 if quick else 5
    server, silent = await silent_server()
    rows = [
        "| Redis is... | shared client (50 ms timeouts, 1 retry) | redis-py 8 defaults | defaults / shared, per pair |",
        "| --- | ---: | ---: | ---: |",
    ]
    figures = []
    for label, port in (("down (connection refused)", closed_port()), ("hung (accepts, never answers)", silent)):
        url = f"redis://127.0.0.1:{port}/0"
        ours = create_redis(Settings(redis_url=url), "bench")
        assert ours is not None
        default = aioredis.Redis.from_url(url)
        got: dict[str, list[float]] = {"ours": [], "default": []}
        for k in range(pairs):  # alternating pairs, the order swapped every other pair
            order = ("ours", "default") if k % 2 == 0 else ("default", "ours")
            for side in order:
                got[side].append(await one(ours if side == "ours" else default))
        f = Paired(got["ours"], got["default"], factor=True)
        figures.append(f)
        rows.append(
            f"| {label} | {np.median(got['ours']) * 1e3:.1f} ms | {np.median(got['default']) * 1e3:.1f} ms"
            f"{' (gave up)' if max(got['default']) >= GIVE_UP_S else ''} | {f.times()} |"
        )
    server.close()
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    lines = [
        "## Foundation: cost of a dead cache",
        "",
        "Median time one `GET` takes to fail (loopback), the two clients in alternating pairs; the last column "
        "is the median of the per-pair ratios with their range:",
        "",
    ]
    rows, figures = asyncio.run(main_async(args.quick))
    lines += rows
    warn = warnings_of(*figures)
    if warn:
        lines += ["", *warn]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
