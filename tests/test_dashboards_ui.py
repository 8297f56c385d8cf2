"""The dashboards in a real browser: Debian's Chromium driven by Playwright against `pn.serve`.

Run with `python -m pytest -m ui tests/test_dashboards_ui.py`. Screenshots of every dashboard are
written to docs/img/. Chromium is /usr/bin/chromium (installed with apt-get when running as root,
else the tests skip saying so); `playwright install` is never used.
"""

import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_run import make_runs

pytestmark = pytest.mark.ui

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "img"


def _chromium() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and installing it needs root: run `apt-get install -y chromium`")
    install = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True)
    if install.returncode != 0 or not Path(CHROMIUM).is_file():
        pytest.skip(f"`apt-get install -y chromium` failed: {install.stderr.strip()[-300:]}")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium_browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    path = _chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import holoviews as hv
    import panel as pn
    from panel.tests.util import wait_for_server

    from dashboards.app import build_app

    hv.extension("bokeh")
    # Longer than the browser-free tests' runs, so that some masks are no longer empty in the screenshots.
    runs = make_runs(tmp_path_factory.mktemp("ui_runs"), iterations=40, batch_size=2)
    port = _free_port()
    apps = {"app": lambda: build_app([str(runs["masked"]), str(runs["cross"])]),
            "missing": lambda: build_app([str(runs["data"] / "no_such_run")])}
    server = pn.serve(apps, port=port, address="127.0.0.1", threaded=True, show=False, liveness=True,
                      websocket_origin=[f"127.0.0.1:{port}"])
    wait_for_server(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()
    server.join(timeout=30)  # stop() only schedules the shutdown; reset() would stop it a second time
    pn.state.reset()


def _settle(page, seconds: float = 1.5) -> None:
    """Bokeh draws after the network is idle; wait for the canvases, then a moment more."""
    page.wait_for_load_state("networkidle")
    page.locator("canvas").first.wait_for(state="visible", timeout=30000)
    time.sleep(seconds)


def _shot(page, name: str) -> bytes:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    data = page.screenshot(full_page=True)
    (SCREENSHOTS / name).write_bytes(data)
    return data


def _slider_right(page, index: int, presses: int) -> None:
    """Moves the index-th slider (page order: query, layer, level) with the keyboard."""
    handle = page.locator(".noUi-handle").nth(index)
    handle.focus()
    for _ in range(presses):
        page.keyboard.press("ArrowRight")


def _attention_image(page) -> bytes:
    """A screenshot of the first run's attention plot (4th plot of the layout)."""
    return page.locator(".bk-Canvas, canvas").nth(3).screenshot()


def test_attention_query_and_layer_change_the_rendered_image(chromium_browser, served):
    page = chromium_browser.new_page(viewport={"width": 1500, "height": 1100})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{served}/app", timeout=90000)
    _settle(page)
    before = _attention_image(page)
    _shot(page, "dashboard_attention.png")
    _slider_right(page, 0, 3)  # query 0 -> 3
    _settle(page)
    after_query = _attention_image(page)
    _slider_right(page, 1, 2)  # layer 0 -> 2
    _settle(page)
    after_layer = _attention_image(page)
    _shot(page, "dashboard_attention_query3_layer2.png")
    digests = {hashlib.sha256(b).hexdigest() for b in (before, after_query, after_layer)}
    assert len(digests) == 3, "the attention image did not change with the query / layer widgets"
    assert not errors, errors
    page.close()


def test_proposals_and_metrics_tabs_render(chromium_browser, served):
    page = chromium_browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(f"{served}/app", timeout=90000)
    _settle(page)
    page.get_by_text("Proposals", exact=True).click()
    _settle(page, 3)
    assert page.locator("canvas").count() >= 2
    _shot(page, "dashboard_proposals.png")
    page.get_by_text("Per-layer metrics", exact=True).click()
    _settle(page, 3)
    assert page.locator("canvas").count() >= 3
    _shot(page, "dashboard_layer_metrics.png")
    page.close()


def test_missing_run_shows_an_alert_in_the_page(chromium_browser, served):
    page = chromium_browser.new_page(viewport={"width": 1200, "height": 700})
    page.goto(f"{served}/missing")
    page.wait_for_load_state("networkidle")
    page.get_by_text("does not exist").first.wait_for(timeout=30000)
    time.sleep(1)
    _shot(page, "dashboard_missing_run.png")
    page.close()
