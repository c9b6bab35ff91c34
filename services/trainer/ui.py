"""The operator console: server-rendered pages at `/ui` on the trainer API (docs/CONSOLE.md).

Every page reads the services' own HTTP APIs with the signed-in user's API key, so the roles a page's data needs
are enforced by the same code as for any client: the trainer's routes in process (httpx over ASGI, no network
hop), the indicators and the predictor at INDICATORS_URL / PREDICTOR_URL. Two things no API serves are read from
PostgreSQL here, behind the same key check: the per-series bar counts by data-quality flag and the per-feature
drift checks (`feature_drift`). A page whose upstream is down or refuses says so in the page; it never fails
with a 500.

A browser cannot send `X-API-Key` on navigation, so `/ui/login` takes the key once and keeps it in an HttpOnly,
SameSite=Strict cookie (Secure when ENVIRONMENT=production); the key is checked by the API's Authenticator and
any role (read or more) may view. The console changes nothing: every route but login and logout is a GET.

The console is a sub-application mounted at `/ui`: HTML pages, its own error pages, no OpenAPI operations (the
API's document stays the API's), and it never imports TensorFlow or task code (tests/test_architecture.py).
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import httpx
import orjson
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from httpx_sse import aconnect_sse
from jinja2 import ChainableUndefined, Environment, FileSystemLoader, Undefined
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.trainer.settings import TrainerSettings
from shared.auth import Authenticator, Principal, Role
from shared.db import DATABASE_DOWN, with_retry
from shared.errors import AppError

log = logging.getLogger("trainer.ui")

HERE = Path(__file__).parent
COOKIE = "aicash_console_key"
# A login form's body: one key of at most a few hundred characters; anything much larger is not a login.
MAX_LOGIN_BODY_BYTES = 4096
# Timeouts of the console's calls to the services: a page waits at most this long for an upstream.
UPSTREAM_TIMEOUT_SECONDS = 5.0
AUDIT_ENTRIES = 50
DRIFT_ROWS = 500


class LoginRequired(Exception):
    """No valid key in the cookie: the browser is sent to the login form."""


@dataclass
class Upstream:
    """One upstream answer: `data` when it answered 2xx, else `error` says who failed and why, for the page."""

    data: Any = None
    error: str | None = None
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Viewer:
    principal: Principal
    key: str  # the secret the services are called with ("" when AUTH_DISABLED)


class Console:
    """What the console's routes share: settings, the API's Authenticator, the template environment and the
    HTTP clients (created by `running()`, which the trainer's lifespan enters)."""

    def __init__(self, api: FastAPI, settings: TrainerSettings) -> None:
        self.api = api
        self.settings = settings
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every value a page shows comes from an API or the database: escaped, always
            # A key a stored report lacks (older reports, another model kind) renders empty, never a 500.
            undefined=ChainableUndefined,
            enable_async=False,
        )
        self.env.filters["when"] = _when
        self.env.filters["num"] = _num
        self.env.filters["pct"] = _pct
        self.env.filters["tojson_short"] = _json_short
        self._http: httpx.AsyncClient | None = None
        self._local: httpx.AsyncClient | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        timeout = httpx.Timeout(UPSTREAM_TIMEOUT_SECONDS)
        async with (
            httpx.AsyncClient(timeout=timeout, headers={"user-agent": "aicash-console"}) as http,
            # The trainer's own routes, in process: same auth, same handlers, no socket.
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=self.api), base_url="http://trainer", timeout=timeout
            ) as local,
        ):
            self._http, self._local = http, local
            try:
                yield
            finally:
                self._http = self._local = None

    @property
    def auth(self) -> Authenticator:
        auth: Authenticator = self.api.state.auth
        return auth

    @property
    def pool(self) -> asyncpg.Pool:
        pool: asyncpg.Pool = self.api.state.pool
        return pool

    def base_url(self, service: str) -> str:
        return {"predictor": self.settings.predictor_url, "indicators": self.settings.indicators_url}.get(
            service, "in process"
        )

    def client(self, service: str) -> httpx.AsyncClient:
        client = self._local if service == "trainer" else self._http
        if client is None:
            raise RuntimeError("the console's HTTP clients are not running (Console.running() not entered)")
        return client

    async def get(
        self, viewer: Viewer, service: str, path: str, params: Mapping[str, str | int] | None = None
    ) -> Upstream:
        """GET `path` of a service with the viewer's key; any failure becomes a sentence for the page."""
        url = path if service == "trainer" else self.base_url(service).rstrip("/") + path
        headers = {"X-API-Key": viewer.key} if viewer.key else {}
        try:
            r = await self.client(service).get(url, params=params, headers=headers)
        except httpx.HTTPError as exc:
            where = self.base_url(service)
            return Upstream(error=f"the {service} service ({where}) is unreachable: {type(exc).__name__} {exc}")
        if r.status_code >= 400:
            return Upstream(error=f"the {service} service answered {r.status_code}: {_detail(r)}", status=r.status_code)
        try:
            return Upstream(data=r.json(), status=r.status_code)
        except ValueError:
            return Upstream(error=f"the {service} service answered {r.status_code} with a body that is not JSON")

    async def query(self, fn: Any) -> Upstream:
        try:
            return Upstream(data=await with_retry(fn))
        except DATABASE_DOWN as exc:
            return Upstream(error=f"the database is unavailable: {type(exc).__name__}")

    def page(self, request: Request, name: str, viewer: Viewer | None, status_code: int = 200, **ctx: Any) -> Response:
        html = self.env.get_template(name).render(
            viewer=viewer, root=_root(request), page=name.removesuffix(".html"), **ctx
        )
        return HTMLResponse(html, status_code=status_code)


