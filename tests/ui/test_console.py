"""The operator console (services/trainer/ui.py) in process, on the real test database: sign-in and its cookie,
every page behind it, roles enforced by the APIs the pages read, upstreams that are down, escaping. The same pages
in a real browser against the whole stack: test_console_browser.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.trainer import repository as repo
from services.trainer.main import create_app
from services.trainer.settings import TrainerSettings
from shared.local_services import free_port
from tests.support.keys import ADMIN_KEY, API_KEYS, READ_KEY
from tests.support.registry import register_version, series_symbol, with_connection

HOSTILE = '<img src=x onerror="alert(1)">'


@pytest.fixture(scope="module")
def closed_url() -> str:
    # Nothing listens there: the indicators and the predictor are "down" for these tests.
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def settings(database_url: str, redis_url: str, closed_url: str) -> TrainerSettings:
    return TrainerSettings(
        database_url=database_url,
        redis_url=redis_url,
        api_keys=API_KEYS,
        environment="test",
        indicators_url=closed_url,
        predictor_url=closed_url,
    )


@pytest.fixture(scope="module")
async def app(settings: TrainerSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app  # type: ignore[misc]


def browser(app: object) -> httpx.AsyncClient:
    """A client without X-API-Key, as a browser is: it keeps the cookies it is given."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test")  # type: ignore[arg-type]


async def sign_in(client: httpx.AsyncClient, key: str, next_: str = "/ui/") -> httpx.Response:
    return await client.post("/ui/login", data={"key": key, "next": next_})


@pytest.fixture(scope="module")
async def version(database_url: str) -> dict[str, object]:
    """A series' second version (a candidate: the first serves) whose verdict carries markup."""
    symbol = series_symbol("UI")

    async def setup(conn: object) -> dict[str, object]:
        await register_version(conn, symbol, 1)  # type: ignore[arg-type]
        v = await register_version(conn, symbol, 2)  # type: ignore[arg-type]
        await repo.set_quality(conn, v.id, {"gate": "failed", "reasons": [HOSTILE], "validation_id": None})  # type: ignore[arg-type]
        return {"id": v.id, "version": v.version, "symbol": symbol}

    return await with_connection(database_url, setup)  # type: ignore[arg-type]


async def test_a_page_without_a_key_sends_the_browser_to_the_login_form(app: object) -> None:
    async with browser(app) as b:
        r = await b.get("/ui/models?status=production")
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/login?next=/ui/models%3Fstatus%3Dproduction"
        form = await b.get(r.headers["location"])
        assert form.status_code == 200
        assert 'name="key"' in form.text and 'type="password"' in form.text
        # An invalid cookie is no better than none.
        b.cookies.set("aicash_console_key", "not-a-key-of-this-deployment", domain="console.test", path="/ui/")
        assert (await b.get("/ui/audit")).status_code == 303


async def test_a_wrong_key_is_refused_in_the_form_and_sets_no_cookie(app: object) -> None:
    async with browser(app) as b:
        r = await sign_in(b, "wrong-key-0000000000")
        assert r.status_code == 401
        assert "invalid API key" in r.text
        assert "set-cookie" not in r.headers
        r = await sign_in(b, "")
        assert r.status_code == 401 and "missing" in r.text


async def test_sign_in_sets_an_httponly_samesite_strict_cookie_and_goes_where_asked(app: object) -> None:
    async with browser(app) as b:
        r = await sign_in(b, READ_KEY, "/ui/models")
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/models"
        cookie = r.headers["set-cookie"].lower()
        assert "aicash_console_key=" in cookie
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui/" in cookie
        assert "secure" not in cookie  # ENVIRONMENT=test over http; production sets Secure
        page = await b.get("/ui/models")
        assert page.status_code == 200
        assert "reader" in page.text and "(read)" in page.text
        # Sign out: the cookie is cleared and the pages want a key again.
        out = await b.post("/ui/logout")
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
        assert (await b.get("/ui/models")).status_code == 303


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/elsewhere", "/ui\\..\\x"])
async def test_sign_in_never_redirects_off_the_console(app: object, target: str) -> None:
    async with browser(app) as b:
        r = await sign_in(b, READ_KEY, target)
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/"


async def test_the_registry_shows_each_version_with_its_verdict_escaped(
    app: object, version: dict[str, object]
) -> None:
    async with browser(app) as b:
        await sign_in(b, READ_KEY)
        page = await b.get("/ui/models")
        assert page.status_code == 200
        assert str(version["version"]) in page.text
        assert HOSTILE not in page.text
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page.text
        detail = await b.get(f"/ui/models/{version['id']}")
        assert detail.status_code == 200
        assert 'class="verdict failed"' in detail.text
        # Never validated: the page says so (the API's 404 text), and there is no equity image to load.
        assert "has no validation yet" in detail.text
        assert 'id="equity"' not in detail.text
        png = await b.get(f"/ui/models/{version['id']}/equity.png")
        assert png.status_code == 404
        missing = await b.get("/ui/models/999999999")
        assert missing.status_code == 404
        assert "no model version with id 999999999" in missing.text


