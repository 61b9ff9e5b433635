"""The comparison app's engine (sampling/compare.py) on the built-in demo, without a browser: its columns are
`sampling.generate`'s images bit for bit, LoRA changes merge and unmerge exactly (and, with --fp8, give what a load
with those LoRAs gives), a LoRA that does not fit is refused with the CLI's line, and no file outside the folders
given at launch is read. tests/test_app_browser.py drives the page itself."""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sampling.app import build_parser
from sampling.compare import Column, Session, grid_image, parse_values, sweep_columns
from sampling.demo import DEMO_LORA
from sampling.generate import main as generate
from sampling.png_record import read_png_params
from weights.io import WeightsError, read_header

PROMPT = "a red circle above a blue square"


def style_lora(folder):
    """A second LoRA in a --lora-dir: the demo's, halved (so a stack of two differs from either)."""
    folder.mkdir(exist_ok=True)
    path = folder / "style.safetensors"
    save_file({k: v * 0.5 for k, v in load_file(DEMO_LORA).items()}, path, read_header(DEMO_LORA)[1])
    return path


def session(tmp_path, *argv) -> Session:
    loras = tmp_path / "loras"
    style_lora(loras)
    return Session(build_parser().parse_args(["--lora-dir", str(DEMO_LORA.parent), "--lora-dir", str(loras),
                                              "--out", str(tmp_path / "out"), *argv]))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_columns_are_generates_images_and_lora_changes_undo_exactly(tmp_path):
    app = session(tmp_path)
    base = {k: v.clone() for k, v in app.pipe.transformer.state_dict().items()}
    style = tmp_path / "loras" / "style.safetensors"
    columns = {"teacher": (Column(), []),
               "student": (Column([(str(DEMO_LORA), 1.0)]), ["--lora", "demo"]),
               "stack": (Column([(str(DEMO_LORA), 0.8), (str(style), 1.3)], steps=3, shift=2.5),
                         ["--lora", f"{DEMO_LORA}:0.8", "--lora", f"{style}:1.3", "--steps", "3", "--shift", "2.5"])}
    for name, (col, flags) in columns.items():
        got = app.render(PROMPT, "", 3, 64, 64, col)
        assert generate(["--prompt", PROMPT, "--seed", "3", "--out", str(tmp_path / f"{name}.png"), *flags]) == 0
        assert np.array_equal(pixels(got.path), pixels(tmp_path / f"{name}.png")), name
        assert read_png_params(got.path) == read_png_params(tmp_path / f"{name}.png")
        assert got.nfe == (28 if name == "teacher" else 4 if name == "student" else 3)
    assert app.render(PROMPT, "", 3, 64, 64, columns["stack"][0]).lora_seconds == 0  # the same stack: no change
    app.set_loras([])
    assert all(torch.equal(v, base[k]) for k, v in app.pipe.transformer.state_dict().items())  # bit for bit


def test_fp8_lora_changes_give_what_loading_with_them_gives(tmp_path):
    from weights.transformer import load_flux

    app = session(tmp_path, "--fp8")
    col = Column([(str(DEMO_LORA), 1.2)])
    got = app.render(PROMPT, "", 1, 64, 64, col)
    assert generate(["--prompt", PROMPT, "--seed", "1", "--fp8", "--lora", f"{DEMO_LORA}:1.2", "--out",
                     str(tmp_path / "cli.png")]) == 0
    assert np.array_equal(pixels(got.path), pixels(tmp_path / "cli.png"))
    app.set_loras([])
    fresh = load_flux(app.pipe.sources.transformer, fp8=True).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in app.pipe.transformer.state_dict().items())


