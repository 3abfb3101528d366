"""The screenshot of `rlr serve`'s page in docs/serve.md and the README.

    python -m tools.serve_screenshot --run RUN --images A.png B.png ... [--out docs/img/serve.png]

Starts `rlr serve` on a free loopback port, opens the page in headless Chromium (Debian's
`chromium`, driven by Playwright), uploads the images as a user would, waits for the heat maps and
saves a screenshot of the page.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", type=Path, default=Path("docs/img/serve.png"))
    p.add_argument("--width", type=int, default=1100)
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from rlr.serve import running_server

    with running_server(args.run, timeout=600) as server:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": 800})
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']")
            page.set_input_files("#files", args.images)
            page.wait_for_function(f"document.querySelectorAll('.result img').length === {len(args.images)}",
                                   timeout=300_000)
            page.wait_for_function("Array.from(document.querySelectorAll('.result img'))"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
