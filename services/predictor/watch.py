"""`aicash watch`: print bar-close signals as the predictor streams them (GET /v1/signals/stream).

On a dropped connection it reconnects with `Last-Event-ID`, so the signals published meanwhile are printed
once, in order (docs/STREAMING.md, "Resume").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import typer
from httpx_sse import SSEError, connect_sse
from rich.console import Console

# Reconnect delays after a dropped connection: 0.5 s doubling to 10 s; reset by any event.
_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 10.0


class StreamRefused(Exception):
    """The predictor answered the stream request with an error status (bad series, key): not retried."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def line(body: dict[str, Any]) -> str:
    """One signal as one line: bar, series, signal and confidence, consensus, model, prediction id."""
    consensus = body.get("consensus") or {}
    return (
        f"{body['bar_ts']}  {body['symbol']}:{body['timeframe']}  {body['signal']:<4} {body['confidence']:.1%}  "
        f"consensus {consensus.get('signal', '-')}  model {body['model_version']} ({body.get('variant', '-')})  "
        f"id {body['prediction_id']}"
    )


def _detail(r: httpx.Response) -> str:
    r.read()
    try:
        return str(r.json().get("detail", r.text))
    except ValueError:
        return r.text


def stream_once(
    client: httpx.Client,
    series: str,
    last_event_id: str | None,
    on_signal: Callable[[str, dict[str, Any]], bool],
    on_notice: Callable[[str, dict[str, Any]], None],
    user_id: str | None = None,
) -> str | None:
    """One connection: hands each event on until the stream ends or `on_signal` returns False; returns the
    id of the last signal received (to resume from)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    params = {"series": series, **({"user_id": user_id} if user_id else {})}
    with connect_sse(client, "GET", "/v1/signals/stream", params=params, headers=headers) as source:
        r = source.response
        if r.status_code != 200:
            raise StreamRefused(r.status_code, _detail(r))
        for sse in source.iter_sse():
            if sse.event == "signal":
                last_event_id = sse.id or last_event_id
                if not on_signal(sse.id, json.loads(sse.data)):
                    break
            elif sse.event in ("error", "status"):
                try:
                    body = json.loads(sse.data)
                except ValueError:
                    body = {"detail": sse.data}
                on_notice(sse.event, body)
    return last_event_id


def watch(
    url: str,
    key: str,
    series: str,
    *,
    on_signal: Callable[[str, dict[str, Any]], bool],
    on_notice: Callable[[str, dict[str, Any]], None],
    on_retry: Callable[[str, float], None],
    last_event_id: str | None = None,
    user_id: str | None = None,
    reconnect: bool = True,
) -> str | None:
    """Follow the stream, reconnecting with Last-Event-ID after a dropped connection, until `on_signal` says
    stop (or, without `reconnect`, the first connection ends). Returns the last signal id."""
    delay = _FIRST_DELAY_S
    stop = False

    def signal(event_id: str, body: dict[str, Any]) -> bool:
        nonlocal stop, delay
        delay = _FIRST_DELAY_S
        stop = not on_signal(event_id, body)
        return not stop

    # The server pings every STREAM_PING_SECONDS (15 s by default): a read silent for 60 s is a dead connection.
    timeout = httpx.Timeout(10.0, read=60.0)
    with httpx.Client(base_url=url.rstrip("/"), headers={"X-API-Key": key}, timeout=timeout) as client:
        while True:
            try:
                last_event_id = stream_once(client, series, last_event_id, signal, on_notice, user_id)
                reason = "the stream ended"
            except (httpx.HTTPError, SSEError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if stop or not reconnect:
                return last_event_id
            on_retry(reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY_S)


def register(app: typer.Typer) -> None:
    @app.command("watch")
    def watch_command(
        series: Annotated[list[str], typer.Option("--series", help="SYMBOL:TIMEFRAME, e.g. EURUSD:H1 (repeatable)")],
        url: Annotated[str, typer.Option(envvar="PREDICTOR_URL")] = "http://127.0.0.1:8080",
        key: Annotated[str, typer.Option(envvar="AICASH_API_KEY", help="API key with role read")] = "",
        last_event_id: Annotated[
            str | None, typer.Option("--last-event-id", help="resume after this prediction id")
        ] = None,
        user_id: Annotated[str | None, typer.Option("--user-id")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print each signal's JSON on one line")] = False,
        count: Annotated[int, typer.Option("--count", help="stop after this many signals; 0 runs on")] = 0,
    ) -> None:
        """Print signals as they are computed at each bar close; reconnects and resumes by Last-Event-ID."""
        console = Console(highlight=False)
        err = Console(stderr=True, highlight=False)
        seen = 0

        def on_signal(_event_id: str, body: dict[str, Any]) -> bool:
            nonlocal seen
            seen += 1
            if as_json:
                print(json.dumps(body, separators=(",", ":")), flush=True)
            else:
                console.print(line(body))
            return count <= 0 or seen < count

        def on_notice(event: str, body: dict[str, Any]) -> None:
            err.print(f"[yellow]{event}: {body.get('reason', '')} {body.get('detail', '')}[/yellow]")

        def on_retry(reason: str, delay: float) -> None:
            err.print(f"[yellow]{reason}; reconnecting in {delay:g} s[/yellow]")

        try:
            watch(
                url,
                key,
                ",".join(series),
                on_signal=on_signal,
                on_notice=on_notice,
                on_retry=on_retry,
                last_event_id=last_event_id,
                user_id=user_id,
            )
        except StreamRefused as exc:
            err.print(f"[red]{exc.status}: {exc.detail}[/red]")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(0) from None
