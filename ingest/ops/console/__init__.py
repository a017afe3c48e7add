"""The ops console: a static page (``static/``) served by the ops API at ``/console/``.

Its chart library (uPlot, from npm, pinned by ``package-lock.json``) is copied into
``static/vendor/`` when the project is set up (``bash .ci/bootstrap setup``); nothing is fetched
from the network when the page is served or shown.
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
VENDOR_FILES = ("uPlot.iife.min.js", "uPlot.min.css")


def missing_assets() -> list[str]:
    """The vendored files the page needs that are not built yet (empty when it can be served)."""
    return [name for name in VENDOR_FILES if not (STATIC / "vendor" / name).is_file()]
