"""The operator console in a real browser against the whole running stack (`make up`, via the `live_stack`
fixture): headless Debian chromium driven by selenium through chromium-driver (Playwright's browser download is
not reachable from these machines). Signs in through the form, loads every page and checks what it shows against
the services' APIs, watches a signal arrive in the live panel after a new bar is ingested, loads each service's
/docs (Swagger UI served locally) and fails on any SEVERE entry of the browser's console.

Screenshots go to the test's tmp folder; `AICASH_SCREENSHOTS=docs/img` writes the committed
docs/img/console-<page>.png instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.keys import READ_KEY, WRITE_KEY
from tests.support.live_stack import LiveStack

# The first test also waits for the live stack to come up (training included): minutes on a loaded machine.
pytestmark = [pytest.mark.ui, pytest.mark.slow, pytest.mark.timeout(1800)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 30.0
SIGNAL_WAIT_S = 90.0
TIMINGS: dict[str, float] = {}


def _have_browser() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("AICASH_SCREENSHOTS")
    if target:
        path = Path(target)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("console-shots")


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    if not _have_browser():
        # As for tests/infra's tools: a missing tool fails with what to do, it is never skipped.
        pytest.fail(
            "Debian chromium and chromium-driver are needed: run scripts/ensure-system-tools.sh (`make test` does) "
            f"(looked for {CHROMIUM} and {CHROMEDRIVER})"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    start = time.perf_counter()
    d = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    TIMINGS["browser start"] = time.perf_counter() - start
    d.set_page_load_timeout(WAIT_S)
    try:
        yield d
    finally:
        d.quit()
        # What the browser steps took (shown with pytest -s; docs/CONSOLE.md quotes a run).
        for name, seconds in TIMINGS.items():
            print(f"console timing: {name}: {seconds:.2f} s")


@pytest.fixture(scope="module")
def stack(live_stack: LiveStack) -> LiveStack:
    return live_stack


def api(stack: LiveStack, service: str, path: str, key: str | None = None, **params: Any) -> Any:
    r = httpx.get(stack.urls[service] + path, params=params, headers={"X-API-Key": key or stack.key}, timeout=WAIT_S)
    r.raise_for_status()
    return r.json()


def severe(driver: Any) -> list[dict[str, Any]]:
    """SEVERE entries of the browser console since the last call (reading the log empties it)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait(driver: Any, condition: Any, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def shot(driver: Any, path: Path) -> None:
    """A screenshot of the whole page: the window grows to the document's height for it, then shrinks back."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1280, min(max(height + 140, 900), 4000))
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)


def load(driver: Any, url: str, shots: Path | None = None, name: str | None = None) -> float:
    start = time.perf_counter()
    driver.get(url)
    elapsed = time.perf_counter() - start
    if name:
        TIMINGS[f"page {name}"] = elapsed
    assert severe(driver) == [], f"{url}: errors in the browser console"
    if shots is not None and name:
        shot(driver, shots / f"console-{name}.png")
    return elapsed


def text_of(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, css).text)


@pytest.fixture(scope="module")
def signed_in(driver: Any, stack: LiveStack) -> Any:
    """Sign in through the form with the stack's admin key, as an operator would."""
    from selenium.webdriver.common.by import By

    ui = stack.urls["trainer"] + "/ui"
    driver.get(ui + "/models")
    # No cookie yet: the console sends the browser to its login form, remembering where it was going.
    assert driver.current_url.startswith(ui + "/login?next=")
    driver.find_element(By.ID, "key").send_keys(stack.key)
    driver.find_element(By.ID, "sign-in").click()
    wait(driver, lambda d: d.current_url == ui + "/models")
    assert severe(driver) == []
    # The cookie is out of reach of page scripts (HttpOnly): the key never sits in the DOM or in JS.
    assert "aicash_console_key" not in driver.execute_script("return document.cookie")
    assert stack.key not in driver.page_source
    return driver


def test_the_registry_and_a_model_page_show_the_served_version_its_verdict_and_validation(
    signed_in: Any, stack: LiveStack, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    d, ui = signed_in, stack.urls["trainer"] + "/ui"
    served = api(stack, "trainer", "/v1/models", symbol=stack.symbol, status="production")
    assert len(served) == 1
    model = served[0]
    assert model["quality"]["gate"] in ("passed", "failed")  # the live stack validated it before it was up
    load(d, ui + "/models", shots, "models")
    row = d.find_element(By.CSS_SELECTOR, f'#registry tr[data-model-id="{model["id"]}"]')
    assert model["version"] in row.text
    assert "production" in row.text and model["quality"]["gate"] in row.text

    report = api(stack, "trainer", f"/v1/models/{model['id']}/validation")
    load(d, f"{ui}/models/{model['id']}")
    assert text_of(d, "#model-version") == model["version"]
    assert text_of(d, "#gate") == model["quality"]["gate"]
    for reason in model["quality"]["reasons"]:
        assert reason in text_of(d, "#gate-reasons")
    fold_rows = d.find_elements(By.CSS_SELECTOR, "#folds tr")[1:]
    assert len(fold_rows) == len(report["report"]["folds"])
    baselines = text_of(d, "#baselines")
    for name, m in report["report"]["models"].items():
        assert m.get("label", name) in baselines
    # The equity curve: a PNG drawn from the report, loaded and decoded by the browser.
    wait(d, lambda drv: drv.execute_script("const i = document.getElementById('equity'); return i.complete"))
    assert d.execute_script("return document.getElementById('equity').naturalWidth") > 300
    assert severe(d) == []
    shot(d, shots / "console-model.png")


def test_the_series_page_shows_the_stored_series_with_its_bar_counts(
    signed_in: Any, stack: LiveStack, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    series = {(s["symbol"], s["timeframe"]): s for s in api(stack, "indicators", "/v1/series")}
    assert (stack.symbol, stack.timeframe) in series

    async def counts() -> dict[tuple[str, str], int]:
        conn = await asyncpg.connect(stack.database_url)
        try:
            rows = await conn.fetch("SELECT symbol, timeframe, count(*) AS n FROM bars GROUP BY 1, 2")
        finally:
            await conn.close()
        return {(r["symbol"], r["timeframe"]): r["n"] for r in rows}

    stored = asyncio.run(counts())
    load(signed_in, stack.urls["trainer"] + "/ui/series", shots, "series")
    rows = signed_in.find_elements(By.CSS_SELECTOR, "#series tr[data-series]")
    assert len(rows) == len(series)
    row = signed_in.find_element(By.CSS_SELECTOR, f'#series tr[data-series="{stack.symbol}:{stack.timeframe}"]')
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[3] == f"{stored[(stack.symbol, stack.timeframe)]:,}"
    first = datetime.fromisoformat(series[(stack.symbol, stack.timeframe)]["first_ts"])
    assert cells[1] == first.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def test_the_rollouts_page_shows_the_series_rollout_and_its_live_performance(
    signed_in: Any, stack: LiveStack, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    rollout = api(stack, "trainer", f"/v1/rollouts/{stack.symbol}/{stack.timeframe}")
    load(signed_in, stack.urls["trainer"] + "/ui/rollouts", shots, "rollouts")
    section = signed_in.find_element(
        By.CSS_SELECTOR, f'section.rollout[data-series="{stack.symbol}:{stack.timeframe}"]'
    )
    state = section.find_element(By.CSS_SELECTOR, "table.rollout-state").text
    assert rollout["policy"] in state
    assert rollout["production_version"] in state
    # Live performance is the predictor's (GET /v1/performance): its versions, or the API's refusal, in the page.
    perf = httpx.get(
        stack.urls["predictor"] + "/v1/performance",
        params={"symbol": stack.symbol, "timeframe": stack.timeframe},
        headers={"X-API-Key": stack.key},
        timeout=WAIT_S,
    )
    if perf.status_code == 200:
        table = section.find_element(By.CSS_SELECTOR, "table.performance").text
        for v in perf.json()["versions"]:
            assert v["model_version"] in table
    else:
        assert f"answered {perf.status_code}" in section.text
    served = text_of(signed_in, "#served")
    assert rollout["production_version"] in served


def test_the_drift_page_shows_each_features_latest_check(signed_in: Any, stack: LiveStack, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    async def features() -> set[str]:
        conn = await asyncpg.connect(stack.database_url)
        try:
            rows = await conn.fetch(
                "SELECT DISTINCT feature FROM feature_drift WHERE symbol = $1 AND timeframe = $2",
                stack.symbol,
                stack.timeframe,
            )
        finally:
            await conn.close()
        return {r["feature"] for r in rows}

    stored = asyncio.run(features())
    load(signed_in, stack.urls["trainer"] + "/ui/drift", shots, "drift")
    if stored:
        sections = signed_in.find_elements(
            By.CSS_SELECTOR, f'section.drift[data-series="{stack.symbol}:{stack.timeframe}"]'
        )
        shown = {
            r.find_element(By.TAG_NAME, "td").text for s in sections for r in s.find_elements(By.CSS_SELECTOR, "tr")[1:]
        }
        assert shown == stored
    else:
        assert "No drift check stored yet" in text_of(signed_in, "#no-drift")


def test_a_new_bar_shows_its_signal_in_the_live_panel_and_the_audit_page_lists_entries(
    signed_in: Any, stack: LiveStack, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    d, ui = signed_in, stack.urls["trainer"] + "/ui"
    load(d, ui + "/live")
    wait(d, lambda drv: "connected to" in text_of(drv, "#stream-state"))
    # A new completed bar of the live stack's series, through the indicators API: the predictor signals it.
    last = api(stack, "indicators", f"/v1/bars/{stack.symbol}/{stack.timeframe}", limit=1)["bars"][-1]
    ts = datetime.fromisoformat(last["ts"]) + timedelta(days=1)
    close = last["close"] * 1.001
    bar = {
        "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "open": last["close"],
        "high": max(close, last["close"]) * 1.002,
        "low": min(close, last["close"]) * 0.998,
        "close": close,
        "volume": last["volume"],
    }
    r = httpx.post(
        f"{stack.urls['indicators']}/v1/bars/{stack.symbol}/{stack.timeframe}",
        json={"bars": [bar]},
        headers={"X-API-Key": WRITE_KEY},
        timeout=WAIT_S,
    )
    assert r.status_code in (200, 201), r.text
    start = time.perf_counter()
    row = wait(d, lambda drv: drv.find_elements(By.CSS_SELECTOR, "#signals tr[data-prediction-id]"), SIGNAL_WAIT_S)[0]
    TIMINGS["bar ingested -> signal in the live panel"] = time.perf_counter() - start
    prediction_id = row.get_attribute("data-prediction-id")
    assert f"{stack.symbol} {stack.timeframe}" in row.text
    assert ts.strftime("%Y-%m-%d") in row.text  # the new bar's
    logged = api(stack, "predictor", f"/v1/predictions/{prediction_id}", key=READ_KEY)
    assert logged["signal"] in row.text
    assert severe(d) == []
    shot(d, shots / "console-live.png")

    # An outcome recorded for that signal is an audited action: it appears on the audit page.
    r = httpx.post(
        f"{stack.urls['predictor']}/v1/outcomes",
        json={"prediction_id": prediction_id, "pnl": 0.001, "detail": {"source": "console browser test"}},
        headers={"X-API-Key": WRITE_KEY},
        timeout=WAIT_S,
    )
    assert r.status_code in (200, 201), r.text
    entries = api(stack, "trainer", "/v1/audit", limit=50)["entries"]
    assert entries and entries[0]["action"] == "outcome.record"
    load(d, ui + "/audit", shots, "audit")
    rows = d.find_elements(By.CSS_SELECTOR, "#audit tr[data-action]")
    assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == [str(e["id"]) for e in entries]
    assert rows[0].get_attribute("data-action") == "outcome.record"


def test_the_overview_shows_the_production_model(signed_in: Any, stack: LiveStack, shots: Path) -> None:
    served = api(stack, "trainer", "/v1/models", status="production")
    load(signed_in, stack.urls["trainer"] + "/ui/", shots, "overview")
    table = text_of(signed_in, "#production")
    for m in served:
        assert m["version"] in table


@pytest.mark.parametrize("service", ["indicators", "predictor", "trainer"])
def test_each_services_docs_render_every_operation_without_a_cdn(driver: Any, stack: LiveStack, service: str) -> None:
    from selenium.webdriver.common.by import By

    doc = httpx.get(stack.urls[service] + "/openapi.json", timeout=WAIT_S).json()
    operations = sum(
        1 for item in doc["paths"].values() for m in item if m in ("get", "post", "put", "patch", "delete")
    )
    start = time.perf_counter()
    driver.get(stack.urls[service] + "/docs")
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= operations)
    TIMINGS[f"/docs {service}"] = time.perf_counter() - start
    assert len(driver.find_elements(By.CSS_SELECTOR, ".opblock")) == operations
    assert doc["info"]["title"] in driver.find_element(By.CSS_SELECTOR, ".info .title").text
    # Every script and stylesheet came from the service itself.
    sources = driver.execute_script(
        "return [...document.scripts].map(s => s.src).concat([...document.querySelectorAll('link')].map(l => l.href))"
    )
    assert all(not s or s.startswith(stack.urls[service]) or s.startswith("data:") for s in sources), sources
    assert severe(driver) == []
