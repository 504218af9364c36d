"""Headless Chromium for the DLQ page tests (Debian's package; ./dev setup installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def chromium_binary() -> str:
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    pytest.fail("headless Chromium not found (install Debian's `chromium`; `./dev setup` does it as root)")


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Run headless Chromium on `url` with extra arguments; returns its stdout (the DOM for --dump-dom)."""
    command = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
        url,
    ]
    done = subprocess.run(command, capture_output=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


def rows(dom: str) -> list[str]:
    return re.findall(r'<tr class="letter">.*?</tr>', dom, flags=re.S)