def test_refusals_are_the_clis_lines_and_no_file_outside_the_launch_folders_is_read(tmp_path, capsys):
    from test_sd3_lora_files import trained_set

    from weights.lora_write import write_lora

    app = session(tmp_path)
    _, sd3 = trained_set()
    write_lora(sd3, tmp_path / "loras" / "sd3.safetensors", "diffusers")
    with pytest.raises(WeightsError) as refused:
        app.render(PROMPT, "", 0, 64, 64, Column([(str(tmp_path / "loras" / "sd3.safetensors"), 1.0)]))
    assert generate(["--prompt", PROMPT, "--lora", str(tmp_path / "loras" / "sd3.safetensors"), "--out",
                     str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {refused.value}" and "\n" not in str(refused.value)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(DEMO_LORA.read_bytes())
    for path in (str(outside), str(tmp_path / "loras" / ".." / "elsewhere.safetensors"), "/etc/passwd"):
        with pytest.raises(ValueError, match="outside the LoRA folders this app was started with"):
            app.render(PROMPT, "", 0, 64, 64, Column([(path, 1.0)]))
    assert str(tmp_path / "loras" / "sd3.safetensors") in app.lora_files()
    args = build_parser().parse_args([])
    assert (args.host, args.share) == ("127.0.0.1", False)  # never on the network unless asked
    launched = Session(build_parser().parse_args(["--lora", "demo", "--out", str(tmp_path / "demo-out")]))
    assert launched.launch_loras == [DEMO_LORA.resolve()]  # `--lora demo`, as generate reads it
    # launch flags that would fail later, or never: refused in one line before the model loads
    (tmp_path / "a-file").write_text("")
    for argv, said in ((["--lora", str(tmp_path / "nope.safetensors")], "nope.safetensors: no such file; pass"),
                       (["--out", str(tmp_path / "a-file")], "a-file is a file, not a folder; pass another --out")):
        with pytest.raises((WeightsError, ValueError), match=said):
            Session(build_parser().parse_args(argv))


def test_a_sweep_is_one_labelled_grid_of_the_columns_it_varies(tmp_path):
    app = session(tmp_path)
    axes = [("steps", parse_values("steps", "1, 2")), ("lora scale", parse_values("lora scale", "0.5 1"))]
    cells = sweep_columns(Column([(str(DEMO_LORA), 1.0)]), 4, axes)
    assert [(c.steps, c.loras[0][1]) for _, c, _ in cells] == [(1, 0.5), (2, 0.5), (1, 1.0), (2, 1.0)]
    images = [Image.open(app.render(PROMPT, "", s, 64, 64, c).path).convert("RGB") for _, c, s in cells]
    grid = grid_image(images, axes, [labels for labels, _, _ in cells])
    assert grid.size[0] > 2 * 64 and grid.size[1] == 14 + 2 * 64
    assert np.array_equal(np.asarray(grid)[14:78, -64:], np.asarray(images[1]))  # row 1, column 2: steps 2
    with pytest.raises(ValueError, match="is not a list of numbers"):
        parse_values("shift", "3, high")



def test_a_refused_lora_leaves_the_merged_stack_and_the_next_column_has_it(tmp_path, monkeypatch):
    import sampling.base
    from weights.lora_merge import unload_loras

    app = session(tmp_path)
    dev_only = tmp_path / "loras" / "dev_only.safetensors"  # a FLUX.1-dev LoRA: the demo has no guidance_in
    save_file({"lora_unet_guidance_in_in_layer.lora_down.weight": torch.zeros(2, 256),
               "lora_unet_guidance_in_in_layer.lora_up.weight": torch.zeros(64, 2)}, dev_only)
    student = Column([(str(DEMO_LORA), 1.0)])
    before = app.render(PROMPT, "", 2, 64, 64, student)
    merged = {k: v.clone() for k, v in app.pipe.transformer.state_dict().items()}
    loras = [(lora.source, scale) for lora, scale in app.pipe.loras]

    def unchanged():
        assert [(lora.source, scale) for lora, scale in app.pipe.loras] == loras
        assert all(torch.equal(v, merged[k]) for k, v in app.pipe.transformer.state_dict().items())

    with pytest.raises(WeightsError, match="guidance_in.in_layer is not in this model"):
        app.render(PROMPT, "", 2, 64, 64, Column([(str(dev_only), 1.0)]))
    unchanged()  # refused before the demo LoRA was unmerged
    after = app.render(PROMPT, "", 2, 64, 64, student)
    assert np.array_equal(pixels(after.path), pixels(before.path))
    assert read_png_params(after.path)["loras"] == read_png_params(before.path)["loras"]
    params = read_png_params(before.path)  # the LoRA's own settings, so that only the LoRA differs
    bare = app.render(PROMPT, "", 2, 64, 64, Column(steps=params["steps"], shift=params["shift"],
                                                    schedule=params["schedule"]))
    assert not np.array_equal(pixels(bare.path), pixels(before.path))

    # a merge that fails after the previous stack was unmerged merges that stack again
    app.render(PROMPT, "", 2, 64, 64, student)
    real = sampling.base.apply_loras

    def failing(model, parts, **kw):
        if any(lora.source.endswith("style.safetensors") for lora, _ in parts):
            raise WeightsError("a merge that fails")
        real(model, parts, **kw)

    monkeypatch.setattr(sampling.base, "apply_loras", failing)
    with pytest.raises(WeightsError, match="a merge that fails"):
        app.render(PROMPT, "", 2, 64, 64, Column([(str(tmp_path / "loras" / "style.safetensors"), 1.0)]))
    monkeypatch.undo()
    unchanged()

    # and whatever a failed change left, the Session merges the next column's stack again instead of trusting it
    def unmerged_then_failed(_):
        unload_loras(app.pipe.transformer)
        raise WeightsError("a change that failed half way")

    monkeypatch.setattr(app.pipe, "set_loras", unmerged_then_failed)
    with pytest.raises(WeightsError, match="half way"):
        app.render(PROMPT, "", 2, 64, 64, Column([(str(tmp_path / "loras" / "style.safetensors"), 1.0)]))
    monkeypatch.undo()
    again = app.render(PROMPT, "", 2, 64, 64, student)
    assert again.lora_seconds > 0 and np.array_equal(pixels(again.path), pixels(before.path))


def test_sessions_sharing_an_out_folder_never_replace_a_file(tmp_path, monkeypatch):
    import sampling.compare

    first = session(tmp_path)
    paths = [first.render(PROMPT, "", s, 64, 64, Column(steps=2)).path for s in (0, 1)]
    kept = {p: p.read_bytes() for p in paths}
    second = session(tmp_path)  # a later launch with the same --out
    new = second.render(PROMPT, "", 0, 64, 64, Column([(str(DEMO_LORA), 1.0)])).path
    assert new.name == "00002-0.png" and new not in kept
    assert {p: p.read_bytes() for p in paths} == kept

    out = second.out  # grids 0 and 2 left, 1 deleted: the next is 3, and neither earlier grid is replaced
    for n in (0, 2):
        Image.new("RGB", (8, 8), (n, 0, 0)).save(out / f"grid-{n:04d}.png")
    grids = {p: p.read_bytes() for p in out.glob("grid-*.png")}
    image = Image.new("RGB", (16, 8), (0, 200, 0))
    saved = second.save_grid(image)
    assert saved.name == "grid-0003.png" and np.array_equal(pixels(saved), np.asarray(image))
    assert second.save_grid(image).name == "grid-0004.png"
    assert {p: p.read_bytes() for p in grids} == grids

    class Broken:  # a write that fails half way leaves no file under the grid's name, and no temp file
        def save(self, path, format):
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        second.save_grid(Broken())
    assert not (out / "grid-0005.png").exists() and not list(out.glob(".grid-*"))

    # two sessions (two processes) that read the folder at once pick the same number: the later write takes the
    # next free one instead of replacing the first one's file
    real = sampling.compare.next_index
    for pattern, write in ((sampling.compare._COLUMN, lambda s: s.render(PROMPT, "", 0, 64, 64, Column(steps=2)).path),
                           (sampling.compare._GRID, lambda s: s.save_grid(image))):
        stale = [real(out, pattern)]  # what both read before either wrote
        earlier = write(first)
        kept = {p: p.read_bytes() for p in out.iterdir()}
        monkeypatch.setattr(sampling.compare, "next_index", lambda f, p: stale.pop() if stale else real(f, p))
        later = write(second)
        monkeypatch.undo()
        assert later != earlier and later.stat().st_size > 0 and {p: p.read_bytes() for p in kept} == kept


def test_only_the_app_imports_gradio_and_it_imports_nothing_from_distill():
    from test_imports import graph, modules

    mods, g = modules(), graph()
    users = {name for name, path in mods.items() if "import gradio" in path.read_text()}
    assert users == {"sampling.app"}
    assert not [d for name in ("sampling.app", "sampling.compare") for d in g[name] if d.startswith("distill")]


def test_one_render_at_a_time_and_a_sweep_cannot_repeat_its_axis(tmp_path):
    """Two tabs' jobs share one queue slot (Generate and Render grid: gradio limits each handler on its own), and
    whatever still runs at once waits for Session.busy: another thread cannot take the model while a column
    samples. A second axis equal to the first would overwrite it in every cell: refused."""
    import threading

    pytest.importorskip("gradio")
    from sampling.app import build_ui

    app = session(tmp_path)
    jobs = {f.name: f for f in build_ui(app).fns.values() if f.name in ("compare", "sweep")}
    assert {(f.concurrency_id, f.concurrency_limit) for f in jobs.values()} == {("model", 1)}
    held = []

    def step(i, n, _latents):  # mid-sampling, another thread tries to take the model
        probe = threading.Thread(target=lambda: held.append(app.busy.acquire(blocking=False)))
        probe.start()
        probe.join()

    app.render(PROMPT, "", 0, 64, 64, Column(steps=2), callback=step)
    assert held == [False, False]
    with pytest.raises(ValueError, match="both sweep axes are 'steps'"):
        sweep_columns(Column(steps=2), 0, [("steps", [1, 2]), ("steps", [4])])


def test_column_c_samples_with_its_own_guidance_and_lora_hints(tmp_path, monkeypatch):
    """C's guidance is C's field, not B's (an SD3.5 / klein SCFM LoRA's CFG would otherwise reach a teacher in C),
    and choosing C's LoRA fills C's fields from that LoRA's metadata, as B's do."""
    pytest.importorskip("gradio")
    from sampling.app import build_ui
    from sampling.compare import Result

    app = session(tmp_path)
    ui = build_ui(app)
    fns = list(ui.fns.values())
    hints = [f for f in fns if f.name == "hint_values"]
    compare = next(f for f in fns if f.name == "compare")
    c_lora = next(b for b in compare.inputs if getattr(b, "label", None) == "LoRA")
    assert any(c_lora in f.inputs for f in hints)  # C's dropdown fills C's fields
    columns = []

    def render(prompt, negative, seed, width, height, col, callback=None):
        columns.append(col)
        path = app.out / f"{len(columns)}.png"
        Image.new("RGB", (8, 8)).save(path)
        return Result(path, 0.0, 1, 0.0)

    monkeypatch.setattr(app, "render", render)
    values = {"prompt": PROMPT, "negative": "", "seed": 0, "randomize": False, "width": 64, "height": 64,
              "a_steps": "", "a_guidance": "", "b_lora": str(DEMO_LORA), "b_scale": 1.0, "b_steps": "2",
              "b_shift": "", "b_guidance": "4.5", "c_on": True, "c_lora": "", "c_scale": 1.0, "c_steps": "8",
              "c_shift": "", "c_guidance": "", "pair": "A|B"}
    args = list(values.values()) + ["", 1.0, "", 1.0]  # two empty style LoRAs
    for _ in compare.fn(*args):
        pass
    a, b, c = columns
    assert (b.guidance, c.guidance, c.steps, c.loras) == (4.5, None, 8, [])
    # FLUX.1 (the demo) reads a negative prompt only with --true-cfg, which the page lacks: generate refuses it,
    # so the page does not offer the box; the SD3.5 / klein families (CFG) do
    negative = next(b for b in compare.inputs if getattr(b, "elem_id", None) == "negative")
    assert negative.visible is False and app.family.guidance == "embedding"
    with pytest.raises(Exception, match="Width and Height need a number"):  # a cleared box: gradio's error, one line
        for _ in compare.fn(*args[:4], None, *args[5:]):
            pass


def text_lora(path, scale: float = 0.1):
    """A LoRA with a T5 part alone (kohya lora_te3_: FLUX.1's T5), for the demo's 64-wide T5."""
    stem = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    save_file({f"{stem}.lora_down.weight": torch.full((2, 64), scale),
               f"{stem}.lora_up.weight": torch.full((64, 2), scale), f"{stem}.alpha": torch.tensor(2.0)}, path)
    return path


def test_prompts_are_never_flags_replaced_loras_merge_again_and_a_click_encodes_once(tmp_path, monkeypatch):
    """A prompt such as `-blurry` is a prompt (generate's parser would exit on it, and end the page's worker); a
    LoRA replaced under its name is merged again (its PNG records the new file); the columns of one click share
    one run of the text encoders while their text-encoder LoRAs agree."""
    from sampling.flags import build_parser as generate_parser

    app = session(tmp_path)
    encodes = []
    encode = app.pipe.encode_prompts
    monkeypatch.setattr(app.pipe, "encode_prompts", lambda *a: encodes.append(a[0]) or encode(*a))
    got = app.render("-blurry", "", 1, 64, 64, Column(steps=1))
    assert generate(["--prompt=-blurry", "--seed", "1", "--steps", "1", "--out", str(tmp_path / "cli.png")]) == 0
    assert np.array_equal(pixels(got.path), pixels(tmp_path / "cli.png"))
    assert read_png_params(got.path)["prompt"] == "-blurry"
    args = generate_parser().parse_args(app.column_argv(["--help"], "--seed=5", 0, 64, 64, Column()))
    assert (args.prompt, args.negative_prompt) == (["--help"], "--seed=5")
    monkeypatch.setattr(app, "column_argv", lambda *a: ["--steps", "many"])  # generate's parser refusing
    with pytest.raises(ValueError, match="^argument --steps: invalid int value: 'many'"):
        app.render(PROMPT, "", 0, 64, 64, Column())
    monkeypatch.undo()
    monkeypatch.setattr(app.pipe, "encode_prompts", lambda *a: encodes.append(a[0]) or encode(*a))
    with pytest.raises(ValueError, match=r"^--width 0: .*; pass --width 64 \(the default\)$"):  # the demo's size
        app.render(PROMPT, "", 0, 0, 64, Column())

    style = tmp_path / "loras" / "style.safetensors"
    col = Column([(str(style), 1.0)], steps=1)
    app.render(PROMPT, "", 1, 64, 64, col)
    new = tmp_path / "new.safetensors"  # another LoRA, moved onto the old one's name
    save_file({k: -v for k, v in load_file(DEMO_LORA).items()}, new, read_header(DEMO_LORA)[1])
    os.replace(new, style)
    replaced = app.render(PROMPT, "", 1, 64, 64, col)
    assert replaced.lora_seconds > 0
    assert generate(["--prompt", PROMPT, "--seed", "1", "--steps", "1", "--lora", f"{style}:1.0", "--out",
                     str(tmp_path / "new.png")]) == 0
    assert np.array_equal(pixels(replaced.path), pixels(tmp_path / "new.png"))

    # one click: A, B and C on the same text-encoder state encode once; a T5 LoRA part (at each scale) again
    text = text_lora(tmp_path / "loras" / "t5.safetensors")
    encodes.clear()
    for col in (Column(steps=1), Column([(str(DEMO_LORA), 1.0)], steps=1), Column([(str(style), 1.0)], steps=1)):
        app.render("a blue circle", "", 2, 64, 64, col)
    assert len(encodes) == 1
    for col in (Column([(str(text), 1.0)], steps=1), Column([(str(text), 0.5)], steps=1)):
        app.render("a blue circle", "", 2, 64, 64, col)  # the T5 part, then at another scale
    assert len(encodes) == 3


def test_the_page_offers_the_demo_student_takes_any_scale_and_says_each_failure_in_one_line(tmp_path, monkeypatch):
    """The demo's student is B's default with a --lora-dir of other LoRAs too; a LoRA recommending a scale past
    the slider's end widens it (negative scales too); out of memory and a failed write or read are one line in
    the page; gradio's copies of the served images are deleted in time."""
    gr = pytest.importorskip("gradio")
    from sampling.app import build_ui

    loras = tmp_path / "loras"
    loras.mkdir()
    strong = loras / "strong.safetensors"
    save_file(load_file(DEMO_LORA), strong, {**read_header(DEMO_LORA)[1], "scfm_lora_scale": "2.5"})
    app = Session(build_parser().parse_args(["--lora-dir", str(loras), "--out", str(tmp_path / "out")]))
    assert str(DEMO_LORA.resolve()) in app.lora_files()
    ui = build_ui(app)
    assert ui.delete_cache == (3600, 3600)
    fns = list(ui.fns.values())
    compare = next(f for f in fns if f.name == "compare")
    b_lora, b_scale = compare.inputs[8:10]
    assert b_lora.value == str(DEMO_LORA.resolve()) and b_lora.value in [v for _, v in b_lora.choices]
    hints = next(f for f in fns if f.name == "hint_values" and b_lora in f.inputs)
    update = hints.fn(str(strong))[0]
    assert update["value"] == 2.5 and update["minimum"] <= -2 and update["maximum"] >= 2.5
    assert b_scale.preprocess(2.5) == 2.5 and b_scale.preprocess(-1.0) == -1.0
    save_file(load_file(DEMO_LORA), strong, {**read_header(DEMO_LORA)[1], "scfm_lora_scale": "6"})
    assert hints.fn(str(strong))[0]["maximum"] == 6  # past the slider's end: widened

    values = [PROMPT, "", 0, False, 64, 64, "", "", str(DEMO_LORA), 1.0, "", "", "", False, "", 1.0, "", "", "",
              "A|B", "", 1.0, "", 1.0]
    sweep = next(f for f in fns if f.name == "sweep")
    sweep_values = [PROMPT, "", 0, False, 64, 64, str(DEMO_LORA), 1.0, "", "", "", "steps", "1", "(none)", "", "", 1.0,
                    "", 1.0]
    for error, said in ((torch.OutOfMemoryError("CUDA out of memory"), "^out of GPU memory; .* --fp8 "),
                        (OSError(errno.ENOSPC, "No space left on device", str(app.out / "00000-0.png")),
                         "^No space left on device: .*00000-0.png; free some space on its disk")):
        def fail(*a, error=error, **k):
            raise error

        monkeypatch.setattr(app, "render", fail)
        monkeypatch.setattr(app, "hints", fail)
        for run in (lambda: list(compare.fn(*values)), lambda: list(sweep.fn(*sweep_values, progress=gr.Progress())),
                    lambda: hints.fn(str(strong))):
            with pytest.raises(gr.Error) as shown:
                run()
            assert re.match(said, shown.value.message) and "\n" not in shown.value.message


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import sampling.app

    monkeypatch.setattr(sampling.app, "Session", lambda args: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert sampling.app.main(["--port", str(port)]) == 2
    assert capsys.readouterr().err == f"error: --port {port}: in use; pass another --port\n"

    class Page:  # another server takes the port while the model loads: gradio's OSError, as one line
        def queue(self, **_):
            pass

        def launch(self, **_):
            raise OSError(f"Cannot find empty port in range: {port}-{port}. You can specify a different port by ...")

    monkeypatch.setattr(sampling.app, "Session", lambda args: type("S", (), {"out": tmp_path})())
    monkeypatch.setattr(sampling.app, "build_ui", lambda session: Page())
    assert sampling.app.main(["--port", str(port)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: --port {port}: in use; pass another --port"


def page(app):
    """The page's handlers by name (the functions its buttons call), and its components by elem_id."""
    gr = pytest.importorskip("gradio")
    from sampling.app import build_ui

    ui = build_ui(app)
    fns = {f.name: f for f in ui.fns.values() if f.name}
    ids = {b.elem_id: b for b in ui.blocks.values() if getattr(b, "elem_id", None)}
    return gr, ui, fns, ids


def sweep_args(seed=0, randomize=False, axis1=("steps", "1, 2, 4"), axis2=("(none)", "")):
    return [PROMPT, "", seed, randomize, 64, 64, str(DEMO_LORA), 1.0, "", "", "", *axis1, *axis2, "", 1.0, "", 1.0]


def test_a_sweep_is_capped_before_any_render_and_stop_cancels_it_between_cells(tmp_path, monkeypatch):
    """Too many cells (two axes multiply) are refused in one line before the first render; Stop is gradio's cancel
    of the sweep's event, which ends a generator between two cells: the cells done stay in --out, no grid."""
    from sampling.compare import MAX_CELLS

    app = session(tmp_path)
    gr, ui, fns, ids = page(app)
    sweep = fns["sweep"]
    button = ids["stop-sweep"]._id
    stop = [f for f in ui.fns.values() if f.is_cancel_function and any(b == button for b, _ in f.targets)]
    assert [f.cancels for f in stop] == [[next(i for i, f in ui.fns.items() if f is sweep)]]

    assert len(sweep_columns(Column(steps=1), 0, [("seed", list(range(MAX_CELLS)))])) == MAX_CELLS == 64
    with pytest.raises(ValueError, match=r"^a sweep of 65 cells \(65 values\) is refused: at most 64; give fewer"):
        sweep_columns(Column(steps=1), 0, [("seed", list(range(65)))])
    monkeypatch.setattr(app, "render", lambda *a, **k: pytest.fail("rendered before the refusal"))
    too_many = sweep_args(axis1=("steps", " ".join(map(str, range(1, 10)))),
                          axis2=("lora scale", "0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8"))
    with pytest.raises(gr.Error) as refused:
        next(sweep.fn(*too_many, progress=gr.Progress()))
    assert refused.value.message == "a sweep of 72 cells (9 x 8 values) is refused: at most 64; give fewer values"
    monkeypatch.undo()

    running = sweep.fn(*sweep_args(), progress=gr.Progress())
    assert next(running)[1:] == (None, None, "3 cells: rendering the first")
    seed, shown, _, said = next(running)  # cell 1 (steps 1), its PNG written
    written = sorted(app.out.glob("*.png"))
    assert seed == 0 and [Path(shown)] == written and said == f"cell 1 of 3 (steps 1): {written[0].name}"
    running.close()  # what gradio's cancel does to a generator between two yields
    assert sorted(app.out.glob("*.png")) == written and read_png_params(written[0])["steps"] == 1

    *_, (_, shown, saved, said) = sweep.fn(*sweep_args(axis1=("steps", "1, 2")), progress=gr.Progress())
    assert shown == saved and Path(saved).name == "grid-0000.png" and said == "2 cells: grid-0000.png"


def test_an_empty_or_minus_one_seed_is_a_random_one_shown_and_recorded(tmp_path, monkeypatch):
    """A cleared Seed box or -1 draws a seed, as A1111's and ComfyUI's pages do (it was seed 0), in Generate and in a
    sweep alike: shown in the box and recorded in the PNGs like a typed one; other negative seeds are refused."""
    import sampling.app

    app = session(tmp_path)
    gr, _, fns, _ = page(app)
    draws = iter([123456, 654321, 777])
    monkeypatch.setattr(sampling.app, "random_seed", lambda: next(draws))
    compare = fns["compare"]

    def click(seed, randomize=False):
        values = [PROMPT, "", seed, randomize, 64, 64, "1", "", str(DEMO_LORA), 1.0, "1", "", "", False, "", 1.0, "",
                  "", "", "A|B", "", 1.0, "", 1.0]
        *_, last = compare.fn(*values)
        return last[0], [read_png_params(last[2 + 3 * n])["seed"] for n in range(2)]  # A's and B's PNGs

    assert click(None) == (123456, [123456, 123456])
    assert click(-1) == (654321, [654321, 654321])
    assert click(7) == (7, [7, 7])  # a typed seed draws nothing
    with pytest.raises(gr.Error) as refused:
        click(-5)
    assert refused.value.message == "Seed -5: seeds are 0 or more; leave the box empty or type -1 for a random one"
    _, (seed, cell, _, _), (shown, *_) = fns["sweep"].fn(*sweep_args(None, axis1=("steps", "1")),
                                                         progress=gr.Progress())
    assert seed == shown == 777 and read_png_params(cell)["seed"] == 777  # the 1-cell grid's cell


def test_rescan_offers_the_loras_saved_after_launch(tmp_path):
    """A LoRA saved into a --lora-dir after launch is offered on Rescan (and to a tab opened later: the page's
    load), in every LoRA dropdown, and renders; a chosen LoRA whose file is gone falls back to none."""
    app = session(tmp_path)
    _, ui, fns, ids = page(app)
    rescans = [f for f in ui.fns.values() if f.name == "rescan_loras"]
    assert {e for f in rescans for b, e in f.targets} == {"click", "load"}
    assert any(b == ids["rescan"]._id for f in rescans for b, _ in f.targets)
    loras = tmp_path / "loras"
    style = str((loras / "style.safetensors").resolve())
    new = loras / "new.safetensors"
    new.write_bytes(DEMO_LORA.read_bytes())
    os.remove(style)
    b = fns["compare"].inputs[8].value
    updates = rescans[0].fn(b, "", style, "")
    assert [u["value"] for u in updates] == [b, "", "", ""]
    offered = [[v for _, v in u["choices"]] for u in updates]
    assert all(str(new.resolve()) in o and style not in o and b in o for o in offered)
    assert app.render(PROMPT, "", 0, 64, 64, Column([(str(new), 1.0)], steps=1)).path.is_file()
