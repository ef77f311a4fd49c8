"""The search page in a real browser: Playwright driving Debian's chromium against `xmodal serve`.

Skipped (with the reason) where /usr/bin/chromium or the playwright package is missing;
`make e2e` installs chromium with apt and runs this file with XMODAL_REQUIRE_BROWSER=1, under
which a missing browser is an error instead. Playwright never downloads a browser
here: it is pointed at the system chromium.

The screenshot goes to the test's tmp dir; with XMODAL_UPDATE_SCREENSHOT=1 it is also copied
to docs/serve_screenshot.png (the README's picture), so a normal run leaves the tree clean.
"""

import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

CHROMIUM = os.environ.get("XMODAL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "serve_screenshot.png"

REQUIRED = os.environ.get("XMODAL_REQUIRE_BROWSER") == "1"  # set by `make e2e`: missing pieces fail, not skip


def _unavailable(why: str):
    if REQUIRED:
        raise RuntimeError(f"browser test required (XMODAL_REQUIRE_BROWSER=1) but {why}")
    pytest.skip(f"browser test: {why} (`make e2e` installs it)", allow_module_level=True)


if not os.path.exists(CHROMIUM):
    _unavailable(f"{CHROMIUM} not found (apt-get install chromium)")
try:
    from playwright import sync_api
except ImportError:
    _unavailable("the playwright package is not installed")

from e2e.serve_world import IMAGES, session_world, specs  # noqa: E402
from xmodal.serve.loadtest import live_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from xmodal.serve import build_app

    world = session_world(tmp_path_factory)
    with live_server(build_app(specs(world))) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 760}, base_url=server)
    # the page must work offline: any request that leaves the server fails the test
    outside = []
    context.route("**/*", lambda route: (route.continue_() if route.request.url.startswith(server)
                                         else (outside.append(route.request.url), route.abort())))
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not outside, f"the page fetched from outside the server: {outside}"
    assert not errors, f"JavaScript errors: {errors}"


def test_search_renders_results_and_plays_the_video_at_its_moment(page, server, tmp_path):
    page.goto("/")
    page.wait_for_function("document.querySelectorAll('#index option').length === 3")
    page.select_option("#index", "ada")
    page.fill("#query", "waves roll onto a sandy beach")
    page.click("#go")
    page.wait_for_selector(".card")
    cards = page.locator(".card")
    assert cards.count() == 6
    assert "6 results from ada" in page.inner_text("#status")
    # state is in the URL, so the search can be shared
    qs = parse_qs(urlsplit(page.url).query)
    assert qs == {"index": ["ada"], "q": ["waves roll onto a sandy beach"]}
    # every thumbnail really loaded (a JPEG keyframe from /thumb)
    page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
    scores = [float(s) for s in page.locator(".card .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)

    shot = tmp_path / "serve_screenshot.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 1000
    if os.environ.get("XMODAL_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, DOCS_SCREENSHOT)

    # click the first video: the player opens at the frame the query attends to most, and plays
    hits = page.evaluate("fetch('/search', {method: 'POST', headers: {'Content-Type': 'application/json'},"
                         " body: JSON.stringify({index: 'ada', query: 'waves roll onto a sandy beach', k: 6})})"
                         ".then(r => r.json())")["hits"]
    first_video = next(i for i, h in enumerate(hits) if h["kind"] == "video")
    best = hits[first_video]["best_time"]
    cards.nth(first_video).click()
    page.wait_for_selector("#player:not([hidden])")
    page.wait_for_function("(() => { const v = document.getElementById('video');"
                           " return !v.paused && v.readyState >= 2 && v.currentTime > 0; })()", timeout=20000)
    state = page.evaluate("(() => { const v = document.getElementById('video');"
                          " return {src: v.currentSrc, t: v.currentTime, start: Number(v.dataset.start),"
                          " paused: v.paused, dur: v.duration}; })()")
    assert state["src"].endswith(f"/media/ada/{hits[first_video]['id']}")
    assert state["start"] == pytest.approx(best) and not state["paused"]
    assert state["t"] >= best - 0.05  # it started at best_time, not at 0
    page.click("#close")
    assert page.locator("#player").is_hidden()


def test_shared_url_reproduces_the_search(page):
    page.goto("/?index=adb&q=a%20red%20square")
    page.wait_for_selector(".card")
    assert page.input_value("#query") == "a red square" and page.input_value("#index") == "adb"
    assert page.locator(".card").count() == 6


def test_search_by_uploaded_image(page, tmp_path):
    import numpy as np
    from PIL import Image

    arr = np.zeros((40, 40, 3), np.uint8)
    arr[8:32, 8:32] = IMAGES["red-square"]
    Image.fromarray(arr).save(tmp_path / "query.png")
    page.goto("/")
    page.wait_for_function("document.querySelectorAll('#index option').length === 3")
    page.set_input_files("#image", str(tmp_path / "query.png"))
    page.wait_for_selector(".card")
    assert page.locator(".card").first.get_attribute("data-id") == "red-square"


def test_errors_are_shown_not_swallowed(page):
    page.goto("/")
    page.wait_for_function("document.querySelectorAll('#index option').length === 3")
    page.fill("#query", "x" * 1000)
    page.evaluate("document.getElementById('query').value = 'x'.repeat(1001)")
    page.click("#go")
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert "at most 1000 characters" in page.inner_text("#status")


