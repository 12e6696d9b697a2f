"""The rendered book, checked in headless Chromium (Debian's, driven by Playwright).

Run by ``make browser`` after ``make book``; not part of ``make unit`` (it needs the built
HTML under ``_build/html`` and ``/usr/bin/chromium``). For every chapter in ``_toc.yml`` it
checks that the page renders with no traceback, that its title is numbered once, that every
formula is typeset by the MathJax served from the book itself (no raw TeX delimiters left,
MathJax loaded from this server, not a CDN), that every code block fits its column on a
1280-pixel screen, that every figure loads, that each static slider shows another frame when
moved, and that the Colab launch link opens that chapter's notebook. The prose pages get the
same formula check.
Screenshots go to ``_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Flags for a closed network: without them Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def toc_chapters() -> list[str]:
    """Notebook paths (without suffix) listed in _toc.yml, in order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f for f in files if f.startswith("notebooks/")]


def repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"].rstrip("/")


CHAPTERS = toc_chapters()
# Errors thrown by the theme's own scripts, not by the book: sphinx-thebe 0.3.1 declares
# THEBE_JS_URL in two scripts of every page (even with thebe off in _config.yml).
THEME_JS_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    if not (HTML / "index.html").exists():
        pytest.fail(f"{HTML / 'index.html'} is missing: run `make book` first")
    handler = functools.partial(QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (see .ci/run)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):  # noqa: ANN001 - playwright types are optional
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []

    def on_error(exc: Exception) -> None:
        if str(exc) not in THEME_JS_ERRORS:
            errors.append(str(exc))

    pg.on("pageerror", on_error)
    pg.js_errors = errors
    yield pg
    context.close()


# Raw TeX delimiters that survive only if MathJax did not typeset the page.
RAW_MATH = ("\\(", "\\)", "\\[", "\\]", "$$")
PROSE_PAGES = ("book/intro", "book/glossary")


def check_math(page, server: str, where: str) -> int:  # noqa: ANN001
    """Wait for MathJax, then check it came from this server and left no raw TeX; returns the
    number of typeset formulas."""
    sources = page.evaluate(
        "() => [...document.scripts].map(s => s.src).filter(s => /mathjax/i.test(s))")
    assert sources, f"{where}: no MathJax script"
    assert all(src.startswith(server) for src in sources), f"{where}: MathJax from {sources}"
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                           timeout=30_000)
    typeset = page.evaluate("() => MathJax.startup.promise.then("
                            "() => document.querySelectorAll('mjx-container').length)")
    text = page.inner_text("article")
    left = [d for d in RAW_MATH if d in text]
    assert not left, f"{where}: raw TeX delimiters left after MathJax: {left}"
    return typeset


@pytest.mark.parametrize("doc", PROSE_PAGES)
def test_prose_page_math(doc: str, server: str, page) -> None:  # noqa: ANN001
    page.goto(f"{server}/{doc}.html", wait_until="load")
    assert check_math(page, server, doc) >= 1, f"{doc}: no formula typeset"
    assert page.js_errors == [], f"{doc}: JavaScript errors {page.js_errors}"


def test_toc_lists_chapters() -> None:
    on_disk = sorted(f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert CHAPTERS and sorted(CHAPTERS) == on_disk, (CHAPTERS, on_disk)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page(chapter: str, server: str, page) -> None:  # noqa: ANN001
    SHOTS.mkdir(parents=True, exist_ok=True)
    name = Path(chapter).name
    page.goto(f"{server}/{chapter}.html", wait_until="load")
    body = page.inner_text("article")

    # 1. it rendered, with no traceback from an executed cell
    assert page.locator("article h1").count() >= 1, f"{chapter}: no title"
    assert "Traceback (most recent call last)" not in body, f"{chapter}: a cell raised"
    assert page.locator(".output.error, .output.traceback").count() == 0, f"{chapter}: error output"

    # 1b. the title is numbered once ("5. Load balancing", never "5. 5. Load balancing")
    title = page.inner_text("article h1").strip()
    assert not re.match(r"^\d+(\.\d+)*\.?\s+\d+\.\s", title), f"{chapter}: title {title!r}"

    # 1c. formulas typeset by the book's own MathJax, no raw TeX left
    assert check_math(page, server, chapter) >= 1, f"{chapter}: no formula typeset"

    # 1d. code blocks fit their column at 1280 px (long lines wrap, they do not scroll)
    wide = page.evaluate(
        "() => [...document.querySelectorAll('article div.highlight pre')]"
        ".filter(p => p.scrollWidth > p.clientWidth + 1).map(p => p.innerText.slice(0, 60))"
    )
    assert wide == [], f"{chapter}: code blocks wider than the page: {wide}"

    # 2. every figure loaded (executed outputs hold PNGs; a broken one has naturalWidth 0)
    images = page.locator("article img")
    n_images = images.count()
    assert n_images >= 1, f"{chapter}: no figures"
    broken = page.evaluate(
        "() => [...document.querySelectorAll('article img')]"
        ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80))"
    )
    assert broken == [], f"{chapter}: figures that did not load: {broken}"

    # 3. every static slider shows another frame when moved
    sliders = page.locator(".moe-slider")
    for i in range(sliders.count()):
        slider = sliders.nth(i)
        slider.scroll_into_view_if_needed()
        visible = (
            "el => [...el.querySelectorAll('.moe-frame')]"
            ".findIndex(f => f.style.display !== 'none')"
        )
        before = slider.evaluate(visible)
        label_before = slider.locator(".moe-value").inner_text()
        slider.locator("input[type=range]").focus()
        page.keyboard.press("End" if before == 0 else "Home")
        after = slider.evaluate(visible)
        assert after != before, f"{chapter}: slider {i} did not change frame"
        assert slider.locator(".moe-value").inner_text() != label_before
        slider.screenshot(path=str(SHOTS / f"{name}_slider{i}.png"))

    # 4. the Colab launch link opens this chapter's notebook from the repository
    expected = repository_url().replace(
        "https://github.com/", "https://colab.research.google.com/github/"
    )
    hrefs = page.eval_on_selector_all(
        "a[href*='colab.research.google.com']", "as => as.map(a => a.href)"
    )
    assert f"{expected}/blob/main/{chapter}.ipynb" in hrefs, f"{chapter}: Colab links {hrefs}"

    assert page.js_errors == [], f"{chapter}: JavaScript errors {page.js_errors}"
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)
