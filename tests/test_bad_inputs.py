"""Every CLI over a table of bad inputs (issue 21): each row runs a CLI's `main(argv)` in this process and must
exit non-zero with one `error: ...` line that holds the row's substring, print no traceback, and leave every
file of the test's folder as it was. One real subprocess per CLI checks the exit path from the shell."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sampling.demo import DEMO_FOLDER, DEMO_LORA, DEMO_PROMPTS

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> its sha256 (and mode): what a refused command must leave as it was."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of bad inputs, built once: damaged files, a wrong family, NaN tensors, a damaged run, a dataset
    row that leaves its folder, and a training cache for the train rows."""
    from conftest import random_lora
    from mmdit_fixtures import SD35_TINY
    from test_data import make_cache

    from model.mmdit import MMDiT
    from weights.lora_write import write_lora

    root = tmp_path_factory.mktemp("bad")
    make_cache(root)  # root/cache: what the train rows run on (t5_length 5)
    good = load_file(str(DEMO_LORA))
    data = DEMO_LORA.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "random.safetensors").write_bytes(os.urandom(4096))
    (root / "pickled.pt").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    nan = dict(good)
    first = min(nan)
    nan[first] = nan[first].clone()
    nan[first].view(-1)[0] = float("nan")
    save_file(nan, root / "nan-lora.safetensors")
    # every shape twice the demo model's
    save_file({k: torch.zeros(*(2 * s if s > 16 else s for s in v.shape)) for k, v in good.items()},
              root / "wide-lora.safetensors")
    write_lora(random_lora(MMDiT(SD35_TINY), 0, family="sd3"), root / "sd3-lora.safetensors", "diffusers")
    transformer = load_file(str(DEMO_FOLDER / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v for k, v in transformer.items() if k != "norm_out.linear.weight"}, root / "missing.safetensors")
    (root / "a-file").write_text("not a folder")
    damaged = root / "damaged" / "checkpoints" / "step-000002"
    damaged.mkdir(parents=True)
    (damaged / "state.json").write_text("{torn")
    (damaged / "tensors.safetensors").write_bytes(b"garbage")
    escape = root / "escape"
    escape.mkdir()
    (escape / "metadata.jsonl").write_text(json.dumps({"file_name": "../outside.png", "prompt": "x"}) + "\n")
    return root


