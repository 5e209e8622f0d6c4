"""The Gradio page in a real headless browser: Debian's Chromium, driven over the DevTools protocol by
Playwright (pointed at the system binary; Playwright's own browser download is never used). A click on
"run" must leave both result areas showing a picture, in a saved screenshot.

Skipped, with the reason, where Playwright or a Chromium binary is missing (`apt-get install chromium`;
`.ci/run` does this before the tests)."""

from __future__ import annotations

import os
import re
import shutil

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
from helpers import served
from PIL import Image

from dit_accel.ui import Limits, build_app

MODEL = "tiny:sd3"
VIEWPORT = {"width": 1000, "height": 800}
STEP_MS, RUN_MS = 20_000, 60_000  # one page action; loading the model and both runs
BLANK_STD = 8.0  # pixel std of a picture area: the tiny model draws ~40, the blank block around it ~3


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
    with served(build_app([MODEL, "tiny:dit"], limits=Limits(max_steps=8, max_side=256))) as app:
        yield app.local_url


def _result(page, label: str):
    """The block of the output image labelled `label` (Gradio gives blocks no ids here)."""
    name = page.locator("[data-testid='block-label']", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))
    return page.locator("div.block", has=name).last


def _set(page, label: str, value: str):
    """Fill a field by its label: a number's input is named by the label alone, a textbox's by the label
    followed by its help text."""
    field = page.get_by_label(label, exact=True).or_(
        page.get_by_role("textbox", name=re.compile(rf"^\s*{re.escape(label)}\s")))
    field.fill(value)
    field.blur()  # Gradio takes the value on change/blur


def test_a_click_on_run_shows_both_pictures_in_the_browser(browser, url, tmp_path):
    page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
    try:
        page.set_default_timeout(STEP_MS)
        page.goto(url)
        run = page.get_by_role("button", name="run", exact=True)
        run.wait_for()
        _set(page, "steps", "4")  # the page offers 20; this server takes at most 8
        page.get_by_role("button", name=re.compile(r"^ras: ")).click()  # open RAS's accordion
        page.get_by_label("use ras", exact=True).check()
        _set(page, "warmup_steps", "1")
        _set(page, "error_reset_steps", "()")
        baseline, accelerated = _result(page, "baseline"), _result(page, "accelerated")
        assert baseline.locator("img").count() == accelerated.locator("img").count() == 0

        run.click()
        pictures = [baseline.locator("img").first, accelerated.locator("img").first]
        try:
            for picture in pictures:
                picture.wait_for(state="visible", timeout=RUN_MS)
            page.wait_for_function(
                """(imgs) => imgs.every(img => img && img.getAttribute('src') && img.complete
                                     && img.naturalWidth > 0)""",
                arg=[picture.element_handle() for picture in pictures])
        except Exception as error:
            toasts = page.locator("[data-testid='toast-body']").all_inner_texts()
            pytest.fail(f"no pictures after run: {type(error).__name__}; page messages: {toasts}")

        natural = [picture.evaluate("img => [img.naturalWidth, img.naturalHeight]") for picture in pictures]
        assert natural == [[64, 64], [64, 64]]

        accelerated.scroll_into_view_if_needed()
        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot))  # the viewport only: 1000x800, about 130 kB
        with Image.open(shot) as image:
            pixels = np.asarray(image.convert("RGB")).astype(np.float64)
        assert pixels.shape[:2] == (VIEWPORT["height"], VIEWPORT["width"])
        for name, picture in zip(("baseline", "accelerated"), pictures):
            box = picture.bounding_box()
            assert box and box["width"] >= 32 and box["height"] >= 32, (name, box)
            top, left = max(0, int(box["y"])), max(0, int(box["x"]))
            area = pixels[top:int(box["y"] + box["height"]), left:int(box["x"] + box["width"])]
            assert area.size and area.std() > BLANK_STD, f"{name} area is blank in {shot}: std {area.std():.2f}"
        assert shot.stat().st_size < 500_000
    finally:
        page.close()
