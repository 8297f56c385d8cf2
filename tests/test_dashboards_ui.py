"""The dashboards in a real browser: Debian's Chromium driven by Playwright against `pn.serve`.

Run with `python -m pytest -m ui tests/test_dashboards_ui.py`. The dashboards serve the trained demo
runs of results/tiny (Mask2Former and cross-attention rows of Table 4a, made by `make demo`) when their
checkpoints are here, and then the screenshots of every tab and of the executed quickstart are written
to docs/img/ (the README shows them); otherwise runs trained for 40 steps, with screenshots kept in a
temporary folder. Each page is checked for browser console errors, and each tab's Bokeh models for
legends over the data (`bokeh_checks`). Chromium is /usr/bin/chromium (installed with apt-get when
running as root, else the tests skip saying so); `playwright install` is never used.
"""

import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from bokeh_checks import legends_beside_the_data
from fixtures_run import make_runs

pytestmark = pytest.mark.ui

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "results" / "tiny"
DEMO_RUNS = [DEMO / "rows" / "panoptic-mask2former" / "run", DEMO / "rows" / "panoptic-cross_attention" / "run"]
QUICKSTART = DEMO / "quickstart" / "00_quickstart.ipynb"
VIEWPORT = {"width": 1500, "height": 1100}  # one window size for every screenshot


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
def runs(tmp_path_factory):
    """(run directories, screenshot folder): the demo's trained runs and docs/img, else short fixture runs."""
    if all((run / "checkpoint.pth").is_file() for run in DEMO_RUNS):
        return [str(r) for r in DEMO_RUNS], REPO / "docs" / "img"
    made = make_runs(tmp_path_factory.mktemp("ui_runs"), iterations=40, batch_size=2)
    return [str(made["masked"]), str(made["cross"])], tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def served(runs):
    import holoviews as hv
    import panel as pn
    from panel.tests.util import wait_for_server

    from dashboards.app import build_app

    hv.extension("bokeh")
    port = _free_port()
    apps = {"app": lambda: build_app(runs[0]), "missing": lambda: build_app([str(REPO / "no_such_run")])}
    server = pn.serve(apps, port=port, address="127.0.0.1", threaded=True, show=False, liveness=True,
                      websocket_origin=[f"127.0.0.1:{port}"])
    wait_for_server(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()
    server.join(timeout=30)  # stop() only schedules the shutdown; reset() would stop it a second time
    pn.state.reset()


def _page(browser):
    """A page at the common window size that records console errors and uncaught exceptions."""
    page = browser.new_page(viewport=VIEWPORT)
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
    return page


def _settle(page, seconds: float = 1.5) -> None:
    """Bokeh draws after the network is idle; wait for the canvases, then a moment more."""
    page.wait_for_load_state("networkidle")
    page.locator("canvas").first.wait_for(state="visible", timeout=30000)
    time.sleep(seconds)


def _shot(page, folder: Path, name: str) -> bytes:
    folder.mkdir(parents=True, exist_ok=True)
    data = page.screenshot(full_page=True)
    (folder / name).write_bytes(data)
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


def _attention_after_change(page, before: bytes, timeout: float = 90) -> bytes:
    """The attention plot once it differs from `before` and has stopped changing (each slider step
    re-runs the model on a shared CPU: the last step's picture can take many seconds)."""
    end, last = time.monotonic() + timeout, before
    while time.monotonic() < end:
        time.sleep(2)
        now = _attention_image(page)
        if now != before and now == last:
            return now
        last = now
    return last


def test_attention_query_and_layer_change_the_rendered_image(chromium_browser, served, runs):
    from dashboards.attention import AttentionExplorer

    page = _page(chromium_browser)
    page.goto(f"{served}/app", timeout=90000)
    _settle(page)
    before = _attention_image(page)
    _shot(page, runs[1], "dashboard_attention.png")
    _slider_right(page, 0, 3)  # query 0 -> 3
    after_query = _attention_after_change(page, before)
    _slider_right(page, 1, 2)  # decoder layer 1 -> 3
    after_layer = _attention_after_change(page, after_query)
    _shot(page, runs[1], "dashboard_attention_query3_layer3.png")
    digests = {hashlib.sha256(b).hexdigest() for b in (before, after_query, after_layer)}
    assert len(digests) == 3, "the attention image did not change with the query / layer widgets"
    assert not page.errors, page.errors
    page.close()
    legends_beside_the_data(AttentionExplorer(runs=runs[0]).panel().get_root())


def test_proposals_and_metrics_tabs_render_with_legends_beside_the_data(chromium_browser, served, runs):
    from dashboards.layer_metrics import LayerMetrics
    from dashboards.proposals import ProposalsExplorer

    page = _page(chromium_browser)
    page.goto(f"{served}/app", timeout=90000)
    _settle(page)
    page.get_by_text("Proposals", exact=True).click()
    _settle(page, 3)
    assert page.locator("canvas").count() >= 2
    _shot(page, runs[1], "dashboard_proposals.png")
    page.get_by_text("Per-layer metrics", exact=True).click()
    _settle(page, 3)
    assert page.locator("canvas").count() >= 3
    _shot(page, runs[1], "dashboard_layer_metrics.png")
    assert not page.errors, page.errors
    page.close()
    legends_beside_the_data(ProposalsExplorer(runs=runs[0]).panel().get_root())
    figures, more = legends_beside_the_data(LayerMetrics(runs=runs[0]).panel().get_root())
    assert len(figures) >= 3 and more >= 3  # per layer, per class, training (and validation): legends at the right


def test_missing_run_shows_an_alert_in_the_page(chromium_browser, served, runs):
    page = _page(chromium_browser)
    page.goto(f"{served}/missing")
    page.wait_for_load_state("networkidle")
    page.get_by_text("does not exist").first.wait_for(timeout=30000)
    time.sleep(1)
    _shot(page, runs[1], "dashboard_missing_run.png")
    assert not page.errors, page.errors
    page.close()


def test_executed_quickstart_screenshot(chromium_browser, runs, tmp_path):
    """The quickstart executed on the demo's trained Mask2Former run (copied, so nothing under results/
    changes; 500 iterations, as the run has, so it is not trained again), rendered by nbconvert."""
    if runs[0][0] != str(DEMO_RUNS[0]):
        pytest.skip("the demo runs are not here (`make demo`): no trained run to show in the quickstart")
    import shutil

    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    from m2f.reproduce.jobs import NOTEBOOKS

    out = tmp_path / "quickstart"
    shutil.copytree(DEMO_RUNS[0], out / "run")  # copy2 keeps the checkpoint's mtime: its evaluations are reused
    executed = out / "00_quickstart.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / "00_quickstart.ipynb"), str(executed), cwd=str(NOTEBOOKS),
                        parameters={"data_dir": str(DEMO / "data"), "output_dir": str(out), "max_iters": 500},
                        kernel_name="python3", progress_bar=False)
    html, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    (tmp_path / "quickstart.html").write_text(html)
    page = _page(chromium_browser)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    page.goto((tmp_path / "quickstart.html").as_uri())
    page.wait_for_load_state("load")
    time.sleep(1)
    assert page.locator("img").count() >= 3  # training curves, predictions, attention
    _shot(page, runs[1], "quickstart.png")
    page.close()