GEN = ["--prompt", "x", "--out", "{bad}/image.png"]
DATASET = ["--model", "{demo}", "--prompts", "{prompts}", "--images-per-bucket", "1"]
TRAIN = ["--model", "tiny", "--cache", "{bad}/cache", "--output", "{bad}/run", "--t5_length", "5", "--device", "cpu"]
EVAL = ["--no-grid", "--per-prompt", "1"]
CASES = [  # (cli, argv with {bad} / {demo} / {prompts} placeholders, substring of the one-line error)
    ("generate", [*GEN, "--lora", "{bad}/truncated.safetensors"], "truncated (header says"),
    ("generate", [*GEN, "--lora", "{bad}/random.safetensors"], "not a safetensors file"),
    ("generate", [*GEN, "--lora", "{bad}/pickled.pt"], "a pickled PyTorch checkpoint"),
    ("generate", [*GEN, "--lora", "{bad}/nan-lora.safetensors"], "NaN / infinite value(s)"),
    ("generate", [*GEN, "--lora", "{bad}/wide-lora.safetensors"], "for a different model size"),
    ("generate", [*GEN, "--lora", "{bad}/sd3-lora.safetensors"],
     "a LoRA for SD3 / SD3.5; this model is Flux: pass a LoRA trained on Flux"),
    ("generate", [*GEN, "--model", "{bad}/truncated.safetensors"], "truncated (header says"),
    ("generate", [*GEN, "--model", "{bad}/missing.safetensors", "--vae", "{demo}/vae", "--clip", "{demo}/text_encoder",
                  "--t5", "{demo}/text_encoder_2", "--t5-tokenizer", "{demo}/tokenizer_2"], "1 missing keys"),
    ("generate", [*GEN, "--width", "0"], "--width 0: image sizes are positive"),
    ("generate", [*GEN, "--width", "100000", "--height", "100000"], "over 4096 px"),
    ("generate", [*GEN, "--shift", "abc"], "--shift abc: expected a positive number"),
    ("generate", [*GEN, "--batch-size", "0"], "--batch-size 0: must be 1 or more"),
    ("generate", ["--prompt", "x", "--out", "{bad}/a-file/x.png"], "is a file, not a folder"),
    ("make_dataset", [*DATASET, "--out", "{bad}/ds", "--prompts", "{bad}/nowhere.txt"], "nowhere.txt"),
    ("make_dataset", [*DATASET, "--out", "{bad}/a-file/ds"], "is a file, not a folder"),
    ("make_dataset", [*DATASET, "--out", "{bad}/ds", "--resolution", "0"], "no bucket"),
    ("make_dataset", [*DATASET, "--out", "{bad}/ds", "--lora", "{bad}/truncated.safetensors"], "truncated"),
    ("make_dataset", [*DATASET, "--out", "{bad}/escape"], "is outside the dataset folder"),
    ("train", [*TRAIN, "--lr", "inf"], "lr must lie in (0, 1], got inf"),
    ("train", [*TRAIN, "--lr", "nan"], "lr must lie in (0, 1], got nan"),
    ("train", [*TRAIN, "--fast_decay", "2"], "fast_decay must lie in [0, 1), got 2.0"),
    ("train", [*TRAIN, "--shift_min", "5", "--shift_max", "1"], "shift_min 5.0 > shift_max 1.0"),
    ("train", ["--config", "{bad}"], "is a folder, not a TOML file"),
    ("train", [*TRAIN, "--output", "{bad}/a-file"], "is a file, not a folder"),
    ("train", [*TRAIN, "--teacher_lora", "{bad}/pickled.pt"], "a pickled PyTorch checkpoint"),
    ("train", [*TRAIN, "--teacher_lora", "{bad}/truncated.safetensors"], "truncated (header says"),
    ("train", [*TRAIN, "--output", "{bad}/damaged", "--resume"], "every checkpoint is damaged"),
    ("train", [*TRAIN, "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    ("train", [*TRAIN, "--device", "cuda:99"], "--device cuda:99: no such CUDA device here"),
    ("train", [*TRAIN, "--micro_batch", "3", "--batch_size", "8"], "micro_batch 3 does not divide batch_size 8"),
    ("train", [*TRAIN, "--t_skip", "3"], "t_skip must be even and >= 2"),
    ("export", ["{bad}/nowhere"], "no such folder"),
    ("export", ["{bad}/damaged", "--formats", "pt"], "argument --formats: invalid choice"),
    ("export", ["{bad}/damaged"], "nothing to export"),
    ("evaluate", [*EVAL, "--lora", "{bad}/truncated.safetensors"], "truncated (header says"),
    ("evaluate", [*EVAL, "--lora", "{bad}/nan-lora.safetensors"], "NaN / infinite value(s)"),
    ("evaluate", [*EVAL, "--seed", "-1"], "--seed -1"),
    ("evaluate", [*EVAL, "--json", "{bad}/a-file/x.json"], "is a file, not a folder"),
    ("evaluate", [*EVAL, "--compare", "{bad}/sd3-lora.safetensors"], "--compare: read with --out DIR only"),
    ("convert", ["lora", "{bad}/nan-lora.safetensors"], "the following arguments are required"),
    ("convert", ["info", "{bad}/truncated.safetensors"], "truncated (header says"),
    ("convert", ["info", "{bad}/random.safetensors"], "not a safetensors file"),
    ("convert", ["checkpoint", "{bad}/missing.safetensors", "{bad}/o", "--to", "official"], "1 missing keys"),
    ("convert", ["lora", "{bad}/nan-lora.safetensors", "{bad}/o.safetensors", "--to", "kohya", "--rank", "2"],
     "NaN / infinite value(s)"),
    ("convert", ["lora", "{bad}/pickled.pt", "{bad}/o.safetensors", "--to", "kohya"], "a pickled PyTorch"),
    ("convert", ["checkpoint", "{bad}/truncated.safetensors", "{bad}/o", "--to", "diffusers"], "truncated"),
    ("convert", ["merge", "--base", "{demo}", "--lora", "{bad}/sd3-lora.safetensors", "--out", "{bad}/m.safetensors"],
     "a LoRA for SD3 / SD3.5; this model is Flux: pass a LoRA trained on Flux"),
]
MODULES = {"generate": "sampling.generate", "make_dataset": "distill.make_dataset", "train": "distill.train",
           "export": "distill.export", "evaluate": "distill.evaluate", "convert": "tools.convert"}


def _fill(argv: list[str], bad: Path) -> list[str]:
    return [a.format(bad=bad, demo=DEMO_FOLDER, prompts=DEMO_PROMPTS) for a in argv]


@pytest.mark.parametrize("cli, argv, says", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_gives_one_line_and_changes_nothing(bad, capsys, cli, argv, says):
    main = importlib.import_module(MODULES[cli]).main
    before = _snapshot(bad)
    try:
        code = main(_fill(argv, bad))
    except SystemExit as e:  # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    assert code not in (0, None), (argv, out, err)
    assert "Traceback" not in out + err and "usage:" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0], err
    if cli == "evaluate":  # refused as generate, train, ... refuse: status 2, one `error: ...` line
        assert code == 2 and err.startswith("error: "), (code, err)
    assert _snapshot(bad) == before, "a refused command changed a file"


SUBPROCESS = [  # one real process per CLI: the exit status and the one line as a shell sees them
    ("generate", ["--prompt", "x", "--width", "0", "--out", "{bad}/image.png"], "--width 0"),
    ("make_dataset", [*DATASET, "--out", "{bad}/a-file/ds"], "is a file, not a folder"),
    ("train", ["--lr", "nan"], "lr must lie in"),
    ("train", [*TRAIN, "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    ("train", [*TRAIN, "--device", "cuda:99"], "--device cuda:99: no such CUDA device here"),
    ("train", [*TRAIN, "--micro_batch", "3", "--batch_size", "8"], "micro_batch 3 does not divide batch_size 8"),
    ("train", [*TRAIN, "--t_skip", "3"], "t_skip must be even and >= 2"),
    ("export", ["{bad}/nowhere"], "no such folder"),
    ("export", ["{bad}/damaged", "--formats", "pt"], "argument --formats: invalid choice"),
    ("evaluate", [*EVAL, "--lora", "{bad}/truncated.safetensors"], "truncated"),
    ("convert", ["info", "{bad}/random.safetensors"], "not a safetensors file"),
]


def test_each_cli_exits_non_zero_in_one_line_from_the_shell(bad):
    def shell(row):
        cli, argv, _ = row
        return subprocess.run([sys.executable, "-m", MODULES[cli], *_fill(argv, bad)], cwd=bad, check=False,
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})

    # the processes are independent and each mostly imports: run them side by side, a few per core
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        runs = list(pool.map(shell, SUBPROCESS))
    for (cli, _, says), run in zip(SUBPROCESS, runs):
        lines = [ln for ln in run.stderr.splitlines() if ln.strip() and not ln.startswith("[transformers]")]
        assert run.returncode != 0 and "Traceback" not in run.stderr, (cli, run.stderr)
        assert len(lines) == 1 and says in lines[0], (cli, run.stderr)
        if cli == "evaluate":  # as the shell sees generate's and train's refusals
            assert run.returncode == 2 and lines[0].startswith("error: "), (cli, run.returncode, run.stderr)


def test_the_table_covers_every_cli():
    assert {c for c, _, _ in CASES} == set(MODULES) == {c for c, _, _ in SUBPROCESS}