async def test_the_audit_page_keeps_the_apis_role_and_escapes_what_it_lists(
    app: object, version: dict[str, object]
) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://api.test",
        headers={"X-API-Key": ADMIN_KEY},
    ) as api:
        r = await api.post(f"/v1/models/{version['id']}/promote", json={"reason": "<script>alert(2)</script>"})
        assert r.status_code == 200, r.text
    async with browser(app) as b:
        await sign_in(b, READ_KEY)
        page = await b.get("/ui/audit")
        # GET /v1/audit needs role admin: the reader sees the API's refusal in the page, not the entries.
        assert page.status_code == 200
        assert "answered 403" in page.text and "this needs admin" in page.text
        assert 'id="audit"' not in page.text
    async with browser(app) as b:
        await sign_in(b, ADMIN_KEY)
        page = await b.get("/ui/audit")
        assert page.status_code == 200
        assert 'data-action="model.promote"' in page.text
        assert "<script>alert(2)</script>" not in page.text
        assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page.text


@pytest.mark.parametrize("path", ["/ui/series", "/ui/rollouts", "/ui/live"])
async def test_a_page_whose_upstream_is_down_says_so(app: object, closed_url: str, path: str) -> None:
    async with browser(app) as b:
        await sign_in(b, ADMIN_KEY)
        page = await b.get(path)
        assert page.status_code == 200
        assert "data-upstream-error" in page.text
        assert f"({closed_url}) is unreachable: ConnectError" in page.text


async def test_the_drift_page_and_the_overview_render_from_the_database(app: object) -> None:
    async with browser(app) as b:
        await sign_in(b, READ_KEY)
        drift = await b.get("/ui/drift")
        assert drift.status_code == 200
        assert "Drift per feature" in drift.text
        assert "data-upstream-error" not in drift.text
        home = await b.get("/ui/")
        assert home.status_code == 200 and 'id="jobs"' in home.text


async def test_the_stream_relay_reports_an_unreachable_predictor_as_an_event(app: object, closed_url: str) -> None:
    async with browser(app) as b:
        await sign_in(b, READ_KEY)
        r = await b.get("/ui/stream", params={"series": "SPX:D1"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "event: error" in r.text
        assert f"the predictor ({closed_url}) is unreachable" in r.text


async def test_the_console_is_not_part_of_the_apis_openapi_document(app: object) -> None:
    async with browser(app) as b:
        doc = (await b.get("/openapi.json")).json()
        assert not [p for p in doc["paths"] if p.startswith("/ui")]
        docs = await b.get("/docs")
        assert docs.status_code == 200
        # Swagger UI from this process, not a CDN.
        assert "/static-offline-docs/swagger-ui-bundle.js" in docs.text and "cdn." not in docs.text
        js = await b.get("/static-offline-docs/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 100_000


# The console's pages are not in the API's OpenAPI document, so the auth matrix (tests/faults/test_auth_matrix.py)
# cannot see them: this walks the mounted app's own routes instead, so a new page cannot ship unguarded.
CONSOLE_PUBLIC = {("GET", "/login"), ("POST", "/login"), ("POST", "/logout")}


@pytest.mark.faults
async def test_every_console_route_but_sign_in_and_out_needs_a_valid_cookie(app: object) -> None:
    from starlette.routing import Mount, Route

    mount = next(r for r in app.routes if isinstance(r, Mount) and r.path == "/ui")  # type: ignore[attr-defined]
    pages = [
        (method, route.path)
        for route in mount.routes
        if isinstance(route, Route)
        for method in sorted(route.methods or ())
        if method != "HEAD" and (method, route.path) not in CONSOLE_PUBLIC
    ]
    assert len(pages) >= 10, pages  # every page of the console, the equity image and the stream relay
    async with browser(app) as b:
        for method, path in pages:
            url = "/ui" + path.replace("{model_id}", "1")
            for cookie in (None, "not-a-key-of-this-deployment"):
                b.cookies.clear()
                if cookie is not None:
                    b.cookies.set("aicash_console_key", cookie, domain="console.test", path="/ui/")
                r = await b.request(method, url)
                assert r.status_code == 303, f"{method} {url} with cookie {cookie!r}: {r.status_code}"
                assert r.headers["location"].startswith("/ui/login?next="), (method, url)
