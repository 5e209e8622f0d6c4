"""The Gradio page in a real headless browser: Debian's Chromium, driven over the DevTools protocol by
Playwright (pointed at the system binary; Playwright's own browser download is never used). After a run
the outputs are on screen at least 384 pixels wide, the slider moves, the charts are drawn, two plans
make two columns, the tune tab puts a plan into the plan box, and a cancelled run leaves the next run's
output as a fresh run's. The first test saves the page after a run on the reference image model as
docs/ui.png (the README's picture of the page).

Skipped, with the reason, where Playwright or a Chromium binary is missing (`apt-get install chromium`;
`.ci/run` does this before the tests)."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
from helpers import served
from PIL import Image

from dit_accel.ui import Limits, build_app

VIEWPORT = {"width": 1280, "height": 900}
STEP_MS, RUN_MS = 30_000, 40_000  # one page action; loading a model and its runs (on a busy CPU too)
BLANK_STD = 8.0  # pixel std of a picture area: the models draw ~40, a blank block ~3
MIN_SHOWN = 384
DOCS_PICTURE = Path(__file__).resolve().parents[1] / "docs" / "ui.png"
RAS = "ras:warmup_steps=1,error_reset_steps=()"


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium not found: install Debian's chromium (apt-get install chromium) to run the "
                    "browser test of the UI; .ci/run installs it")
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e "
                                   "'.[dev]' (it drives the system Chromium; no `playwright install` needed)")
    executable = _chromium()
    args = ["--disable-dev-shm-usage", "--disable-gpu"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to start its sandbox as root (CI containers)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def url():
    limits = Limits(max_steps=200, max_side=256, max_tune_generations=60)
    with served(build_app(["reference:image", "tiny:sd3"], limits=limits)) as app:
        yield app.local_url


@pytest.fixture
def page(browser, url):
    """A fresh page (its own session: no earlier runs in its charts)."""
    page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
    page.set_default_timeout(STEP_MS)
    page.goto(url)
    page.get_by_role("button", name="run", exact=True).wait_for()
    yield page
    page.close()


def _set(page, label: str, value: str):
    """Fill a field by its label: a number's input is named by the label alone, a textbox's by the label
    followed by its help text."""
    field = page.get_by_label(label, exact=True).or_(
        page.get_by_role("textbox", name=re.compile(rf"^\s*{re.escape(label)}\s")))
    field.fill(value)
    field.blur()  # Gradio takes the value on change/blur


def _choose(page, label: str, option: str):
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def _status(page, prefix: str, before: str):
    """Wait until the run's status line changes from `before` to one that starts with `prefix` ("done",
    "cancelled"); fail with the page's messages when it does not."""
    try:
        page.wait_for_function("""([prefix, before]) => {
                                    const now = document.querySelector('#status').innerText;
                                    return now !== before && now.startsWith(prefix); }""",
                               arg=[prefix, before], timeout=RUN_MS)
    except Exception as error:
        toasts = page.locator("[data-testid='toast-body']").all_inner_texts()
        pytest.fail(f"no '{prefix}' status: {type(error).__name__}; page messages: {toasts}")


def _run(page, prefix: str = "done"):
    """Click run and wait for its status."""
    before = page.locator("#status").inner_text()
    page.get_by_role("button", name="run", exact=True).click()
    _status(page, prefix, before)


def _picture(page, selector: str) -> np.ndarray:
    """The picture an <img> shows, as the server sent it (it is loaded when scrolled into view)."""
    image = page.locator(selector).first
    image.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    body = page.request.get(image.get_attribute("src")).body()
    with Image.open(io.BytesIO(body)) as picture:
        return np.asarray(picture.convert("RGB"))


def _on_screen(page, selector: str) -> tuple[dict, np.ndarray]:
    """The element's box and what the screen shows there."""
    element = page.locator(selector).first
    element.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=element.element_handle())
    box = element.bounding_box()
    shot = page.screenshot(clip=box)
    with Image.open(io.BytesIO(shot)) as picture:
        return box, np.asarray(picture.convert("RGB")).astype(np.float64)


