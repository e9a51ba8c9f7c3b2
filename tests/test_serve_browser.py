"""The page in a real browser: headless Chromium (Debian's ``chromium``, driven by playwright through its
``executable_path``) opens ``/``, types a prompt, draws, waits for the previews and the kept pictures, reuses a
picture's seed by clicking it; edits a kept picture (a box dragged on it) and an uploaded one (its top rows
kept), and saves a screenshot.

Skipped with its reason where Chromium or playwright is missing, unless TILECRAFT_REQUIRE_BROWSER=1 (set by
.ci/run, which installs both): then their absence fails the test. TILECRAFT_SCREENSHOT=PATH saves the
screenshot there too (docs/serve.png is made so, with the shipped shapes run).
"""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

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
            assert page.input_value("input[name=cfg]") == "2"  # the sampling defaults, from /v1/info
            assert page.input_value("input[name=top_p]") == "0.8"
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

            page.click("#kept .card img >> nth=0")  # reuse its seed
            assert page.input_value("input[name=seed]") == seed
            download = page.locator("#kept .card a >> nth=0")
            assert download.get_attribute("download").endswith(f"-seed{seed}.png")

            # Edit the best picture: drag a box over its top-left quarter on the picture, redraw it.
            page.fill("input[name=n]", "2")
            page.fill("input[name=keep]", "2")
            page.click("#kept .card a.edit >> nth=0")
            page.wait_for_function("!document.getElementById('edit').classList.contains('off')")
            view = page.locator("#init-view").bounding_box()
            page.mouse.move(view["x"] + 1, view["y"] + 1)
            page.mouse.down()
            page.mouse.move(view["x"] + view["width"] / 2, view["y"] + view["height"] / 2, steps=4)
            page.mouse.up()
            assert page.input_value("#edit-mode") == "box" and page.input_value("input[name=box]") == "0,0,32,32"
            _draw_and_wait(page, cards=6)
            info = page.inner_text("#kept .card .info >> nth=0")
            assert "(edited)" in info and "likelihood" in info  # the box leaves kept tokens after it

            # Upload a picture and keep its top 4 rows of tokens.
            start = tmp_path / "start.png"
            Image.new("RGB", (64, 64), (250, 250, 250)).save(start)
            page.set_input_files("#init-file", str(start))
            page.wait_for_function("document.getElementById('status').textContent.startsWith('picture loaded')")
            page.select_option("#edit-mode", "keep_rows")
            page.fill("input[name=keep_rows]", "4")
            _draw_and_wait(page, cards=8)
            info = page.inner_text("#kept .card .info >> nth=0")
            assert "(edited)" in info and "likelihood" not in info  # completion: nothing kept after the hole
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            if os.environ.get("TILECRAFT_SCREENSHOT"):
                page.screenshot(path=os.environ["TILECRAFT_SCREENSHOT"], full_page=True)
            page.click("#clear-init")

            assert not errors, errors  # the bad request below logs its 422 to the console, as browsers do
            page.fill("input[name=n]", "99")  # over the service's limit: the field is marked, the message shown
            page.click("#draw")
            page.wait_for_selector("input[name=n].bad")
            assert "n must be at most 8" in page.inner_text("#status")
            browser.close()
    finally:
        stop()
    assert (tmp_path / "serve.png").stat().st_size > 10_000


def _draw_and_wait(page, cards: int) -> None:
    """Press Draw and wait until ``cards`` kept pictures are shown, all loaded."""
    page.click("#draw")
    page.wait_for_function(f"document.querySelectorAll('#kept .card').length >= {cards}", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#kept .card img')].every(i => i.complete && "
                           "i.naturalWidth > 0)")
    assert "done" in page.inner_text("#status")
