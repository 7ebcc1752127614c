"""The web page end to end in a real headless browser: Debian's chromium driven by Playwright for
Python (`executable_path`, no browser download). Screenshots go to test-artifacts/."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pytest
from test_serve import REPO_ROOT, AlwaysJar, build_tiny_index, catalogue_images, open_engine, serve_in_thread

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


LONG_NAME = "Organic extra-virgin cold-pressed olive oil with rosemary, garlic and chili, family size " * 2


@pytest.fixture(scope="module")
def site_with_classifier(site, tmp_path_factory):
    """A copy of the tiny index with a classifier (always 'jar') and one product name far longer
    than the others, served read-only."""
    from csearch.pipeline import Engine, Models
    from csearch.serve import create_app
    from csearch.types import Record

    _, index_dir = site
    copy = Path(shutil.copytree(index_dir, tmp_path_factory.mktemp("browser-classifier") / "index"))
    opened = open_engine(copy)
    jar, _, _ = next(image for image in catalogue_images(index_dir) if image[1] == "jar")
    ids, _ = opened.add([Record(str(jar), "jar", LONG_NAME)], workers=1)
    assert len(ids) == 1
    models = Models(opened.models.localizer, opened.models.extractor, AlwaysJar())
    app = create_app(Engine(opened.store, opened.config, models), workers=1, read_only=True)
    with serve_in_thread(app) as base:
        yield base, jar


def watch_requests(page, base: str) -> dict:
    """Every request leaving `base` is blocked and recorded, and every answer of 400 or more."""
    seen = {"external": [], "failed": []}

    def route(route):
        if route.request.url.startswith(base) or route.request.url.startswith(("data:", "blob:")):
            return route.continue_()
        seen["external"].append(route.request.url)
        return route.abort()

    page.route("**/*", route)
    page.on("response", lambda r: seen["failed"].append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return seen


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
    assert page.locator("#category option").first.text_content() == "all categories"  # nothing predicts
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

    page.wait_for_function("() => document.querySelector('#timings').textContent.includes('server time')")
    assert page.locator("#query").is_visible()

    page.evaluate(drop, ["notes.txt", "text/plain", base64.b64encode(b"not a photo").decode()])
    page.wait_for_selector("#status.error")
    assert "not an image" in page.text_content("#status")
    # only the error: no stale panel of the previous search, no broken image of the upload
    assert page.locator("#results .card").count() == 0
    assert page.locator("#query").is_hidden() and page.locator("#results-title").is_hidden()
    assert not page.get_by_text("Category:").is_visible()
    assert page.text_content("#timings") == "" and page.text_content("#predicted") == ""
    shown = "() => [...document.images].filter(i => i.getAttribute('src') && i.getClientRects().length).length"
    assert page.evaluate(shown) == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-error.png"))


def test_cards_have_one_height_and_the_category_says_predicted(site_with_classifier, page):
    base, jar = site_with_classifier
    requests = watch_requests(page, base)
    page.goto(base + "/")
    page.wait_for_function("() => document.querySelector('#category option').textContent === 'predicted'")
    page.set_input_files("#file", str(jar))
    page.wait_for_selector("#results .card")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.text_content("#predicted") == "jar"
    products = page.locator("#results .card .product")
    names = products.all_text_contents()
    assert LONG_NAME in names and any(len(name) < 20 for name in names)
    heights = {round(box["height"], 1) for box in (c.bounding_box() for c in page.locator("#results .card").all())}
    assert len(heights) == 1, heights  # one height, whatever the name's length
    long_name = products.nth(names.index(LONG_NAME))
    line = float(long_name.evaluate("e => parseFloat(getComputedStyle(e).lineHeight)"))
    assert long_name.bounding_box()["height"] <= 2 * line + 1  # clamped to two lines
    assert long_name.get_attribute("title") == LONG_NAME  # the whole name on hover
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-cards.png"), full_page=True)
    assert not requests["external"] and not requests["failed"], requests


def test_the_page_has_a_favicon(site, page):
    base, _ = site
    requests = watch_requests(page, base)
    page.goto(base + "/")
    page.wait_for_function("() => document.querySelectorAll('#category option').length > 1")
    icon = page.locator("link[rel=icon]").get_attribute("href")
    answer = page.request.get(base + icon)
    assert answer.status == 200 and answer.headers["content-type"].startswith("image/svg+xml")
    assert page.request.get(base + "/favicon.ico").status == 200
    assert not requests["external"] and not requests["failed"], requests


def test_docs_show_every_endpoint_offline(site, page):
    base, _ = site
    requests = watch_requests(page, base)
    page.goto(base + "/docs")
    page.wait_for_selector("#endpoints .endpoint")
    shown = {(s.get_attribute("data-method"), s.get_attribute("data-path")) for s in page.locator(".endpoint").all()}
    spec = page.request.get(base + "/openapi.json").json()
    documented = {(method.upper(), path) for path, operations in spec["paths"].items() for method in operations}
    assert shown == documented and ("DELETE", "/items/{item_id}") in shown
    search = page.locator(".endpoint[data-method=POST][data-path='/search']")
    assert search.locator(".auth").count() == 0
    rows = search.locator("table").first.locator("tr").all_text_contents()
    assert any(row.startswith("k") and "form" in row and "1–100" in row for row in rows), rows
    assert any(row.startswith("fileformfileyes") for row in rows), rows  # the upload is a file, required
    assert "422" in search.text_content() and "503" in search.text_content()
    add = page.locator(".endpoint[data-method=POST][data-path='/items']")
    assert add.locator(".auth").text_content() == "API key" and "401" in add.text_content()
    assert "X-API-Key" in page.text_content("#auth") and "Bearer" in page.text_content("#auth")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-docs.png"), full_page=True)
    assert not requests["external"] and not requests["failed"], requests