def test_a_run_shows_large_outputs_a_slider_and_charts_and_saves_the_docs_picture(page):
    page.get_by_role("button", name=re.compile(r"^ras: ")).click()  # RAS's accordion, its defaults
    page.get_by_label("use ras", exact=True).check()
    _choose(page, "diffusers step cache", "fbcache")
    _set(page, "cache fields (e.g. threshold=0.1)", "threshold=0.1")
    _run(page)

    for selector in ("#output-0 img", "#output-1 img"):
        box, shown = _on_screen(page, selector)
        assert box["width"] >= MIN_SHOWN and box["height"] >= MIN_SHOWN, (selector, box)
        assert shown.std() > BLANK_STD, f"{selector} is blank on screen"
    assert _picture(page, "#output-0 img").shape == (384, 384, 3)
    assert "64x64 px, shown 6x (nearest)" in page.locator("#output-1").inner_text()

    # the slider: dragging its handle uncovers more of the plan's side
    plan_side = page.locator("#slider img").nth(1)
    plan_side.scroll_into_view_if_needed()
    before = plan_side.evaluate("img => getComputedStyle(img).clipPath")
    box = page.locator("#slider .slider-wrap").bounding_box()
    middle = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.move(*middle)
    page.mouse.down()
    page.mouse.move(middle[0] - box["width"] / 4, middle[1], steps=5)
    page.mouse.up()
    page.wait_for_function("([img, before]) => getComputedStyle(img).clipPath !== before",
                           arg=[plan_side.element_handle(), before])

    for chart in ("#difference img", "#flops img", "#shares img", "#pareto img", "#maps img"):
        _, shown = _on_screen(page, chart)
        assert shown.std() > BLANK_STD, f"{chart} is blank on screen"
    assert "RAS" in page.locator("#maps").inner_text()

    # the docs' picture: the page from the outputs to the difference view's numbers
    scrolled = page.evaluate("() => window.scrollY")  # boxes are in the viewport, the clip in the page
    top, bottom = page.locator("#output-0").bounding_box(), page.locator("#numbers").bounding_box()
    page.screenshot(path=str(DOCS_PICTURE), full_page=True,
                    clip={"x": 0, "y": scrolled + top["y"] - 8, "width": VIEWPORT["width"],
                          "height": bottom["y"] + bottom["height"] - top["y"] + 16})
    assert 10_000 < DOCS_PICTURE.stat().st_size < 400_000


def test_two_plans_make_two_columns(page):
    _choose(page, "model", "tiny:sd3")
    _set(page, "steps", "3")
    _set(page, "plans (replace the choices above)", f"{RAS}\nfbcache:threshold=0.2")
    _run(page)
    shown = [_on_screen(page, f"#output-{i} img") for i in (1, 2)]
    assert all(box["width"] >= MIN_SHOWN for box, _ in shown)
    assert RAS in page.locator("#output-1").inner_text() and "fbcache" in page.locator("#output-2").inner_text()
    assert not page.locator("#output-3").is_visible()


def test_tune_puts_a_plan_into_the_plan_box(page):
    _choose(page, "model", "tiny:sd3")
    _set(page, "steps", "4")
    page.get_by_role("tab", name="tune").click()
    _set(page, "target", "psnr=5")
    _set(page, "budget", "60gen")
    _set(page, "prompts a call", "2")
    _set(page, "tuning prompts, one a line", "a red circle\na blue square")
    page.get_by_role("button", name="tune", exact=True).click()
    result = page.locator("#tune-result")
    result.get_by_text(re.compile(r"\d+ generations; \d+ candidates measured on every batch; best so far")).wait_for()
    result.get_by_text(re.compile(r"\d+ candidates tried")).wait_for(timeout=RUN_MS)
    page.get_by_role("tab", name="compare").click()
    plan = page.get_by_role("textbox", name=re.compile(r"^\s*plans \(replace")).input_value()
    assert plan.endswith("tuned_plan.json"), plan
    _run(page)  # the tuned plan runs
    assert "tuned_plan.json" in page.locator("#output-1").inner_text()


def test_cancel_leaves_the_next_run_as_a_fresh_one(page):
    _choose(page, "model", "tiny:sd3")
    _set(page, "steps", "4")
    _set(page, "plans (replace the choices above)", RAS)
    _run(page)
    fresh = _picture(page, "#output-1 img")

    _set(page, "steps", "200")  # long enough to be cancelled on any machine
    _set(page, "height", "256")
    _set(page, "width", "256")
    before = page.locator("#status").inner_text()
    page.get_by_role("button", name="run", exact=True).click()
    page.get_by_text(re.compile(r"step \d+/200")).first.wait_for(timeout=RUN_MS)
    page.get_by_role("button", name="cancel", exact=True).click()
    _status(page, "cancelled", before)
    assert "the model is as it was" in page.locator("#status").inner_text()

    for label, value in (("steps", "4"), ("height", "64"), ("width", "64")):
        _set(page, label, value)
    _run(page)
    assert np.array_equal(_picture(page, "#output-1 img"), fresh)
