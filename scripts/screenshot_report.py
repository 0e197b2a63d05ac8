#!/usr/bin/env python3
"""Render the study report (reports/index.html) in headless Chromium and save a screenshot.

    python scripts/screenshot_report.py [reports/index.html] [--out shot.png] [--height 2400]

Prints the PNG path. Chromium runs fully offline (a fresh profile, no sync, no background
networking), which also proves the page needs nothing from the network. Exit status 2 when
Chromium is not installed (the message says how to install it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = (
    "Chromium not found. Install it (Debian/Ubuntu, as root): apt-get update && apt-get install -y chromium\n"
    "or pass --chromium /path/to/chromium (or set CHROMIUM)."
)


def find_chromium(explicit: str | None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() and os.access(explicit, os.X_OK) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(chromium: str, page: Path, out: Path, width: int, height: int, timeout: float = 120) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
            f"--window-size={width},{height}", page.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"chromium failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", nargs="?", default="reports/index.html", help="HTML file to render")
    parser.add_argument("--out", help="PNG path (default: <page dir>/../report-screenshot.png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM"), help="Chromium executable")
    args = parser.parse_args(argv)

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    page = Path(args.page)
    if not page.is_file():
        print(f"{page}: not found; run `python -m stages.report --params params.yaml` first", file=sys.stderr)
        return 1
    # outside reports/ by default: that folder is a DVC output, replaced whole by the stage
    out = Path(args.out) if args.out else page.resolve().parent.parent / "report-screenshot.png"
    try:
        screenshot(chromium, page, out, args.width, args.height)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(err, file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
