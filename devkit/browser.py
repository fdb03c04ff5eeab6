"""A real browser for the tests: headless Chromium driven by Playwright, the system's package where there is one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Where a Chromium may be: CHROMIUM if set, the Debian package's, or none (Playwright's own download, if installed).
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# The flags of a headless run in a container as root, with nothing fetched in the background.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str | None:
    """Return the path of the Chromium to drive, or None to let Playwright use the one it installed."""
    chosen = os.environ.get("CHROMIUM")
    if chosen:
        return chosen
    found = next((path for path in CANDIDATES if Path(path).exists()), None)
    return found or shutil.which("chromium")
