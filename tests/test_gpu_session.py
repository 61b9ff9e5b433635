"""bench/gpu_session.sh, prepared on the CPU: a lent GPU gives 15 minutes in all and 10 per call, so a stage that
runs past its budget, or a flag a bench script does not have, costs the session's only chance to measure."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_session.sh"
BUDGETS = {"target": 470, "compiled": 560, "step": 560, "memory": 560, "tests": 560, "layers": 560}


def stages() -> dict[str, list[tuple[int, list[str]]]]:
    """Per stage of the script's `case`: (time limit, command words) of each `run NAME LIMIT COMMAND...` line."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    body = text[text.index('case "${1:-target}" in'):text.index("esac")]
    out = {}
    for m in re.finditer(r"^\s*([a-z_]+)\)\n(.*?);;", body, re.S | re.M):
        out[m.group(1)] = [(int(words[2]), words[3:]) for line in m.group(2).splitlines()
                           if (words := shlex.split(line)) and words[0] == "run"]
    return out


def test_every_stage_fits_its_budget():
    found = stages()
    assert set(found) == set(BUDGETS)
    for name, runs in found.items():
        assert runs and sum(limit for limit, _ in runs) <= BUDGETS[name], name


def script_help(script: str, monkeypatch) -> str:
    """What `python SCRIPT --help` prints, run here as the interpreter runs it (as __main__, its folder first on
    sys.path) without a new interpreter's imports: argparse prints the help and exits 0 before the script does any
    work."""
    out = io.StringIO()
    with monkeypatch.context() as m, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        m.setattr(sys, "argv", [str(ROOT / script), "--help"])
        m.syspath_prepend(str((ROOT / script).parent))
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exited.value.code in (0, None), (script, exited.value.code)
    return out.getvalue()


def test_every_flag_the_script_passes_exists(monkeypatch):
    helps: dict[str, str] = {}
    for runs in stages().values():
        for _, words in runs:
            if words[:2] == ["python", "-m"]:  # pytest: its test files exist
                assert all((ROOT / w).exists() for w in words if w.startswith("tests/")), words
                continue
            script = words[1]
            if script not in helps:
                helps[script] = script_help(script, monkeypatch)
            for flag in (w for w in words[2:] if w.startswith("--")):
                assert re.search(rf"{re.escape(flag)}\b", helps[script]), (script, flag)


def test_the_default_stage_selects_the_compiled_fp8_gradient_test(monkeypatch):
    """Its -k once read `inductor and fp8compute or gpu` as meant, with the precedence pytest gives it; collected
    here (on the CPU the CUDA tests are collected, then skipped), the selection must hold that test. The stage's
    pytest arguments are collected by pytest in this process (the test files' imports are mostly done already)."""
    (_, words), *_ = stages()["target"]
    assert words[:3] == ["python", "-m", "pytest"], words

    class Selected:
        ids: list[str] = []

        def pytest_collection_finish(self, session):
            self.ids = [item.nodeid for item in session.items]

    selected = Selected()
    monkeypatch.chdir(ROOT)  # as `python -m pytest` starts in the repository: its folder first on sys.path
    monkeypatch.syspath_prepend(str(ROOT))
    assert pytest.main([*words[3:], "--collect-only"], plugins=[selected]) == pytest.ExitCode.OK
    got = "\n".join(selected.ids)
    assert re.search(r"test_inductor_blocks_on_cuda_give_the_eager_lora_gradients\[fp8compute", got), got[-500:]
    assert "test_fp8_producers.py" in got
