"""Drive the comparison app (`python -m sampling.app`) in a real headless Chromium: start the app on a free port
of 127.0.0.1 in a subprocess, open the page, type a prompt, click Generate, wait for the columns. The browser test
(tests/test_app_browser.py) and the screenshot script (tools/ui_screenshot.py) share this.

The browser is the system's Chromium (Debian's `chromium` package, /usr/bin/chromium; `--no-sandbox` because CI
runs as root), driven by Playwright's Python API through that binary: nothing downloads a browser.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = os.environ.get("SCFM_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]


def chromium() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(out: Path, *argv: str, timeout: float = 120, threads: int | None = None) -> Iterator[str]:
    """`python -m sampling.app --out OUT ARGV...` on a free port; yields its URL once it answers, stops it after.
    `threads`: torch's CPU threads in the app (OMP_NUM_THREADS), e.g. a test process's, whose sums it then
    adds in the same order."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    port = free_port()
    log = open(out.parent / f"app-{port}.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "sampling.app", "--port", str(port), "--out", str(out), *argv],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited ({proc.returncode}): {Path(log.name).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the app did not answer on {url} in {timeout:.0f} s") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1000):
    """A page of headless Chromium (the system's), with downloads allowed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
            yield page
        finally:
            browser.close()


def generate(page, url: str, prompt: str, columns: tuple[str, ...] = ("A", "B"), timeout_ms: int = 90_000) -> None:
    """Open the page, type `prompt`, click Generate and wait until each column shows its image and its NFE."""
    page.goto(url)
    box = page.locator("#prompt textarea")
    box.wait_for(timeout=timeout_ms)
    box.fill(prompt)
    page.locator("#generate").click()
    for name in columns:
        page.locator(f"#info-{name}").get_by_text("NFE").wait_for(timeout=timeout_ms)
        page.locator(f"#image-{name} img").wait_for(timeout=timeout_ms)


def served_image(page, url: str, name: str) -> bytes:
    """The bytes the page's <img> of column `name` was served."""
    src = page.locator(f"#image-{name} img").get_attribute("src")
    return page.request.get(src if src.startswith("http") else url.rstrip("/") + "/" + src.lstrip("/")).body()


def downloaded_png(page, name: str) -> bytes:
    """Click column `name`'s PNG download link; the downloaded file's bytes."""
    with page.expect_download() as info:
        page.locator(f"#file-{name} a").first.click()
    return Path(info.value.path()).read_bytes()
