"""A real browser for the console tests: Debian's chromium through chromium-driver (selenium).

Why the distribution's driver path is given explicitly: selenium would
otherwise try to download a matching driver, which a machine without the
internet cannot, and which would not be the browser hospitals run anyway.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.support.markers import peer_entry

__all__ = ["chromium"]


@contextmanager
@peer_entry("chromium (selenium)")
def chromium(width: int = 1366, height: int = 768) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    if not shutil.which(driver_path) or not shutil.which(binary):
        raise RuntimeError("chromium and chromium-driver are not installed; `make peers` "
                           "installs them with apt-get when run as root")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