def _root(request: Request) -> str:
    # The mount's prefix ("/ui" behind any root_path): links work wherever the console is mounted.
    return str(request.scope.get("root_path", "")).rstrip("/")


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300] or r.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:300]


def _when(value: Any) -> str:
    if value is None or value == "" or isinstance(value, Undefined):
        return "-"
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        return datetime.fromisoformat(str(value)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return str(value)


def _num(value: Any, digits: int = 4) -> str:
    if value is None or isinstance(value, Undefined):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{float(value) * 100:.1f} %"


def _json_short(value: Any, limit: int = 300) -> str:
    if value is None or isinstance(value, Undefined):
        return ""
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the sign-in cookie ----------------------------------------------------------------------------------------


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


ConsoleDep = Annotated[Console, Depends(_console)]


async def _viewer(request: Request, console: ConsoleDep) -> Viewer:
    auth = console.auth
    if auth.disabled:
        return Viewer(auth.authenticate(None), "")
    key = request.cookies.get(COOKIE)
    if not key:
        raise LoginRequired
    try:
        principal = auth.authenticate(key)
    except AppError:
        raise LoginRequired from None
    if principal.role < Role.read:  # every role views; the pages' data keep their own roles upstream
        raise LoginRequired
    return Viewer(principal, key)


ViewerDep = Annotated[Viewer, Depends(_viewer)]


def _safe_next(value: str | None, root: str) -> str:
    """Only a path of this console (no scheme, no host, no `//`): a login never redirects off-site."""
    if value and value.startswith(root + "/") and not value.startswith("//") and "\\" not in value:
        return value
    return root + "/"


# --- repositories: what no service's API serves ----------------------------------------------------------------


async def _series_quality(pool: asyncpg.Pool) -> dict[tuple[str, str], dict[str, Any]]:
    """Bars per stored series and how many carry each data-quality flag (shared/quality.py: 1 move, 2 gap)."""
    rows = await pool.fetch(
        "SELECT symbol, timeframe, count(*) AS bars, count(*) FILTER (WHERE flags & 1 <> 0) AS moves, "
        "count(*) FILTER (WHERE flags & 2 <> 0) AS gaps FROM bars GROUP BY symbol, timeframe"
    )
    return {(r["symbol"], r["timeframe"]): dict(r) for r in rows}


async def _latest_drift(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """The newest drift check of every (series, model version, feature), newest series check first."""
    rows = await pool.fetch(
        "SELECT DISTINCT ON (symbol, timeframe, model_version, feature) symbol, timeframe, model_version, feature, "
        "psi, ks, live_bars, window_start, window_end, drifted, computed_at FROM feature_drift "
        "ORDER BY symbol, timeframe, model_version, feature, computed_at DESC LIMIT $1",
        DRIFT_ROWS,
    )
    return [dict(r) for r in rows]


async def _flags(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT symbol, timeframe, drift, performance, reason, updated_at FROM model_flags ORDER BY symbol, timeframe"
    )
    return [dict(r) for r in rows]


# --- pages ------------------------------------------------------------------------------------------------------


def _served_series(models: Upstream) -> list[tuple[str, str]]:
    """(symbol, timeframe) of every series with a production model in the registry."""
    if not models.ok:
        return []
    return sorted({(m["symbol"], m["timeframe"]) for m in models.data if m.get("status") == "production"})


def _pooled_equity(validation: dict[str, Any]) -> dict[str, Any] | None:
    models = validation.get("report", {}).get("models", {})
    lstm = models.get("lstm") or next(iter(models.values()), None)
    curve = (lstm or {}).get("pooled", {}).get("equity")
    return curve if curve and curve.get("equity") else None


def create_console(api: FastAPI, settings: TrainerSettings) -> FastAPI:
    """The console's ASGI app (mount it at `/ui`); `app.state.console.running()` belongs in the API's lifespan."""
    ui = FastAPI(title="AI Cash Evolution — console", docs_url=None, redoc_url=None, openapi_url=None)
    console = Console(api, settings)
    ui.state.console = console
    ui.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @ui.exception_handler(LoginRequired)
    async def _to_login(request: Request, _: LoginRequired) -> Response:
        root = _root(request)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{root}/login?next={urllib.parse.quote(target)}", status_code=303)

    @ui.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request, next: str | None = None) -> Response:
        return console.page(request, "login.html", None, next=_safe_next(next, _root(request)), error=None)

    @ui.post("/login")
    async def login(request: Request) -> Response:
        root = _root(request)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY_BYTES:
                return console.page(
                    request, "login.html", None, 413, next=root + "/", error="the form is too large for a key"
                )
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        target = _safe_next((form.get("next") or [""])[0], root)
        try:
            principal = console.auth.authenticate(key or None)
        except AppError as exc:
            # 401 with the form again: what was wrong, never which keys exist.
            return console.page(request, "login.html", None, 401, next=target, error=exc.message)
        log.info("console login by key %s (role %s)", principal.key_id, principal.role.name)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            key,
            httponly=True,
            samesite="strict",
            secure=settings.environment == "production",
            path=root + "/",
        )
        return response

    @ui.post("/logout")
    async def logout(request: Request) -> Response:
        root = _root(request)
        response = RedirectResponse(f"{root}/login", status_code=303)
        response.delete_cookie(COOKIE, path=root + "/", httponly=True, samesite="strict")
        return response

    @ui.get("/", response_class=HTMLResponse)
    async def overview(request: Request, viewer: ViewerDep) -> Response:
        models = await console.get(viewer, "trainer", "/v1/models", {"status": "production"})
        jobs = await console.get(viewer, "trainer", "/v1/jobs", {"limit": 10})
        return console.page(request, "overview.html", viewer, models=models, jobs=jobs)

    @ui.get("/series", response_class=HTMLResponse)
    async def series(request: Request, viewer: ViewerDep) -> Response:
        listed = await console.get(viewer, "indicators", "/v1/series")
        quality = await console.query(lambda: _series_quality(console.pool))
        rows = []
        for s in listed.data or []:
            q = (quality.data or {}).get((s["symbol"], s["timeframe"]), {})
            rows.append({**s, "bars": q.get("bars"), "moves": q.get("moves"), "gaps": q.get("gaps")})
        return console.page(request, "series.html", viewer, listed=listed, quality=quality, rows=rows)

    @ui.get("/models", response_class=HTMLResponse)
    async def models(request: Request, viewer: ViewerDep) -> Response:
        registry = await console.get(viewer, "trainer", "/v1/models")
        return console.page(request, "models.html", viewer, registry=registry)

    @ui.get("/models/{model_id}", response_class=HTMLResponse)
    async def model(request: Request, viewer: ViewerDep, model_id: int) -> Response:
        detail = await console.get(viewer, "trainer", f"/v1/models/{model_id}")
        validation = await console.get(viewer, "trainer", f"/v1/models/{model_id}/validation")
        report = validation.data["report"] if validation.ok else None
        equity = _pooled_equity(validation.data) if validation.ok else None
        status = detail.status if detail.status in (404,) else 200
        return console.page(
            request,
            "model.html",
            viewer,
            status_code=status,
            model_id=model_id,
            detail=detail,
            validation=validation,
            report=report,
            has_equity=equity is not None,
        )

    @ui.get("/models/{model_id}/equity.png")
    async def equity_png(viewer: ViewerDep, model_id: int) -> Response:
        """The pooled out-of-sample equity curve of the version's latest validation, drawn by the same code as
        `aicash report` (services/trainer/report.py), from the report the API serves."""
        import anyio

        from services.trainer.report import equity_png as draw

        validation = await console.get(viewer, "trainer", f"/v1/models/{model_id}/validation")
        curve = _pooled_equity(validation.data) if validation.ok else None
        if curve is None:
            detail = validation.error or f"model version {model_id}'s validation has no equity curve"
            return Response(detail, status_code=validation.status or 404, media_type="text/plain")
        title = f"{validation.data['symbol']} {validation.data['timeframe']}: validation {validation.data['id']}"
        png = await anyio.to_thread.run_sync(lambda: draw(curve["ts"], curve["equity"], curve["drawdown"], title))
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=60"})

    @ui.get("/rollouts", response_class=HTMLResponse)
    async def rollouts(request: Request, viewer: ViewerDep) -> Response:
        registry = await console.get(viewer, "trainer", "/v1/models")
        items = []
        for symbol, timeframe in _served_series(registry):
            rollout = await console.get(viewer, "trainer", f"/v1/rollouts/{symbol}/{timeframe}")
            perf = await console.get(viewer, "predictor", "/v1/performance", {"symbol": symbol, "timeframe": timeframe})
            items.append({"symbol": symbol, "timeframe": timeframe, "rollout": rollout, "performance": perf})
        served = await console.get(viewer, "predictor", "/v1/models")
        return console.page(request, "rollouts.html", viewer, registry=registry, items=items, served=served)

    @ui.get("/drift", response_class=HTMLResponse)
    async def drift(request: Request, viewer: ViewerDep) -> Response:
        checks = await console.query(lambda: _latest_drift(console.pool))
        flags = await console.query(lambda: _flags(console.pool))
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for row in checks.data or []:
            groups.setdefault((row["symbol"], row["timeframe"], row["model_version"]), []).append(row)
        return console.page(request, "drift.html", viewer, checks=checks, groups=groups, flags=flags)

    @ui.get("/audit", response_class=HTMLResponse)
    async def audit(request: Request, viewer: ViewerDep) -> Response:
        page = await console.get(viewer, "trainer", "/v1/audit", {"limit": AUDIT_ENTRIES})
        return console.page(request, "audit.html", viewer, audit=page)

    @ui.get("/live", response_class=HTMLResponse)
    async def live(request: Request, viewer: ViewerDep) -> Response:
        served = await console.get(viewer, "predictor", "/v1/models")
        names = sorted({f"{m['symbol']}:{m['timeframe']}" for m in served.data or [] if m["role"] == "production"})
        return console.page(request, "live.html", viewer, served=served, series=",".join(names))

    @ui.get("/stream")
    async def stream(
        request: Request,
        viewer: ViewerDep,
        series: Annotated[str, Query(max_length=2000)],
    ) -> EventSourceResponse:
        """The predictor's signal stream, relayed: the browser's EventSource cannot send X-API-Key, so this
        route opens the stream with the cookie's key and passes every event on (ids too, so a reconnecting
        browser's Last-Event-ID resumes upstream without gaps or duplicates)."""
        headers = {"X-API-Key": viewer.key} if viewer.key else {}
        if last := request.headers.get("last-event-id"):
            headers["Last-Event-ID"] = last
        url = settings.predictor_url.rstrip("/") + "/v1/signals/stream"

        async def relay() -> AsyncIterator[ServerSentEvent]:
            # Connect and write timeouts as for any page; no read timeout: the predictor pings while it is quiet.
            timeout = httpx.Timeout(UPSTREAM_TIMEOUT_SECONDS, read=None)
            try:
                async with aconnect_sse(
                    console.client("predictor"), "GET", url, params={"series": series}, headers=headers, timeout=timeout
                ) as source:
                    if source.response.status_code != 200:
                        await source.response.aread()
                        detail = f"the predictor answered {source.response.status_code}: {_detail(source.response)}"
                        yield ServerSentEvent(data=orjson.dumps({"detail": detail}).decode(), event="error")
                        return
                    yield ServerSentEvent(
                        data=orjson.dumps({"detail": f"connected to {series}"}).decode(), event="status"
                    )
                    async for event in source.aiter_sse():
                        yield ServerSentEvent(
                            data=event.data, event=event.event, id=event.id or None, retry=event.retry
                        )
            except httpx.HTTPError as exc:
                detail = f"the predictor ({settings.predictor_url}) is unreachable: {type(exc).__name__}"
                yield ServerSentEvent(data=orjson.dumps({"detail": detail}).decode(), event="error")

        return EventSourceResponse(relay(), ping=15)

    return ui
