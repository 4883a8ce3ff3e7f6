"""Headless Chromium for page tests (Debian's chromium + chromium-driver, driven by Selenium)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from typing import Iterator

import pytest


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator["object"]:
    """A Selenium Chrome driver on Debian's Chromium; skips the test when it is not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="protege-chromium-")
    # The machine has no outside network: without these flags Chromium retries connections at every start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
