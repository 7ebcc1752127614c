"""The web page end to end in a real headless browser: Debian's chromium driven by Playwright for
Python (`executable_path`, no browser download). Screenshots go to test-artifacts/."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pytest
from test_serve import REPO_ROOT, build_tiny_index, catalogue_images, open_engine, serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright (Python) is not installed: pip install "
    "playwright (no browser download needed; Debian's chromium is used)",
)
if not CHROMIUM.is_file() and not shutil.which("chromium"):
    pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}: apt-get install chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from csearch.serve import create_app

    index_dir = build_tiny_index(tmp_path_factory.mktemp("browser") / "tiny")
    with serve_in_thread(create_app(open_engine(index_dir), workers=1)) as base:
        yield base, index_dir


@pytest.fixture(scope="module")
def browser():
    executable = CHROMIUM if CHROMIUM.is_file() else Path(shutil.which("chromium"))
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    errors = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    # a 4xx the page handles still logs "Failed to load resource"; anything else is a bug
    opened.on(
        "console",
        lambda msg: (
            errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource")
            else None
        ),
    )
    yield opened
    context.close()
    assert not errors, errors


def test_pick_a_photo_see_matches_and_compare_masks(site, page):
    base, index_dir = site
    photo, category, product = catalogue_images(index_dir)[8]
    page.goto(base + "/")
    page.wait_for_function("document.querySelectorAll('#category option').length > 1")  # stats loaded
    assert "12 catalogue images" in page.text_content("#index-info")
    page.select_option("#k", "5")
    page.select_option("#rerank", "iou")
    page.set_input_files("#file", str(photo))

    page.wait_for_selector("#results .card")
    cards = page.locator("#results .card")
    assert cards.count() == 5
    assert page.text_content("#predicted") == "all categories"  # no classifier in the tiny index
    assert cards.nth(0).locator(".product").text_content() == product
    assert re.search(r"score \d\.\d{3} · IoU \d\.\d{3}", cards.nth(0).locator(".meta").text_content())
    page.wait_for_function("document.querySelector('#cutout').naturalWidth > 0")
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)

    last = cards.nth(4)  # a weaker match: two visibly different masks, IoU below 1
    last_product = last.locator(".product").text_content()
    last.click()
    page.wait_for_selector("#detail[open]")
    page.wait_for_function("/^\\d\\.\\d{3}$/.test(document.querySelector('#detail-iou').textContent)")
    overlay_iou = float(page.text_content("#detail-iou"))
    ranking_text = page.text_content("#detail-scores")
    ranked_iou = float(re.search(r"IoU used for ranking (\d\.\d{3})", ranking_text).group(1))
    assert overlay_iou == pytest.approx(ranked_iou, abs=1e-3)  # the overlay shows what was compared
    page.wait_for_function("document.querySelector('#detail-item-mask').naturalWidth === 64")
    assert overlay_iou < 1
    assert page.text_content("#detail-title") == last_product
    page.screenshot(path=str(ARTIFACTS / "serve-detail.png"))
    page.click("#close")
    page.wait_for_selector("#detail", state="hidden")


def test_drop_a_photo_and_see_errors_in_the_page(site, page):
    base, index_dir = site
    photo, category, product = catalogue_images(index_dir)[1]
    page.goto(base + "/")
    drop = """([name, type, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }"""
    page.select_option("#category", category)
    page.evaluate(drop, ["photo.png", "image/png", base64.b64encode(photo.read_bytes()).decode()])
    page.wait_for_selector("#results .card")
    metas = page.locator("#results .card .meta").all_text_contents()
    assert metas and all(m.startswith(category) for m in metas)
    assert page.text_content("#predicted") == category

    page.evaluate(drop, ["notes.txt", "text/plain", base64.b64encode(b"not a photo").decode()])
    page.wait_for_selector("#status.error")
    assert "not an image" in page.text_content("#status")
    assert page.locator("#results .card").count() == 0
