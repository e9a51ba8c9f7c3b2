"""The page in a real browser: headless Chromium (Debian's ``chromium``, driven by playwright through its
``executable_path``) opens ``/``, types a prompt, draws, waits for the previews and the kept pictures, reuses a
picture's seed by clicking it, and saves a screenshot.

Skipped with its reason where Chromium or playwright is missing, unless TILECRAFT_REQUIRE_BROWSER=1 (set by
.ci/run, which installs both): then their absence fails the test. TILECRAFT_SCREENSHOT=PATH saves the
screenshot there too (docs/serve.png is made so, with the shipped shapes run).
"""

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install -e '.[serve]'")

CHROMIUM = os.environ.get("TILECRAFT_CHROMIUM", "/usr/bin/chromium")


def _browser_or_skip():
    """playwright's sync API and Chromium's path, or a skip (a failure where the browser is required)."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[test]')"
    if missing is None and not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set TILECRAFT_CHROMIUM)"
    if missing:
        if os.environ.get("TILECRAFT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TILECRAFT_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.mark.slow
def test_the_page_draws_previews_and_pictures_in_chromium(tmp_path):
    sync_playwright = _browser_or_skip()
    from sample.pipeline import Pipeline
    from serve.app import create_app
    from serve.loadtest import serve_in_thread
    from serve.schemas import Limits

    # The shipped shapes run (a 4.7 M-parameter decoder, 8x8 tokens): pictures a person can judge.
    app = create_app(Pipeline(None, device="cpu"), Limits(max_n=8, max_rows=32))
    url, stop = serve_in_thread(app)
    errors: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 780})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('input[name=n]').value !== ''")
            assert page.input_value("input[name=cfg]") == "1.5"  # the sampling defaults, from /v1/info
            page.fill("#prompt", "a large red circle above a small blue square")
            page.fill("input[name=n]", "8")
            page.fill("input[name=keep]", "4")
            page.fill("input[name=seed]", "7")
            page.click("#draw")
            page.wait_for_selector("#previews .cell img", timeout=60_000)
            page.wait_for_selector("#kept .card img", timeout=120_000)
            page.wait_for_function("[...document.querySelectorAll('#kept .card img')].every(i => i.complete && "
                                   "i.naturalWidth > 0)")
            assert page.locator("#previews .cell img").count() == 8
            assert page.locator("#kept .card").count() == 4
            assert "done" in page.inner_text("#status")
            info = page.inner_text("#kept .card .info >> nth=0")
            assert "score" in info and "seed" in info
            seed = info.split("seed ")[1].split()[0]
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            if os.environ.get("TILECRAFT_SCREENSHOT"):
                page.screenshot(path=os.environ["TILECRAFT_SCREENSHOT"], full_page=True)

            page.click("#kept .card img >> nth=0")  # reuse its seed
            assert page.input_value("input[name=seed]") == seed
            download = page.locator("#kept .card a >> nth=0")
            assert download.get_attribute("download").endswith(f"-seed{seed}.png")

            assert not errors, errors  # the bad request below logs its 422 to the console, as browsers do
            page.fill("input[name=n]", "99")  # over the service's limit: the field is marked, the message shown
            page.click("#draw")
            page.wait_for_selector("input[name=n].bad")
            assert "n must be at most 8" in page.inner_text("#status")
            browser.close()
    finally:
        stop()
    assert (tmp_path / "serve.png").stat().st_size > 10_000
