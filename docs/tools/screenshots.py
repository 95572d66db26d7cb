"""Screenshots of the built site in headless Chromium, at a desktop and a phone width.

Builds the site into a temporary folder (or uses ``--site``), serves it on the loopback
interface and saves one PNG per page and width into ``--out``, to check by eye that tables, code
and formulas fit. Not run by the tests: it needs Chromium (``apt-get install chromium`` on
Debian).

    python docs/tools/screenshots.py --out /tmp/shots
    python docs/tools/screenshots.py --out /tmp/shots --pages guides/multi-task/ --widths 1280
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    "",
    "getting-started/",
    "guides/multi-task/",
    "guides/choosing/",
    "guides/distributed/",
    "aggregators/",
    "aggregators/upgrad/",
    "scalarizers/",
    "reference/",
    "benchmarks/gramian/",
    "cite/",
]
WIDTHS = {1280: 2400, 390: 2400}  # width: height, in CSS pixels
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def build(site: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        check=True,
    )


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def screenshot(browser: str, url: str, width: int, height: int, path: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--virtual-time-budget=3000",
                f"--screenshot={path}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--site", type=Path, help="an already built site (default: build one)")
    parser.add_argument("--pages", nargs="+", default=PAGES, help="paths under the site root")
    parser.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS))
    parser.add_argument("--height", type=int, help="window height (default: per width)")
    args = parser.parse_args()

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("Chromium is not installed (apt-get install chromium).")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site or Path(tmp) / "site"
        if args.site is None:
            build(site)
        server = serve(site)
        try:
            for page in args.pages:
                for width in args.widths:
                    height = args.height or WIDTHS.get(width, 2400)
                    name = (page.strip("/").replace("/", "_") or "home") + f"_{width}.png"
                    url = f"http://127.0.0.1:{server.server_port}/{page}"
                    screenshot(browser, url, width, height, args.out / name)
                    print(args.out / name)
        finally:
            server.shutdown()


if __name__ == "__main__":
    main()
