"""Headless Chromium for report tests: the page's own verdict after load, and a screenshot.

Pages written by wbc.html set `data-wbc-status` on <html> once loaded ("ok images=N" or "error ...":
broken images, script errors, failed resources). Tests skip when Chromium is absent, except on CI
(`CI` set), where `.ci/run` installs it and a missing browser must fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set (.ci/run installs the Debian package)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return exe


def _run(url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="wbc-chromium-") as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                               *args, url], check=False, capture_output=True, text=True, timeout=120)


def page_status(html: Path) -> str:
    """The `data-wbc-status` the page wrote after load (from --dump-dom)."""
    dom = _run(Path(html).resolve().as_uri(), "--dump-dom").stdout
    m = re.search(r'data-wbc-status="([^"]*)"', dom)
    assert m, "the page's load script did not run (no data-wbc-status in the DOM)"
    return m.group(1)


def screenshot(html: Path, png: Path, size: str = "1280,900") -> Path:
    _run(Path(html).resolve().as_uri(), f"--screenshot={png}", f"--window-size={size}")
    return png
