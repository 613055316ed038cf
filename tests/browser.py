"""Headless Chromium (Debian's ``chromium``) driven by Playwright, to see a page as a user sees it.

Playwright downloads no browser here: it launches the system's ``/usr/bin/chromium`` (the Makefile
installs it with apt where it can). :func:`chromium_or_skip` skips a test, saying why, where either
is missing.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# this machine's closed network refuses Chromium's background connections: do not make them
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def chromium_or_skip() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's `chromium`: `make install` does where apt is available)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (it is in the `test` extras)")
    return CHROMIUM


@contextmanager
def browser_page(width: int = 1400, height: int = 1000):
    """A page of a fresh headless Chromium (its own profile), closed afterwards."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="tierflow-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=str(chromium_or_skip()), headless=True, args=FLAGS,
                viewport={"width": width, "height": height})
            try:
                yield context.pages[0] if context.pages else context.new_page()
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def artifact_page(ui_url: str, artifact_id: str, screenshot: Path | None = None) -> dict:
    """Open an artifact's page in the Prefect UI as a user would; what rendered: every image (its alt
    text, natural width and height, once loading has ended either way) and the tables' header cells."""
    with browser_page() as page:
        page.goto(f"{ui_url}/artifacts/artifact/{artifact_id}", wait_until="networkidle", timeout=120_000)
        page.wait_for_selector("table", timeout=60_000)
        page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=60_000)
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        return page.evaluate("""() => ({
            images: [...document.images].map(i => ({alt: i.alt, naturalWidth: i.naturalWidth,
                                                    naturalHeight: i.naturalHeight})),
            headers: [...document.querySelectorAll('table th')].map(th => th.textContent.trim()),
        })""")
