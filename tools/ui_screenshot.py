"""The README's picture of the comparison app, taken from the real page: `python -m tools.ui_screenshot` starts
`python -m sampling.app` on the built-in demo, generates one comparison in headless Chromium (tools/ui_browser.py,
as the browser test does) and writes docs/ui.png (or --out)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tools.ui_browser import ROOT, browser_page, chromium, generate, running_app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.ui_screenshot", description=__doc__)
    p.add_argument("--out", default=str(ROOT / "docs" / "ui.png"))
    p.add_argument("--prompt", default="a red circle above a blue square")
    args = p.parse_args(argv)
    if chromium() is None:
        print("error: no chromium here; apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, running_app(Path(tmp) / "out") as url, browser_page() as page:
        generate(page, url, args.prompt)
        page.screenshot(path=args.out, full_page=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
