"""The comparison app in a real browser: `python -m sampling.app` on the demo in a subprocess, headless Chromium
(the system's, through Playwright: tools/ui_browser.py) types a prompt and clicks Generate; both columns' images,
as the page serves them, are the PNGs the app wrote and the CLI's images bit for bit, and a downloaded PNG is the
written file byte for byte. Needs Debian's chromium: skipped without it, except under SCFM_CI=1 (.ci/run), where a
missing browser fails."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tools.ui_browser import browser_page, chromium, downloaded_png, generate, running_app, served_image

PROMPT = "a blue square above a red circle"

if chromium() is None:
    if os.environ.get("SCFM_CI") == "1":
        raise RuntimeError("SCFM_CI=1 but /usr/bin/chromium is missing: .ci/run installs it (apt-get install chromium)")
    pytest.skip("no chromium here (apt-get install chromium); SCFM_CI=1 makes this a failure", allow_module_level=True)


def test_generate_in_the_page_shows_and_serves_the_clis_pngs(tmp_path):
    from sampling.generate import main as cli

    out = tmp_path / "out"
    # the app adds up on as many threads as this process (1, conftest.py): the same sums, the same bits
    with running_app(out, threads=torch.get_num_threads()) as url, browser_page() as page:
        generate(page, url, PROMPT)
        written = sorted(out.glob("*.png"))
        assert len(written) == 2  # A (the teacher) then B (the student)
        for name, path in zip("AB", written):
            assert served_image(page, url, name) == path.read_bytes()  # served as written: no WebP, chunk kept
        assert downloaded_png(page, "B") == written[1].read_bytes()
        assert "4 NFE" in page.locator("#info-B").inner_text()
    for path, flags in zip(written, ([], ["--lora", "demo"])):
        assert cli(["--prompt", PROMPT, "--seed", "0", "--out", str(tmp_path / "cli.png"), "--overwrite", *flags]) == 0
        ours = np.asarray(Image.open(io.BytesIO(path.read_bytes())))
        assert np.array_equal(ours, np.asarray(Image.open(tmp_path / "cli.png"))), path.name
