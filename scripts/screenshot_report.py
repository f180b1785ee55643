"""Render a report.html in headless Chromium and save a screenshot: check a report as a browser shows it.

python scripts/screenshot_report.py outputs/<date>/<time>/report.html report.png [--size 1200,2400]

Needs the `chromium` binary (Debian: apt-get install chromium); not part of the test suite. Exits 1 with a
message when Chromium is missing or writes no screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def screenshot(html: Path, png: Path, *, size: str = "1200,2400") -> Path:
    """Render ``html`` in headless Chromium at ``size`` (width,height) and write ``png``."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={png.resolve()}",
            f"--window-size={size}",
            html.resolve().as_uri(),
        ]
        subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--size", default="1200,2400", help="window width,height in pixels")
    args = parser.parse_args(argv)
    try:
        print(screenshot(args.html, args.png, size=args.size))
    except (FileNotFoundError, RuntimeError) as e:
        print(f"screenshot_report: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
